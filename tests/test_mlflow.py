"""MLflow: a real ``mlflow server`` receives the run and the registered model; a fresh
process without DeepSpeed loads it and classifies digits; a server killed mid-run
does not stop training."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow_server import MlflowServer
from test_train import command, metrics
from waiting import wait_for

pytestmark = pytest.mark.slow  # a real mlflow server and training runs: bash .ci/run -m "not slow" leaves it out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = MlflowServer(str(tmp_path_factory.mktemp("mlflow"))).start()
    yield s
    s.kill()


LOAD_AND_CLASSIFY = textwrap.dedent(
    """
    import io, json, os, sys
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    import numpy as np, mlflow, pandas as pd, webdataset
    from PIL import Image
    uri, name, val_dir = sys.argv[1:4]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@best")
    assert "deepspeed" not in sys.modules, "loading the model imported deepspeed"
    manifest = json.load(open(val_dir + "/manifest.json"))
    urls = [val_dir + "/" + s["name"] for s in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    labels = np.array([int(s["cls"]) for s in samples])
    out = model.predict(pd.DataFrame({"image": [s["jpg"] for s in samples]}), params={"top_k": 3})
    pred = np.array([ids[0] for ids in out["class_ids"]])
    # a uint8 array batch (the decoded 28x28 digits) through the unwrapped model
    arrays = np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"]))) for s in samples[:50]])
    pred_arrays = [ids[0] for ids in model.unwrap_python_model().predict(None, arrays)["class_ids"]]
    files = {m: getattr(sys.modules[m], "__file__", None) for m in sys.modules if m.startswith("pipeline")}
    print(json.dumps({"accuracy": float((pred == labels).mean()), "n": len(labels), "modules": files,
                      "top3": len(out["class_ids"][0]), "names": out["class_names"][0],
                      "arrays_agree": float(np.mean(np.array(pred_arrays) == pred[:50])),
                      "module": type(model.unwrap_python_model().model).__name__}))
    """
)


def runtime_env(tmp_path) -> str:
    """A Python environment with the runtime dependencies but not this project: a new
    venv whose path reaches the test venv's site-packages through a plain .pth line,
    so the editable install's finder there (a .pth of its own, processed only in a
    real site directory) is not run. Its bin/ has a ``uvicorn`` (what ``mlflow models
    serve`` starts) of its own. Returns its python."""
    import site
    import sysconfig

    venv = tmp_path / "runtime-venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if os.path.isdir(p)] or [sysconfig.get_paths()["purelib"]]
    with open(os.path.join(purelib, "runtime_deps.pth"), "w") as f:
        f.write("\n".join(deps) + "\n")
    uvicorn = venv / "bin" / "uvicorn"
    uvicorn.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom uvicorn.main import main\nsys.exit(main())\n")
    uvicorn.chmod(0o755)
    return str(venv / "bin" / "python")


LIGHT = ("aug.scale=[0.85,1.0]", "aug.label_smoothing=0")


@pytest.fixture(scope="module")
def registered(server, demo_shards, tmp_path_factory):
    """One 2-rank run into the server, registered as tnt-test (evaluated each epoch; the
    demo's light augmentation: the fine-tuning test's parent learns faster with it)."""
    tmp = tmp_path_factory.mktemp("registered")
    out = str(tmp / "run")
    proc = subprocess.run(
        command(
            out,
            demo_shards,
            "train.max_steps=62",
            "train.eval_every=1",
            *LIGHT,
            "mlflow.register_as=tnt-test",
            "mlflow.system_metrics=true",
            "mlflow.experiment=tests-{data}",
        ),
        env=dict(os.environ, MLFLOW_TRACKING_URI=server.uri),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = next(line.rsplit(" ", 1)[-1] for line in proc.stdout.splitlines() if line.startswith("done:"))
    return {"out": out, "run_id": run_id, "proc": proc, "python": runtime_env(tmp), "tmp": tmp}


def test_run_is_tracked_and_registered_with_its_lineage(server, registered, demo_shards):
    from mlflow import MlflowClient

    client, run_id, out = MlflowClient(server.uri), registered["run_id"], registered["out"]
    run = client.get_run(run_id)
    assert run.data.params["train.zero_stage"] == "1" and run.data.params["train_data.samples"] == "4000"
    # the names as resolved, not the templates ("tests-{data}")
    experiment = client.get_experiment(run.info.experiment_id)
    assert run.data.params["mlflow.experiment"] == "tests-shards" == experiment.name
    # MLflow 3's UI opens it on its training runs, not on the GenAI overview
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(run_id, "train/loss")
    assert len(history) >= 60
    assert "val/top1" in run.data.metrics and "val_ema/top1" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "config.yaml" in artifacts
    # a version at each new best evaluation (epoch 1 is always one), the end's is @last
    versions = sorted(client.search_model_versions("name='tnt-test'"), key=lambda v: int(v.version))
    assert [v.tags["step"] for v in versions][0] == "31" and versions[-1].tags["step"] == "62"
    assert [float(v.tags["top1"]) for v in versions] == sorted(float(v.tags["top1"]) for v in versions)
    best, last = (client.get_model_version_by_alias("tnt-test", a) for a in ("best", "last"))
    assert last.version == versions[-1].version
    assert float(best.tags["top1"]) == max(float(v.tags["top1"]) for v in versions)
    evals = {m["step"]: m for m in metrics(out) if "val/top1" in m}
    for v in versions:
        tags, ev = v.tags, evals[int(v.tags["step"])]
        assert v.run_id == run_id and tags["run_id"] == run_id
        # the better of model and EMA (mlflow.register_weights=auto), both recorded
        assert float(tags["model.top1"]) == pytest.approx(ev["val/top1"], abs=0.006)
        assert float(tags["ema.top1"]) == pytest.approx(ev["val_ema/top1"], abs=0.006)
        assert tags["weights"] == ("ema" if ev["val_ema/top1"] > ev["val/top1"] else "model")
        assert tags["top1"] == tags[f"{tags['weights']}.top1"]
        assert tags["checkpoint"] == os.path.join(out, "checkpoints", f"step{int(tags['step']):08d}")
        assert os.path.isdir(tags["checkpoint"]) or tags["step"] != "62"  # keep_last prunes older ones
        assert tags["attempts"] == "1" and tags["requeues"] == "0" and tags["world_sizes"] == "2"
        assert tags["faults"] == "0" and len(tags["git.commit"]) == 40 and tags["git.dirty"] in ("true", "false")
        assert len(tags["config.sha256"]) == 64
        for split in ("train", "val"):
            manifest = os.path.join(demo_shards[split], "manifest.json")
            assert tags[f"data.{split}.manifest"] == manifest
            assert tags[f"data.{split}.sha256"] == hashlib.sha256(open(manifest, "rb").read()).hexdigest()
        # the version's page says what it is, on what data, how good, and how to call it
        text = v.description
        assert "**TNT `tntp_tiny_patch8_32`** (tnt-tiny)" in text and "10 classes, 32 px input" in text
        assert f"{tnt_params()}M parameters" in text and "4,000 images" in text and tags["data.train.sha256"] in text
        assert f"**top-1 {tags['top1']}%, top-5 {tags['top5']}%** on 1,000 held-out images" in text
        assert f'load_model("models:/tnt-test/{v.version}")' in text and '"columns": ["image"]' in text
        assert '"top_k": 5' in text and f"mlflow models serve -m models:/tnt-test/{v.version}" in text
        # its logged model carries the evaluation
        logged = client.get_logged_model(tags["logged_model"])
        assert {m.key: m.value for m in logged.metrics}["val_top1"] == pytest.approx(float(tags["top1"]))
    assert "TNT `tntp_tiny_patch8_32` for 10 classes" in client.get_registered_model("tnt-test").description


def tnt_params() -> str:
    from pipeline import tnt

    return f"{tnt.count_params(tnt.create('tntp_tiny_patch8_32', num_classes=10)) / 1e6:.2f}"


def test_registered_model_loads_without_pickle_or_this_checkout(server, registered, demo_shards, tmp_path):
    """A fresh process in an environment where this project is not installed (the
    model's code ships with it), pickle disallowed, no DeepSpeed: JPEG bytes in, the
    trainer's top-1 out."""
    from mlflow import MlflowClient

    python = registered["python"]
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_CLASSIFY)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run(
        [python, "-c", "import pipeline"], cwd=str(tmp_path), env=env, capture_output=True, text=True
    )
    assert probe.returncode != 0 and "No module named 'pipeline'" in probe.stderr  # the project is not there
    res = subprocess.run(
        [python, str(script), server.uri, "tnt-test", demo_shards["val"]],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["n"] == 1000 and result["top3"] == 3 and result["module"] == "TNT"
    assert all(name in [str(d) for d in range(10)] for name in result["names"])
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = [f for f in result["modules"].values() if f]
    assert "pipeline.tnt" in result["modules"] and files
    assert all(not f.startswith(here) for f in files), files  # the downloaded model's copy, not this checkout
    # the trainer's own evaluation of these weights (the EMA's in fp32 exactly; the model's in bf16)
    best = MlflowClient(server.uri).get_model_version_by_alias("tnt-test", "best")
    assert result["accuracy"] * 100 == pytest.approx(float(best.tags["top1"]), abs=1.0)
    assert result["accuracy"] > 0.13
    assert result["arrays_agree"] == 1.0  # the decoded JPEGs as uint8 arrays: the same pixels, the same classes


def val_images(val_dir: str) -> tuple[list[bytes], list[int]]:
    import webdataset

    manifest = json.load(open(os.path.join(val_dir, "manifest.json")))
    urls = [os.path.join(val_dir, s["name"]) for s in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False))
    return [s["jpg"] for s in samples], [int(s["cls"]) for s in samples]


