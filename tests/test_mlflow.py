"""MLflow: a real ``mlflow server`` receives the run and the registered model; a fresh
process without DeepSpeed loads it and classifies digits; a server killed mid-run
does not stop training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow_server import MlflowServer
from test_train import command, metrics


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield s
    s.kill()


LOAD_AND_CLASSIFY = textwrap.dedent(
    """
    import io, json, sys
    import numpy as np, mlflow, torch, webdataset
    from PIL import Image
    uri, name, val_dir = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/{name}@best").eval()
    assert "deepspeed" not in sys.modules, "loading the model imported deepspeed"
    manifest = json.load(open(val_dir + "/manifest.json"))
    urls = [val_dir + "/" + s["name"] for s in manifest["shards"]]
    images, labels = [], []
    for sample in webdataset.WebDataset(urls, shardshuffle=False):
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB").resize((32, 32), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1)
        labels.append(int(sample["cls"]))
    with torch.no_grad():
        pred = model(torch.stack(images)).argmax(1)
    acc = (pred == torch.tensor(labels)).float().mean().item()
    files = {m: getattr(sys.modules[m], "__file__", None) for m in sys.modules if m.startswith("pipeline")}
    print(json.dumps({"accuracy": acc, "n": len(labels), "modules": files}))
    """
)


def runtime_env(tmp_path) -> str:
    """A Python environment with the runtime dependencies but not this project: a new
    venv whose path reaches the test venv's site-packages through a plain .pth line,
    so the editable install's finder there (a .pth of its own, processed only in a
    real site directory) is not run. Returns its python."""
    import site
    import sysconfig

    venv = tmp_path / "runtime-venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)] or [sysconfig.get_paths()["purelib"]]
    with open(os.path.join(purelib, "runtime_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    return str(venv / "bin" / "python")


def test_run_is_tracked_registered_and_loads_without_deepspeed(server, demo_shards, tmp_path):
    from mlflow import MlflowClient

    out = str(tmp_path / "run")
    env = {"MLFLOW_TRACKING_URI": server.uri}
    proc = subprocess.run(
        command(out, demo_shards, "train.max_steps=62", "train.eval_every=1",
                "mlflow.register_as=tnt-test", "mlflow.system_metrics=true", "mlflow.experiment=tests"),
        env=dict(os.environ, **env), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(server.uri)
    run_id = next(line.rsplit(" ", 1)[-1] for line in proc.stdout.splitlines() if line.startswith("done:"))
    run = client.get_run(run_id)
    assert run.data.params["train.zero_stage"] == "1" and run.data.params["train_data.samples"] == "4000"
    history = client.get_metric_history(run_id, "train/loss")
    assert len(history) >= 60
    assert "val/top1" in run.data.metrics and "val_ema/top1" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    version = client.get_model_version_by_alias("tnt-test", "best")
    assert version.run_id == run_id and version.tags["run_id"] == run_id and float(version.tags["top1"]) > 0
    assert client.get_model_version_by_alias("tnt-test", "last").version == version.version

    # a fresh process in an environment where this project is not installed (the model's
    # code ships with it), no DeepSpeed
    python = runtime_env(tmp_path)
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_CLASSIFY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([python, "-c", "import pipeline"], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'pipeline'" in probe.stderr  # the project is not there
    res = subprocess.run([python, str(script), server.uri, "tnt-test", demo_shards["val"]],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["n"] == 1000
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [f for f in result["modules"].values() if f]
    assert "pipeline.tnt" in result["modules"] and files
    assert all(not f.startswith(here) for f in files), files  # the downloaded model's copy, not this checkout
    # the same accuracy as the trainer's own evaluation, and above chance (10 classes)
    assert result["accuracy"] * 100 == pytest.approx(float(version.tags["top1"]), abs=1.0)
    assert result["accuracy"] > 0.13


def test_tracking_server_killed_mid_run_does_not_stop_training(demo_shards, tmp_path):
    s = MlflowServer(str(tmp_path / "mlflow")).start()
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        command(out, demo_shards, "train.max_steps=40", "train.ckpt_every=10", "data.val=", "mlflow.register_as=tnt-killed"),
        env=dict(os.environ, MLFLOW_TRACKING_URI=s.uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    from mlflow import MlflowClient

    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.isfile(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 5:
                break
            assert proc.poll() is None
            time.sleep(0.1)
        # the server has the run and its first metrics: tracking worked until the kill
        client = MlflowClient(s.uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1
        tracked = client.get_metric_history(runs[0].info.run_id, "train/loss")
        assert len(tracked) >= 3 and min(m.step for m in tracked) == 1
        s.kill()
        t_kill = time.time()
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        s.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("MLflow tracking at") == 1 and "training goes on without tracking" in stderr
    assert max(m["step"] for m in metrics(out)) == 40  # the log has every step anyway
    assert os.path.isfile(os.path.join(out, "export", "model.safetensors"))
    assert open(os.path.join(out, "checkpoints", "latest")).read() == "step00000040"
    assert time.time() - t_kill < 120  # no long stall on the dead server


def test_best_alias_follows_the_best_top1_across_versions(server, tmp_path):
    """Three registered versions with top-1 50, 40, 60: @best stays on the first, then
    moves to the third; @last is always the newest."""
    import numpy as np
    from mlflow import MlflowClient

    from pipeline import tnt
    from pipeline.tracking import Tracker

    model = tnt.create("tntp_tiny_patch8_32", num_classes=10).eval()
    weights = tmp_path / "w.txt"
    weights.write_text("weights")
    client = MlflowClient(server.uri)
    expected = []
    for i, top1 in enumerate(("50.00", "40.00", "60.00")):
        tracker = Tracker(server.uri, "best-alias", artifact_root=None)
        tracker.start(None, f"run{i}", system_metrics=False)
        version = tracker.register(model, "tnt-best", np.zeros((1, 3, 32, 32), np.float32), [str(weights)],
                                   {"top1": top1, "step": i}, ["last"])
        tracker.end()
        assert version is not None and tracker.failed is None
        expected.append(version)
        best = client.get_model_version_by_alias("tnt-best", "best")
        assert best.version == expected[(0, 0, 2)[i]]
        assert client.get_model_version_by_alias("tnt-best", "last").version == version
    assert client.get_model_version("tnt-best", expected[2]).tags["top1"] == "60.00"
