"""Shard builder throughput vs a plain `tar` of the same files, measured in one run.

    .venv/bin/python bench/shard_bench.py [--synthetic 3000] [--workers N]

Data sets: the demo tree (5,000 real MNIST digits, tiny JPEGs) and a synthetic
ImageNet-like tree (crops of the real photos scikit-learn ships, resized to about
500x375 and saved at JPEG quality 90, spread over 10 class folders). Every file is
read once before timing so that tar and the builder both read from the page cache.
Prints images/s of each configuration and its ratio to plain tar.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import demo, shard  # noqa: E402


def make_synthetic(root: str, n: int, scale: float = 1.0) -> str:
    """``n`` JPEGs of about (500x375) x ``scale`` in 10 class folders under root/train."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        x, y = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
        size = (int(rng.integers(450, 520) * scale), int(rng.integers(340, 400) * scale))
        img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize(size, Image.BICUBIC)
        folder = os.path.join(root, "train", f"n{i % 10:08d}")
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"img_{i:06d}.JPEG"), quality=90)
    return root


def warm(root: str) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                size += len(f.read())
            files += 1
    return files, size


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(name: str, root: str, workers: int, tmp: str) -> None:
    files, size = warm(root)
    print(f"\n{name}: {files} files, {size / 1e6:.1f} MB, mean {size / files / 1e3:.1f} KB")
    out_tar = os.path.join(tmp, "plain.tar")
    t_tar = min(timed(lambda: subprocess.run(["tar", "-cf", out_tar, "-C", root, "."], check=True)) for _ in range(2))
    base = files / t_tar
    print(f"  {'plain tar':<38} {base:>9,.0f} img/s   1.00x")
    configs = [
        ("shard.py (as-is, --check draft)", []),
        ("shard.py (as-is, --check header)", ["--check", "header"]),
        ("shard.py (as-is, --check full)", ["--check", "full"]),
        ("shard.py (re-encode: max side 320, q90)", ["--resize-max-side", "320", "--quality", "90"]),
    ]
    for label, extra in configs:
        out = os.path.join(tmp, "out")

        def run():
            shutil.rmtree(out, ignore_errors=True)
            assert shard.main([root, "--out", out, "--workers", str(workers), "--quiet"] + extra) == 0

        with contextlib.redirect_stdout(io.StringIO()):
            t = min(timed(run) for _ in range(2))
        rate = files / t
        print(f"  {label:<38} {rate:>9,.0f} img/s   {rate / base:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", type=int, default=3000, help="number of ImageNet-sized JPEGs to generate")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="shard builder processes")
    args = p.parse_args()
    print(f"cpus: {os.cpu_count()}, shard builder workers: {args.workers}")
    with tempfile.TemporaryDirectory() as tmp:
        bench("demo (MNIST digits, 28x28)", demo.write_demo_tree(os.path.join(tmp, "mnist")), args.workers, tmp)
        bench(
            "synthetic ImageNet-sized (~500x375, q90)",
            make_synthetic(os.path.join(tmp, "syn"), args.synthetic),
            args.workers,
            tmp,
        )


if __name__ == "__main__":
    main()