def invocation(images: list[bytes], top_k: int | None = 1) -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    return json.dumps(body if top_k is None else {**body, "params": {"top_k": top_k}}).encode()


def test_served_model_answers_jpegs_like_the_loaded_model(server, registered, demo_shards, tmp_path):
    """``mlflow models serve`` (in the environment without this project) answers HTTP
    POSTs of the 1,000 real val JPEGs with the loaded model's classes; bad requests get
    a 400 and one line, and the server goes on serving."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow_server import ModelServer
    from PIL import Image

    images, labels = val_images(demo_shards["val"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    served = ModelServer(registered["python"], "models:/tnt-test@best", server.uri, str(tmp_path / "serve")).start(
        env=env
    )
    try:
        predicted = []
        for i in range(0, len(images), 250):
            status, body = served.post(invocation(images[i : i + 250]))
            assert status == 200, body[:500]
            predicted += [row["class_ids"][0] for row in json.loads(body)["predictions"]]
        # bad requests: one clear 4xx each
        # the message is the one line, not MLflow's "Failed to predict data '<DataFrame dump>'"
        status, body = served.post(invocation([b"not an image at all"]))
        assert status == 400 and json.loads(body)["message"] == "image 0: not an image PIL can read (19 bytes)", body[
            :300
        ]
        status, body = served.post(invocation(images[:1], top_k=0))  # was clamped to 1 silently
        assert status == 400 and json.loads(body)["message"] == "top_k must be a whole number >= 1, not 0", body[:300]
        status, body = served.post(b"")
        assert 400 <= status < 500, (status, body[:300])
        status, body = served.post(json.dumps({"dataframe_split": {"columns": ["image"], "data": []}}).encode())
        assert 400 <= status < 500, (status, body[:300])
        huge = io.BytesIO()
        Image.new("L", (8000, 6000)).save(huge, "PNG")  # 48M pixels: refused from the header, never decoded
        status, body = served.post(invocation([huge.getvalue()]))
        assert status == 400 and b"is over 40000000 pixels" in body, body[:300]
        # still serving: top_k=3, and without params the default top_k, 5
        status, body = served.post(invocation(images[:2], top_k=3))
        assert status == 200 and len(json.loads(body)["predictions"][0]["class_ids"]) == 3
        status, body = served.post(invocation(images[:2], top_k=None))
        assert status == 200 and len(json.loads(body)["predictions"][0]["class_ids"]) == 5
    finally:
        served.kill()
    # the same answers as the model loaded in this process (same images, same transform)
    mlflow.set_tracking_uri(server.uri)
    model = mlflow.pyfunc.load_model("models:/tnt-test@best")
    local = [ids[0] for ids in model.predict(pd.DataFrame({"image": images}), params={"top_k": 1})["class_ids"]]
    assert predicted == local
    from mlflow import MlflowClient

    best = MlflowClient(server.uri).get_model_version_by_alias("tnt-test", "best")
    top1 = 100 * float(np.mean(np.array(predicted) == np.array(labels)))
    assert top1 == pytest.approx(float(best.tags["top1"]), abs=1.0)  # the trainer's evaluation of it


def test_readme_serve_command_runs_as_printed_without_an_activated_venv(server, registered, demo_shards, tmp_path):
    """The README's ``.venv/bin/mlflow models serve ...`` line, copied into a shell whose
    PATH has no venv on it (MLflow starts ``uvicorn`` by name: exit 127 before the venv's
    start-up hook put its bin/ on PATH). Only the model and the port are this test's."""
    import shlex
    import signal

    from mlflow_server import wait_until_up

    from launch.local import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    line = next(ln for ln in readme.splitlines() if ln.startswith(".venv/bin/mlflow models serve"))
    if not os.path.exists(os.path.join(root, ".venv", "bin", "mlflow")):
        pytest.skip("no .venv in this checkout (the suite runs from .ci/run's venv)")
    port = free_port()
    argv = [
        {"models:/tnt-tiny-mnist@best": "models:/tnt-test@best", "5001": str(port)}.get(a, a) for a in shlex.split(line)
    ]
    assert "models:/tnt-test@best" in argv and str(port) in argv, line
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", MLFLOW_TRACKING_URI=server.uri)
    log_path = str(tmp_path / "serve.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/ping", 120, log_path)
        images, _ = val_images(demo_shards["val"])
        import urllib.request

        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=invocation(images[:2], top_k=3),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert len(json.loads(r.read())["predictions"][0]["class_ids"]) == 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def relabelled_digits(tree: str, root, digits: dict) -> dict:
    """Shards of a new class set: the demo's ``digits`` under new names (class-per-folder)."""
    import contextlib
    import shutil

    from pipeline import shard

    for split in ("train", "val"):
        for digit, name in digits.items():
            shutil.copytree(os.path.join(tree, split, str(digit)), root / "src" / split / name)
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard.main([str(root / "src"), "--out", str(root / "shards"), "--shard-size", "500", "--quiet"]) == 0
    return {split: str(root / "shards" / split) for split in ("train", "val")}


