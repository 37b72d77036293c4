"""One run through its life with the embedded defaults (local SQLite store), started
from a directory other than the repository: artifacts stay inside ``train.out``, epochs
are counted one way everywhere, the registered model describes itself truly and is
named after the data set, a re-run of the finished command does nothing, and a
schedule change on resume is refused unless asked for (and then logged)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from test_train import command, metrics

pytestmark = pytest.mark.slow  # training runs: bash .ci/run -m "not slow" leaves it out


def run(cmd, cwd, timeout=400):
    return subprocess.run(
        cmd, cwd=cwd, env=dict(os.environ, MLFLOW_TRACKING_URI=""), capture_output=True, text=True, timeout=timeout
    )


def test_run_lifecycle_with_the_default_store(demo_shards, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    data = tmp_path / "digits"  # the data set's name, as shard.py lays it out: <name>/{train,val}
    data.mkdir()
    for split in ("train", "val"):
        os.symlink(demo_shards[split], data / split)
    shards = {"train": str(data / "train"), "val": str(data / "val")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = str(tmp_path / "run")
    # the tiny config's own names: tntpipe-{data} / tnt-tiny-{data}
    base = [
        a
        for a in command(out, shards, "optim.epochs=2", "train.eval_every=1", "data.eval_batch=500")
        if a != "mlflow.register_as="
    ]

    first = run(base, elsewhere)
    assert first.returncode == 0, first.stderr[-3000:]
    # 1. artifacts inside train.out, nothing in the current directory
    assert os.listdir(elsewhere) == []
    assert os.path.isdir(os.path.join(out, "mlartifacts"))
    uri = "sqlite:///" + os.path.join(out, "mlflow.db")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tntpipe-digits")
    assert exp is not None and exp.artifact_location == "file://" + os.path.join(out, "mlartifacts")
    versions = client.search_model_versions("name='tnt-tiny-digits'")
    assert len(versions) == 2  # epoch 1's evaluation (the first best), the end (another best, or @last)
    version = client.get_model_version_by_alias("tnt-tiny-digits", "last")
    # 2. epochs: completed epochs everywhere (31 steps an epoch)
    assert "eval epoch 1 step 31:" in first.stderr and "eval epoch 2 step 62:" in first.stderr
    assert [m["val/epoch"] for m in metrics(out) if "val/epoch" in m] == [1, 2]
    assert version.tags["epoch"] == "2" and version.tags["step"] == "62"
    with open(os.path.join(out, "FINISHED.json")) as f:
        assert json.load(f)["epoch"] == 2
    # 3. the model says what it is: 10 digits at 32 px, crop_pct 1.0, the class names
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tnt-tiny-digits@last").unwrap_python_model()
    assert type(model.model).__name__ == "TNT"
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 10 and tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == 1.0
    assert cfg["interpolation"] == "bicubic" and tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert cfg["label_names"] == [str(d) for d in range(10)] and cfg["architecture"] == "tntp_tiny_patch8_32"
    with open(os.path.join(out, "export", "pretrained_cfg.json")) as f:
        assert json.load(f)["num_classes"] == 10
    files = os.listdir(os.path.join(mlflow.artifacts.download_artifacts("models:/tnt-tiny-digits@last"), "artifacts"))
    assert sorted(files) == [
        "config.yaml",
        "figures",  # the latest feature-map figures (pipeline/visualize.py)
        f"model{'_ema' if version.tags['weights'] == 'ema' else ''}.safetensors",
        "pretrained_cfg.json",
    ]

    # 4. the same command again: finished, nothing logged or registered
    before = open(os.path.join(out, "metrics.jsonl")).read()
    again = run(base, elsewhere)
    assert again.returncode == 0 and again.stdout.startswith("finished: "), again.stderr[-2000:]
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    assert len(client.search_model_versions("name='tnt-tiny-digits'")) == 2

    # 5. another schedule: refused in one line, unless asked for
    longer = run([*base, "optim.epochs=4"], elsewhere)
    assert longer.returncode == 2
    errors = [line for line in longer.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "optim.epochs 2 -> 4" in errors[0]
    assert "train.allow_schedule_change=true" in longer.stderr
    allowed = run([*base, "optim.epochs=4", "train.allow_schedule_change=true", "train.max_steps=64"], elsewhere)
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "with a changed schedule (train.allow_schedule_change=true): optim.epochs 2 -> 4" in allowed.stderr
    assert client.get_run(version.run_id).data.tags["schedule_change.step62"].startswith("optim.epochs 2 -> 4")
    assert len(client.search_model_versions("name='tnt-tiny-digits'")) >= 3
    assert client.get_model_version_by_alias("tnt-tiny-digits", "last").tags["step"] == "64"
    assert os.listdir(elsewhere) == []


@pytest.mark.parametrize("bad", ["data.train=/nonexistent/train", "train.precision=fp8"])
def test_input_errors_come_before_any_setup_and_leave_nothing(bad, demo_shards, tmp_path):
    out = tmp_path / "run"
    proc = run(command(str(out), demo_shards, bad, nproc=2), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("error: ") == 1, proc.stderr
    assert "DeepSpeed" not in proc.stderr and "deepspeed" not in proc.stdout
    assert not out.exists()


def test_the_demo_ends_with_its_model_reloaded_in_a_fresh_process(tmp_path):
    """bash .ci/demo's own end (README: the two commands), shortened to 10 steps: the
    images written, sharded, trained, registered, then loaded from the registry in a
    fresh process (JPEG bytes in, pickle disallowed, no DeepSpeed) with its predictions
    printed, and the next steps' commands."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.demo",
            "--root",
            str(tmp_path / "mnist"),
            "--shards",
            str(tmp_path / "shards" / "mnist"),
            "train.max_steps=10",
            f"train.out={tmp_path / 'run'}",
            "mlflow.system_metrics=false",
        ],
        cwd=root,
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "loaded models:/tnt-tiny-mnist@best in a fresh process: JPEG bytes in, classes out" in out
    assert "(pickle disallowed; deepspeed imported: False)" in out
    predicted = [line for line in out.splitlines() if line.strip().startswith(("predicted", "true"))]
    assert len(predicted) == 2 and predicted[0].count(",") == 11, out[-2000:]
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'run' / 'mlflow.db'}" in out
    assert "models serve -m models:/tnt-tiny-mnist@best" in out
