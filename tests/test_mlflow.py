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
    print(json.dumps({"accuracy": acc, "n": len(labels), "modules": sorted(m for m in sys.modules if m.startswith("pipeline"))}))
    """
)


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

    # a fresh process, no repository on its path (the model's code ships with it), no DeepSpeed
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_CLASSIFY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(script), server.uri, "tnt-test", demo_shards["val"]],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["n"] == 1000
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
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if os.path.isfile(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 5:
                break
            assert proc.poll() is None
            time.sleep(0.1)
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
