"""The paper's feature-map figures (pipeline/visualize.py): the command on a registered
model and an export folder, the Fig. 5 layout, the figures logged at each evaluation of
a 2-rank run (and none when turned off), and bad input."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import tnt, visualize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tntp_tiny_patch8_32: 4 blocks -> blocks 1, 2 (the middle) and 4; a patch and a pixel
# figure for each, and the last block's attention
FIGURES_PER_SET = 7


def test_the_pixel_mosaic_puts_each_patchs_pixels_in_its_own_cell():
    """Fig. 5's layout: patch (i, j)'s pixel (u, v) at row i p + u, column j p + v. A known
    pattern (value = 100 patch + pixel, equal over channels) comes out where it belongs,
    and a transposed layout (the easy mistake) would not."""
    H, W, p, c = 3, 5, 4, 6
    patch = torch.arange(H * W).view(H * W, 1, 1).float()
    pixel = torch.arange(p * p).view(1, p * p, 1).float()
    mosaic = visualize.pixel_mosaic((100 * patch + pixel).expand(H * W, p * p, c), (H, W))
    assert mosaic.shape == (H * p, W * p)
    for i, j, u, v in [(0, 0, 0, 0), (0, 4, 1, 2), (2, 1, 3, 0), (1, 3, 2, 3)]:
        assert mosaic[i * p + u, j * p + v] == 100 * (i * W + j) + u * p + v


def test_the_mosaic_drawn_from_a_model_shows_its_pixel_embeddings(tmp_path):
    """Through capture(): a model whose first block's pixel embeddings are set to a known
    pattern (a forward hook that replaces them) gives that pattern's mosaic."""
    model = tnt.create("tntp_tiny_patch8_32", num_classes=3).eval()
    blk = model.blocks[0]
    pattern = {}

    def set_pattern(module, inputs, out):
        pixel, patch = out
        values = torch.arange(pixel.shape[0] * pixel.shape[1], dtype=pixel.dtype).view(*pixel.shape[:2], 1)
        pattern["pixel"] = values.expand_as(pixel).contiguous()
        return pattern["pixel"], patch

    handle = blk.register_forward_hook(set_pattern)
    try:
        seen = visualize.capture(model, torch.randn(2, 3, 32, 32), [0])
    finally:
        handle.remove()
    grid = tuple(seen["patch"][0].shape[2:])
    assert grid == (4, 4)
    per_image = pattern["pixel"].view(2, 16, *pattern["pixel"].shape[1:])
    got = visualize.pixel_mosaic(seen["pixel"][0][1], grid)
    assert np.array_equal(got, visualize.pixel_mosaic(per_image[1], grid))
    # image 1, patch (2, 3), pixel (1, 0): the value the hook wrote there
    assert got[2 * 4 + 1, 3 * 4 + 0] == (16 + 2 * 4 + 3) * 16 + 1 * 4 + 0


def test_the_class_tokens_attention_is_the_last_blocks_softmax():
    """The attention drawn equals softmax(q_cls k^T / sqrt(d)) of the last block's outer
    attention, recomputed here from its own layers on its own input."""
    model = tnt.create("tntp_tiny_patch8_32", num_classes=3).eval()
    last = model.blocks[-1].attn_out
    seen_in = {}
    handle = last.register_forward_pre_hook(lambda m, args: seen_in.__setitem__("x", args[0]))
    try:
        seen = visualize.capture(model, torch.randn(2, 3, 32, 32), [0, 3])
    finally:
        handle.remove()
    x = seen_in["x"]
    B, N, C = x.shape
    q, k = last.qk(x).view(B, N, 2, last.num_heads, last.head_dim).permute(2, 0, 3, 1, 4)
    probs = ((q @ k.transpose(-1, -2)) * last.head_dim**-0.5).softmax(-1)[:, :, 0, 1:]
    assert torch.allclose(seen["attention"].flatten(2), probs, atol=1e-6)
    assert seen["attention"].shape == (2, last.num_heads, 4, 4)


