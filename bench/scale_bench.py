"""What a process pays at start-up and at an elastic resume for the data set's size
(issue: data sets past ImageNet-1k), measured on today's code, simulated: manifests of
synthetic shards (no image bytes are needed for what is measured).

    .venv/bin/python bench/scale_bench.py              # ImageNet-1k and -21k sizes measured, 2B projected
    .venv/bin/python bench/scale_bench.py --dry-run    # tiny sizes, every row (the test suite runs this)

Rows, per data set, for one rank's DataLoader worker at --ranks x --workers slots:
- manifest bytes (JSON with every sample's offset, as pipeline/shard.py writes it);
- the manifest's load time and the peak RSS it adds to one process (a fresh process,
  against a baseline process that imports the same modules and loads nothing);
- the epoch plan of one slot (its positions and their shuffle order);
- the re-plan after an elastic change (--ranks to --elastic-ranks at mid-epoch):
  ``pipeline.data._remaining``, a pass over every position of the epoch in every process.
Sizes too large to run here are projected linearly from the largest measured size,
and printed as such ("projected"), never as measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROBE = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.manifest import load_manifest
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
m = load_manifest(sys.argv[2]) if sys.argv[2] != "-" else None
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kb": before}))
"""


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def write_manifest(folder: str, shards: int, per_shard: int, sample_bytes: int = 110_000) -> str:
    """Today's manifest format (pipeline/shard.py) for ``shards`` synthetic shards."""
    path = os.path.join(folder, "manifest.json")
    offsets = [i * sample_bytes for i in range(per_shard + 1)]
    with open(path, "w") as f:
        f.write('{"split": "train", "num_classes": 21841, "classes": [], "shards": [')
        for s in range(shards):
            entry = {
                "name": f"train-{s:07d}.tar",
                "samples": per_shard,
                "bytes": offsets[-1] + 1024,
                "sha256": f"{s:064x}",
                "offsets": offsets,
            }
            f.write(("," if s else "") + json.dumps(entry, separators=(",", ":")))
        f.write("]}")
    return path


def load_in_fresh_process(path: str) -> tuple[float, float]:
    """(seconds, MB of peak RSS the load adds) in a fresh process."""

    def probe(arg: str) -> dict:
        out = subprocess.run([sys.executable, "-c", PROBE, ROOT, arg], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    base, got = probe("-"), probe(path)
    return got["seconds"], (got["rss_kb"] - base["rss_kb"]) / 1024


def plan_seconds(samples: int, ranks: int, workers: int, batch: int, buffer: int) -> float:
    """One slot's epoch plan: its range of the epoch and the buffer shuffle over it."""
    from pipeline.data import _buffer_rng, _phase_layout, _shuffled

    t = time.perf_counter()
    _, slots = _phase_layout(samples, ranks, workers, batch)
    lo, hi = slots[0]
    list(_shuffled(iter(range(lo, hi)), buffer, _buffer_rng(0, 0, 0, 0, 0)))
    return time.perf_counter() - t


REPLAN = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.data import _remaining
samples, ranks, workers, batch, buffer = map(int, sys.argv[2:7])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if samples:
    _remaining(0, 0, samples, buffer, ((ranks, workers, batch, samples // (ranks * batch) // 2),))
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def replan(samples: int, ranks: int, workers: int, batch: int, buffer: int) -> tuple[float, float]:
    """(seconds, MB of peak RSS added) of the elastic re-plan after half an epoch on
    ``ranks`` (``pipeline.data._remaining``), in a fresh process against one that skips it."""

    def probe(n: int) -> dict:
        argv = [sys.executable, "-c", REPLAN, ROOT, *map(str, (n, ranks, workers, batch, buffer))]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])

    base, got = probe(0), probe(samples)
    return got["seconds"], (got["rss_kb"] - base["rss_kb"]) / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python bench/scale_bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ranks", type=int, default=1024, help="ranks of the layout measured")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank")
    p.add_argument("--elastic-ranks", type=int, default=768, help="ranks after the elastic change")
    p.add_argument("--batch", type=int, default=128, help="micro-batch per rank")
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer (data.shuffle_buffer)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--replan-max",
        type=int,
        default=20_000_000,
        help="largest data set whose elastic re-plan is run; larger ones are projected",
    )
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, every row")
    args = p.parse_args(argv)
    sets = [("ImageNet-1k", 1_281), ("ImageNet-21k", 14_200), ("web, 2B samples", 2_000_000)]
    write_max = 20_000  # shards: the 2B manifest (~20 GB of JSON) is projected, not written
    if args.dry_run:
        args.ranks, args.workers, args.elastic_ranks, args.batch, args.per_shard = 4, 2, 3, 8, 50
        sets, write_max, args.replan_max = [("tiny", 20), ("small", 60), ("projected", 600)], 100, 5_000
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.ranks} ranks x {args.workers} workers, "
        f"batch {args.batch}, {args.per_shard} samples per shard; today's code"
    )
    measured: dict[str, tuple[int, float]] = {}  # row -> (samples, value) of the largest measured set
    for name, shards in sets:
        samples = shards * args.per_shard
        print(f"{name}: {samples:,} samples in {shards:,} shards")
        if shards <= write_max:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_manifest(tmp, shards, args.per_shard)
                size = os.path.getsize(path)
                seconds, rss = load_in_fresh_process(path)
            for row, value in (("bytes", size), ("load_s", seconds), ("load_mb", rss)):
                measured[row] = (samples, value)
            print(f"  manifest {size / 1e6:,.1f} MB | load {seconds:.2f} s, +{rss:,.0f} MB peak RSS in one process")
        else:
            scale = {row: v / n * samples for row, (n, v) in measured.items()}
            print(
                f"  manifest {scale['bytes'] / 1e9:,.1f} GB | load {scale['load_s']:,.0f} s, "
                f"+{scale['load_mb'] / 1e3:,.1f} GB peak RSS in one process "
                f"(projected from {measured['bytes'][0]:,} samples)"
            )
        plan_ms = plan_seconds(samples, args.ranks, args.workers, args.batch, args.buffer) * 1e3
        print(f"  plan of one slot: {plan_ms:.1f} ms")
        if samples <= args.replan_max:
            took, grown = replan(samples, args.ranks, args.workers, args.batch, args.buffer)
            measured["replan_s"], measured["replan_mb"] = (samples, took), (samples, grown)
            print(
                f"  elastic re-plan {args.ranks} -> {args.elastic_ranks} ranks at mid-epoch: {took:.2f} s, "
                f"+{grown:,.0f} MB peak RSS, in every rank and worker"
            )
        else:
            n, took = measured["replan_s"]
            print(
                f"  elastic re-plan {args.ranks} -> {args.elastic_ranks} ranks at mid-epoch: "
                f"{took / n * samples / 3600:,.1f} h (projected from {n:,} samples), in every rank and worker"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
