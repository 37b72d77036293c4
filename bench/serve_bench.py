"""The registered model served over HTTP vs called in process: requests/s and latency.

    .venv/bin/python bench/serve_bench.py [--model-uri models:/tnt-tiny-mnist@best --tracking-uri URI]
                                          [--requests 100] [--batches 1,32]

The model: ``--model-uri`` (the demo's, after ``python -m pipeline.demo``:
``models:/tnt-tiny-mnist@best`` in ``sqlite:///runs/tiny-cpu/mlflow.db``), or by default
a tiny TNT (random weights: the cost does not depend on them) registered the trainer's
way (``pipeline.export.register``) in a temporary local store. The inputs: real JPEGs,
the demo's MNIST validation digits (``pipeline.demo.write_demo_tree``).

For batch sizes 1 and 32, ``--requests`` sequential requests each (one client, so the
latency is the server's and not a queue's):

  - in process: ``mlflow.pyfunc.load_model(uri).predict(DataFrame of JPEG bytes)``,
    the baseline;
  - served: ``mlflow models serve -m URI --env-manager local`` on 127.0.0.1 (one
    uvicorn worker), a JSON POST of base64 JPEGs per request.

Printed per batch size: p50/p95 latency (ms) and requests/s of both, and the overhead
ratio served / in process (p50), with the machine's CPU and torch's thread count
(CPUs differ: the ratio, not the absolute figures, carries over).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from mlflow_server import ModelServer  # noqa: E402
from reshard_bench import cpu_name  # noqa: E402


def register_tiny(tmp: str) -> tuple[str, str]:
    """A tiny TNT registered the trainer's way in a local store: (model URI, tracking URI)."""
    from pipeline import export, tnt
    from pipeline.tracking import Tracker
    from pipeline.transforms import Augment

    uri = f"sqlite:///{tmp}/mlflow.db"
    aug = Augment(img_size=32, crop_pct=1.0)
    state = tnt.create("tntp_tiny_patch8_32", num_classes=10).state_dict()
    files = export.export(
        os.path.join(tmp, "export"), "tntp_tiny_patch8_32", tuple("0123456789"), aug, state, None, 0, 0
    )
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        f.write("name: serve-bench\n")
    tracker = Tracker(uri, "serve-bench", artifact_root="file://" + os.path.join(tmp, "artifacts"))
    tracker.start(None, "serve-bench", system_metrics=False)
    version = export.register(tracker, "serve-bench", files, "model", config, None, {}, ["best"])
    tracker.end()
    if version is None:
        raise SystemExit(f"registration failed: {tracker.failed}")
    return "models:/serve-bench@best", uri


def percentiles(ms: list[float]) -> tuple[float, float]:
    s = sorted(ms)
    return s[len(s) // 2], s[min(len(s) - 1, int(0.95 * len(s)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", default="", help="a registered model (default: a tiny TNT in a temporary store)")
    p.add_argument("--tracking-uri", default="", help="the store holding --model-uri")
    p.add_argument("--requests", type=int, default=100, help="sequential requests per batch size")
    p.add_argument("--batches", default="1,32", help="images per request, comma-separated")
    args = p.parse_args()

    import mlflow
    import pandas as pd
    import torch

    from pipeline import demo

    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    model_uri, tracking_uri = args.model_uri, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not model_uri:
        model_uri, tracking_uri = register_tiny(tmp)
    tree = demo.write_demo_tree(os.path.join(ROOT, demo.DEFAULT_ROOT))
    val = os.path.join(tree, "val")
    files = sorted(os.path.join(val, d, f) for d in os.listdir(val) for f in os.listdir(os.path.join(val, d)))
    images = [open(f, "rb").read() for f in files]
    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(model_uri)
    server = ModelServer(sys.executable, model_uri, tracking_uri, os.path.join(tmp, "serve")).start(timeout=180)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; model {model_uri}; "
        f"{args.requests} sequential requests per batch size; real JPEGs (MNIST digits, 28x28)"
    )
    try:
        for batch in [int(b) for b in args.batches.split(",")]:
            groups = [images[(i * batch) % len(images) :][:batch] or images[:batch] for i in range(args.requests)]
            model.predict(pd.DataFrame({"image": groups[0]}))  # warm-up
            local = []
            t0 = time.perf_counter()
            for g in groups:
                t = time.perf_counter()
                model.predict(pd.DataFrame({"image": g}), params={"top_k": 5})
                local.append((time.perf_counter() - t) * 1e3)
            local_s = time.perf_counter() - t0
            bodies = [
                json.dumps(
                    {
                        "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(b).decode()] for b in g]},
                        "params": {"top_k": 5},
                    }
                ).encode()
                for g in groups
            ]
            assert server.post(bodies[0])[0] == 200  # warm-up
            served = []
            t0 = time.perf_counter()
            for body in bodies:
                t = time.perf_counter()
                status, answer = server.post(body)
                served.append((time.perf_counter() - t) * 1e3)
                if status != 200:
                    raise SystemExit(f"HTTP {status}: {answer[:300]!r}")
            served_s = time.perf_counter() - t0
            (l50, l95), (s50, s95) = percentiles(local), percentiles(served)
            print(
                f"batch {batch:>3}: in process p50 {l50:7.1f} ms p95 {l95:7.1f} ms {args.requests / local_s:7.1f} "
                "req/s "
                f"({args.requests * batch / local_s:7.0f} img/s) | served p50 {s50:7.1f} ms p95 {s95:7.1f} ms "
                f"{args.requests / served_s:7.1f} req/s ({args.requests * batch / served_s:7.0f} img/s) | "
                f"overhead x{s50 / l50:.2f} (p50 served / in process)"
            )
    finally:
        server.kill()


if __name__ == "__main__":
    main()