def test_finetune_from_the_registry_beats_scratch_and_records_its_parent(server, registered, demo_shards, tmp_path):
    """The tiny TNT registered above (10 digits, 32 px) fine-tuned from models:/tnt-test@best
    on 3 digits under new names at 40 px (new head, patch_pos resampled 4x4 -> 5x5)
    against the same run from scratch: same data, steps, seed and recipe."""
    from mlflow import MlflowClient

    shards = relabelled_digits(demo_shards["tree"], tmp_path, {3: "three", 5: "five", 8: "eight"})
    steps = [
        "train.max_steps=36",
        "optim.epochs=2",
        "train.eval_every=0",
        "optim.lr=1e-3",
        "aug.img_size=40",
        "train.ckpt_every=0",
    ]
    env = dict(os.environ, MLFLOW_TRACKING_URI=server.uri)
    tuned = subprocess.run(
        command(
            str(tmp_path / "tuned"),
            shards,
            *steps,
            "model.init_from=models:/tnt-test@best",
            "mlflow.register_as=tnt-finetuned",
            nproc=1,
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    assert "model.init_from: head re-initialised: 10 classes in model.init_from, 3 here" in tuned.stderr
    assert "patch position encodings resampled from a 4x4 grid to 5x5 (40 px)" in tuned.stderr
    scratch = subprocess.run(
        command(str(tmp_path / "scratch"), shards, *steps, nproc=1),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scratch.returncode == 0, scratch.stderr[-3000:]
    top1 = {
        name: [m["val/top1"] for m in metrics(str(tmp_path / name)) if "val/top1" in m][-1]
        for name in ("tuned", "scratch")
    }
    print("fine-tuned vs scratch top-1:", top1)
    # Margin: 36 steps from scratch leave the 3 classes near chance (33%), while the
    # parent's 62 steps on all 10 digits (45% top-1) already separate digit shapes.
    # Measured on an Intel Xeon VM: 59.0 vs 43.7 (+15.3); asserted: +8, room for
    # another CPU's rounding to change the trajectories
    assert top1["tuned"] >= top1["scratch"] + 8, top1
    client = MlflowClient(server.uri)
    parent = client.get_model_version_by_alias("tnt-test", "best")
    child = client.get_model_version_by_alias("tnt-finetuned", "last").tags
    assert child["parent.init_from"] == "models:/tnt-test@best"
    assert (child["parent.model"], child["parent.version"], child["parent.run_id"]) == (
        "tnt-test",
        parent.version,
        parent.run_id,
    )
    assert child["data.train.manifest"] == os.path.join(shards["train"], "manifest.json")


def test_tracking_server_killed_mid_run_does_not_stop_training(demo_shards, tmp_path):
    s = MlflowServer(str(tmp_path / "mlflow")).start()
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        command(
            out, demo_shards, "train.max_steps=40", "train.ckpt_every=10", "data.val=", "mlflow.register_as=tnt-killed"
        ),
        env=dict(os.environ, MLFLOW_TRACKING_URI=s.uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    from mlflow import MlflowClient

    try:
        wait_for(
            "5 metrics lines",
            lambda: os.path.isfile(os.path.join(out, "metrics.jsonl")) and len(metrics(out)) >= 5,
            240,
            0.1,
            proc,
        )
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
    from mlflow import MlflowClient

    from pipeline import export, tnt
    from pipeline.tracking import Tracker
    from pipeline.transforms import Augment

    aug = Augment(img_size=32)
    state = tnt.create("tntp_tiny_patch8_32", num_classes=10).state_dict()
    files = export.export(str(tmp_path / "export"), "tntp_tiny_patch8_32", tuple("0123456789"), aug, state, None, 1, 1)
    config = tmp_path / "config.yaml"
    config.write_text("name: test\n")
    client = MlflowClient(server.uri)
    expected = []
    for i, top1 in enumerate(("50.00", "40.00", "60.00")):
        tracker = Tracker(server.uri, "best-alias", artifact_root=None)
        tracker.start(None, f"run{i}", system_metrics=False)
        version = export.register(
            tracker, "tnt-best", files, "model", str(config), None, {"top1": top1, "step": i}, ["last"]
        )
        tracker.end()
        assert version is not None and tracker.failed is None
        expected.append(version)
        best = client.get_model_version_by_alias("tnt-best", "best")
        assert best.version == expected[(0, 0, 2)[i]]
        assert client.get_model_version_by_alias("tnt-best", "last").version == version
    assert client.get_model_version("tnt-best", expected[2]).tags["top1"] == "60.00"