def _pngs(folder) -> dict[str, Image.Image]:
    found = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".png"):
            img = Image.open(os.path.join(folder, name))
            img.load()
            found[name] = img
    return found


def _check_figures(found: dict[str, Image.Image], count: int) -> None:
    assert len(found) == count, sorted(found)
    for name, img in found.items():
        assert img.format == "PNG" and img.mode == "RGB" and min(img.size) >= 64, (name, img.size)
        assert np.asarray(img).astype(float).var() > 0, f"{name} is blank"


def _train(out, shards, *overrides):
    """A 6-step 2-rank run of the tiny config that registers as ``tnt-vis`` (test_train's command)."""
    from test_train import train

    train(out, shards, "mlflow.register_as=tnt-vis", "train.max_steps=6", "optim.epochs=1", *overrides, timeout=600)


@pytest.mark.slow
def test_figures_are_logged_at_each_evaluation_and_the_command_draws_them(demo_shards, tmp_path):
    """A 2-rank run draws the figures at its evaluation into the MLflow run (figures/,
    the step in each name) and the registered version carries them; the command draws
    the same set from the registered model and from the export folder, plus the
    side-by-side with another model (--compare, a timm ViT from a local file)."""
    import mlflow

    out = tmp_path / "run"
    _train(out, demo_shards)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version("tnt-vis", "1")
    logged = [a.path for a in client.list_artifacts(version.run_id, "figures")]
    assert len(logged) == FIGURES_PER_SET, logged
    assert all(os.path.basename(p).startswith("step00000006-") for p in logged), logged
    # the version's own location (a models:/ URI resolves in MLflow's default registry)
    source = client.get_model_version_download_uri("tnt-vis", "1")
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri)
    _check_figures(_pngs(os.path.join(model_dir, "artifacts", "figures")), FIGURES_PER_SET)

    for source, folder in (("models:/tnt-vis/1", tmp_path / "from_registry"), (str(out / "export"), tmp_path / "ex")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.visualize",
                source,
                "--split",
                demo_shards["val"],
                "--count",
                "3",
                "--out",
                str(folder),
                "--tracking-uri",
                uri,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        found = _pngs(folder)
        _check_figures(found, FIGURES_PER_SET)
        # rows are images: 3 images of 64 px (the pixel mosaic's 128) under a 14 px title
        assert found["patch-block01.png"].size == (13 * 66 + 2, 14 + 3 * 66 + 2)
    import timm
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32)  # DeiT-Ti's layout, random weights, at 32 px
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.visualize",
            str(out / "export"),
            "--split",
            demo_shards["val"],
            "--out",
            str(tmp_path / "cmp"),
            "--compare",
            f"vit_tiny_patch16_224={tmp_path / 'vit.safetensors'}",
            "--blocks",
            "1",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = _pngs(tmp_path / "cmp")
    assert sorted(n for n in found if n.startswith("compare")) == ["compare-block01.png", "compare-block02.png"]


@pytest.mark.slow
def test_no_figures_when_turned_off(demo_shards, tmp_path):
    import mlflow

    out = tmp_path / "run"
    _train(out, demo_shards, "mlflow.figures=0")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    version = client.get_model_version("tnt-vis", "1")
    assert client.list_artifacts(version.run_id, "figures") == []
    assert not (out / "figures").exists()


@pytest.mark.parametrize("case", ["missing model", "not an image", "no images"])
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(good, format="JPEG")
    (tmp_path / "ok.jpg").write_bytes(good.getvalue())
    args = {
        "missing model": [str(tmp_path / "no_such_export"), str(tmp_path / "ok.jpg")],
        "not an image": [str(tmp_path / "no_such_export"), str(bad)],
        "no images": [str(tmp_path / "no_such_export")],
    }[case]
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.visualize", *args, "--out", str(tmp_path / "f")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    expected = {
        "missing model": "no such file or directory",
        "not an image": "is not an image",
        "no images": "image files or --split",
    }[case]
    assert expected in proc.stderr
    assert not (tmp_path / "f").exists()
