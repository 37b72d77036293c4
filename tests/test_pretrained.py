"""``model.init_from`` (pipeline/pretrained.py) and the registry's choices
(pipeline/registry.py), without a process group or a server: the sources, the head and
position-encoding adaptation, the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import export, pretrained, tnt
from pipeline.errors import InputError
from pipeline.transforms import Augment

TINY = "tntp_tiny_patch8_32"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 10-class 32 px tiny TNT exported the trainer's way (safetensors + pretrained_cfg)."""
    torch.manual_seed(0)
    model = tnt.create(TINY, num_classes=10)
    folder = tmp_path_factory.mktemp("export")
    files = export.export(
        str(folder), TINY, tuple("0123456789"), Augment(img_size=32, crop_pct=1.0), model.state_dict(), None, 7, 1
    )
    return {"model": model, "files": files, "folder": str(folder)}


def test_same_shape_loads_exactly(source):
    weights, cfg, lineage = pretrained.resolve(source["folder"], "")
    assert cfg["architecture"] == TINY and lineage["parent.init_from"] == source["folder"]
    assert len(lineage["parent.sha256"]) == 64
    model = tnt.create(TINY, num_classes=10)
    assert pretrained.load_into(model, TINY, weights, cfg) == []
    for k, v in source["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_a_registered_version_with_ema_weights_is_found(source, tmp_path):
    """A downloaded version holds one weights file, model_ema.safetensors when the EMA
    was registered, next to its pretrained_cfg."""
    import shutil

    folder = tmp_path / "model" / "artifacts"
    folder.mkdir(parents=True)
    shutil.copy(source["files"]["model"], folder / "model_ema.safetensors")
    shutil.copy(source["files"]["pretrained_cfg"], folder / "pretrained_cfg.json")
    weights, cfg, _ = pretrained.resolve(str(tmp_path / "model"), "")
    assert weights == str(folder / "model_ema.safetensors") and cfg["architecture"] == TINY


def test_new_classes_and_size_reinit_the_head_and_resample_patch_pos(source, caplog):
    model = tnt.create(TINY, num_classes=3, img_size=48)
    head = model.head.weight.detach().clone()
    with caplog.at_level("INFO", logger="tntpipe.pretrained"):
        notes = pretrained.load_into(model, TINY, source["files"]["model"], None)
    assert len(notes) == 2 and "head re-initialised: 10 classes" in notes[0] and "3 here" in notes[0]
    assert "from a 4x4 grid to 6x6 (48 px)" in notes[1]
    assert caplog.text.count("model.init_from:") == 2
    state, src = model.state_dict(), source["model"].state_dict()
    assert torch.equal(state["head.weight"], head)  # fresh head, untouched
    assert torch.equal(state["pixel_pos"], src["pixel_pos"])  # pixel encodings kept
    assert torch.equal(state["patch_pos"][:, :1], src["patch_pos"][:, :1])  # the class token's
    assert state["patch_pos"].shape == (1, 37, 96)
    # the 4x4 grid's values resampled bicubically to 6x6, as PIL resamples each channel
    # (an independent reference: torch's antialiased bicubic, a=-0.5, is PIL's; 1e-6 here)
    import numpy as np
    from PIL import Image

    grid = src["patch_pos"][0, 1:].reshape(4, 4, 96).permute(2, 0, 1).numpy()
    ref = np.stack([np.asarray(Image.fromarray(c, mode="F").resize((6, 6), Image.BICUBIC)) for c in grid])
    got = state["patch_pos"][0, 1:].reshape(6, 6, 96).permute(2, 0, 1).numpy()
    assert np.abs(got - ref).max() < 1e-5
    assert torch.equal(state["blocks.0.attn_out.qk.weight"], src["blocks.0.attn_out.qk.weight"])
    model.eval()(torch.randn(2, 3, 48, 48))  # runs at the new size


def test_timm_checkpoint_file_prefers_its_ema(source, tmp_path):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in source["model"].state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": source["model"].state_dict(), "state_dict_ema": ema, "epoch": 3}, path)
    model = tnt.create(TINY, num_classes=10)
    pretrained.load_into(model, TINY, str(path), None)
    assert torch.equal(model.state_dict()["cls_token"], ema["cls_token"])


@pytest.mark.parametrize("case", ["variant_cfg", "variant_shapes", "missing", "not_weights"])
def test_refusals_are_one_line(source, tmp_path, case):
    model = tnt.create(TINY, num_classes=10)
    weights, cfg = source["files"]["model"], json.load(open(source["files"]["pretrained_cfg"]))
    if case == "variant_cfg":
        cfg["architecture"] = "tntp_s_patch16_224"
        match = "holds a tntp_s_patch16_224 model, not tntp_tiny_patch8_32: set model.variant=tntp_s_patch16_224"
    elif case == "variant_shapes":  # another inner width: another variant, whatever the cfg says
        model, cfg = tnt.create(TINY, num_classes=10, inner_dim=16, num_heads_inner=2), None
        match = r"another variant than tntp_tiny_patch8_32: \S+ is \(12,\), tntp_tiny_patch8_32 has \(16,\)"
    elif case == "missing":
        with pytest.raises(InputError, match="no such file or directory"):
            pretrained.resolve(str(tmp_path / "nope.safetensors"), "")
        return
    else:
        weights = str(tmp_path / "junk.safetensors")
        open(weights, "wb").write(b"not safetensors")
        match = "is not a weights file timm can read"
    with pytest.raises(InputError, match=match) as exc:
        pretrained.load_into(model, TINY, weights, cfg)
    assert "\n" not in str(exc.value)


def test_unreachable_registry_is_one_line():
    with pytest.raises(
        InputError, match=r"models:/tnt@best: cannot be read from the MLflow store .*mlflow.tracking_uri"
    ):
        pretrained.resolve("models:/tnt@best", "http://127.0.0.1:9")


class _Cfg:
    """Only what Registrar reads."""

    def __init__(self, weights="auto", best=True):
        self.mlflow = type("M", (), {"register_weights": weights, "register_best": best, "register_as": "x"})()

    def named(self, template):
        return template


def _res(model, ema=None):
    res = {"val": {"top1": model, "top5": 99.0}}
    if ema is not None:
        res["val_ema"] = {"top1": ema, "top5": 99.0}
    return res


@pytest.mark.parametrize(
    "weights,res,chosen",
    [
        ("auto", _res(50, 60), "ema"),
        ("auto", _res(60, 50), "model"),
        ("auto", _res(50, 50), "model"),
        ("auto", _res(50), "model"),
        ("model", _res(50, 60), "model"),
        ("ema", _res(60, 50), "ema"),
    ],
)
def test_registrar_chooses_the_weights(weights, res, chosen):
    from pipeline.registry import Registrar

    reg = Registrar(_Cfg(weights), None, "", (), {})
    assert reg.choose(res) == chosen


def test_registrar_registers_only_new_bests_and_keeps_its_history():
    from pipeline.registry import Registrar

    reg = Registrar(_Cfg(), None, "", (), {})
    assert reg.is_new_best(_res(40, 30))
    reg.registered_best("1", _res(40, 30), 31)
    assert not reg.is_new_best(_res(35, 40)) and reg.is_new_best(_res(35, 41))
    reg.start_attempt(2)
    reg.requeues += 1
    again = Registrar(_Cfg(), None, "", (), {})
    again.load_state_dict(json.loads(json.dumps(reg.state_dict())))  # through a checkpoint's JSON
    again.start_attempt(1)
    assert again.state_dict() | {"attempts": 0} == reg.state_dict() | {"attempts": 0, "world_sizes": [2, 1]}
    assert again.attempts == 2 and again.best_step == 31 and again.best_version == "1"
    assert not Registrar(_Cfg(best=False), None, "", (), {}).is_new_best(_res(90))


@pytest.mark.parametrize("case", ["variant", "no_store"])
def test_the_trainer_checks_init_from_before_building_anything(source, demo_shards, tmp_path, case):
    """A variant mismatch was found only after the process group and DeepSpeed's op
    build (about 80 s), leaving train.log and a .lock in train.out; a models:/ URI with
    no store made an empty mlflow.db there. Now: one line, exit 2, nothing written."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "out"
    init, match = {
        "variant": (
            source["folder"],
            "error: model.init_from holds a tntp_tiny_patch8_32 model, not "
            "tntp_digits_patch8_32: set model.variant=tntp_tiny_patch8_32",
        ),
        "no_store": (
            "models:/tnt-tiny-mnist@best",
            f"error: model.init_from=models:/tnt-tiny-mnist@best: "
            f"no MLflow store at sqlite:///{out}/mlflow.db; set mlflow.tracking_uri",
        ),
    }[case]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--config",
            os.path.join(root, "configs", "tiny_cpu.yaml"),
            f"train.out={out}",
            f"data.train={demo_shards['train']}",
            "data.val=",
            "model.variant=tntp_digits_patch8_32",
            f"model.init_from={init}",
        ],
        cwd=root,
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(match), proc.stderr[-2000:]
    assert not out.exists() and "deepspeed" not in proc.stderr.lower()


def test_a_registered_version_is_found_in_the_store_given_not_the_environment(source, tmp_path, monkeypatch):
    """models:/ resolved against mlflow.tracking_uri (here a SQLite store, no
    MLFLOW_TRACKING_URI): MLflow looked the alias up in its default registry instead,
    made ./mlflow.db there and said the model was not found (python -m pipeline.demo
    --finetune failed so)."""
    import os

    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    store, cwd = f"sqlite:///{tmp_path}/store/mlflow.db", tmp_path / "cwd"
    os.makedirs(tmp_path / "store")
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    client = MlflowClient(store)
    experiment = client.create_experiment("e", artifact_location=f"file://{tmp_path}/store/artifacts")
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, source["folder"], "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias("tiny", "best", version.version)
    weights, cfg, lineage = pretrained.resolve("models:/tiny@best", store)
    assert cfg["architecture"] == TINY and lineage["parent.model"] == "tiny"
    assert lineage["parent.sha256"] == pretrained.sha256_file(source["files"]["model"])
    # a version by number, and a run's artifact (README: Fine-tuning)
    for uri in (f"models:/tiny/{version.version}", f"runs:/{run.info.run_id}/model"):
        weights, cfg, lineage = pretrained.resolve(uri, store)
        assert cfg["architecture"] == TINY and lineage["parent.sha256"] == pretrained.sha256_file(
            source["files"]["model"]
        )
        assert lineage["parent.run_id"] == run.info.run_id
    assert os.listdir(cwd) == []  # no ./mlflow.db


def test_a_versions_checkpoint_tag_is_absolute_whatever_train_out_is(tmp_path, monkeypatch):
    """train.out=runs/x gave a relative checkpoint tag, an absolute train.out an absolute
    one: the tag must name the checkpoint from anywhere."""
    import os
    from types import SimpleNamespace

    from pipeline import config
    from pipeline.registry import Registrar

    monkeypatch.chdir(tmp_path)
    reg = Registrar(config.load("", []), SimpleNamespace(run_id="r"), "runs/x", (), {"train": None, "val": None})
    tags = reg._tags(None, "model", 4, 1)
    assert tags["checkpoint"] == os.path.join(str(tmp_path), "runs", "x", "checkpoints", "step00000004")


def test_the_served_model_takes_encoded_images_or_a_uint8_batch_alike(source, monkeypatch):
    """README (Serving): the export holds classes.json; in process the model takes a
    uint8 (N, H, W, 3) batch through unwrap_python_model().predict(None, array) with the
    same answers as the same images encoded; top_k defaults to 5; an image over
    TNTP_SERVE_MAX_PIXELS is refused from its size."""
    import io
    import json

    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline import served

    assert json.load(open(source["files"]["classes"])) == list("0123456789")
    model = served.TNTClassifier().load(source["files"]["model"], source["files"]["pretrained_cfg"])
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
    encoded = []
    for image in batch:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "PNG")  # lossless: the same pixels
        encoded.append(buf.getvalue())
    from_array = model.predict(None, batch)
    from_bytes = model.predict(None, pd.DataFrame({"image": encoded}))
    assert [len(ids) for ids in from_bytes["class_ids"]] == [5, 5, 5]  # the default top_k
    assert from_array["class_ids"].tolist() == from_bytes["class_ids"].tolist()
    assert np.allclose(np.array(from_array["probabilities"].tolist()), np.array(from_bytes["probabilities"].tolist()))
    monkeypatch.setattr(served, "MAX_PIXELS", 1000)
    with pytest.raises(Exception, match=r"image 0: 40x40 is over 1000 pixels"):
        model.predict(None, batch[:1])


class _NotWeights:
    """Pickled into a checkpoint: loading it would run code."""


def test_a_checkpoint_that_needs_unpickling_code_is_refused(source, tmp_path):
    """README: timm checkpoints are read with weights_only=True: one that holds objects
    (loading it would run their code) is refused in one line, not loaded."""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": source["model"].state_dict(), "extra": _NotWeights()}, path)
    with pytest.raises(InputError, match="is not a weights file timm can read") as exc:
        pretrained.load_into(tnt.create(TINY, num_classes=10), TINY, str(path), None)
    assert "\n" not in str(exc.value)
