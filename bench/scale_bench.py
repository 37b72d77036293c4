"""What a process pays at start-up and at an elastic resume for the data set's size
(issue: data sets past ImageNet-1k), measured on the code of this checkout, simulated: manifests of
synthetic shards (no image bytes are needed for what is measured).

    .venv/bin/python bench/scale_bench.py              # ImageNet-1k and -21k sizes measured, 2B projected
    .venv/bin/python bench/scale_bench.py --dry-run    # tiny sizes, every row (the test suite runs this)

Rows, per data set, for one rank's DataLoader worker at --ranks x --workers slots:
- manifest bytes, with every sample's offset inline (the format before 2026-12-07) and
  with the offsets in the split's offsets file (pipeline/shard.py's format now; past
  shard.TABLE_ABOVE shards the list of shards is its binary shard table, counted in);
- the manifest's load time, and a process's start-up (the load and one slot's plan, as
  ``TrainStream._positions`` makes it before its first read) with the peak RSS it adds
  (a fresh process, against a baseline process that imports the same modules);
- the epoch plan of one slot (its positions and their shuffle order);
- the re-plan after an elastic change (--ranks to --elastic-ranks at mid-epoch), for one
  new slot: before 2026-12-07 a pass over every position of the epoch in every process
  (``pipeline.data._remaining_eager``, kept as the reference), now the slot's own share
  (``pipeline.data._Left``).
Sizes too large to run here are projected linearly from the largest measured size,
and printed as such ("projected"), never as measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from reshard_bench import cpu_name  # noqa: E402

# The probes' peak RSS: reset_peak() after their imports (whose transient peak hid what the
# work adds), then peak_kb(): the peak since, over the RSS at the reset.
PEAK = """
def _kb(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field)).split()[1])
def reset_peak():
    global _AT
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _AT = _kb("VmRSS:")
    except OSError:  # (no reset allowed: the peak since the start)
        _AT = 0
def peak_kb():
    return _kb("VmHWM:") - _AT
"""

PROBE = (
    PEAK
    + """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.data import TrainStream, _buffer_rng, _phase_layout, _shuffled
from pipeline.manifest import _Sequence, load_manifest
reset_peak()
ranks, workers, batch, buffer = map(int, sys.argv[3:7])
t = time.perf_counter()
m = load_manifest(sys.argv[2]) if sys.argv[2] != "-" else None
loaded = time.perf_counter()
if m is not None:  # the last rank's last worker, as TrainStream._positions plans it before its first read
    stream = TrainStream(m, batch, rank=ranks - 1, world_size=ranks, shuffle_buffer=buffer)
    _, slots = _phase_layout(len(stream.positions_left(0, ())), ranks, workers, batch)
    lo, hi = slots[-1]
    order = list(_shuffled(iter(range(lo, hi)), buffer, _buffer_rng(0, 0, ranks - 1, workers - 1, 0)))
    seq = _Sequence(m, stream._order())
took = time.perf_counter() - t
out = {"load_s": loaded - t, "seconds": took, "rss_kb": peak_kb()}
print(json.dumps(out))
"""
)


def write_manifest(
    folder: str, shards: int, per_shard: int, inline: bool, sample_bytes: int = 110_000, table_above: int | None = None
) -> str:
    """A manifest for ``shards`` synthetic shards: every sample's offset inline (the format
    before 2026-12-07) or in the offsets file (``pipeline/shard.py``'s now), its shards
    listed in JSON or, past ``table_above`` shards (``shard.TABLE_ABOVE``), in the binary
    shard table (written: a process maps it). The offsets file itself is not written:
    loading a manifest and planning do not read it (a shard's offsets are read when that
    shard is opened)."""
    import numpy as np

    from pipeline import shard

    table_above = shard.TABLE_ABOVE if table_above is None else table_above
    path = os.path.join(folder, "manifest.json")
    offsets = [i * sample_bytes for i in range(per_shard + 1)]
    head = {"split": "train", "num_classes": 21841, "classes": []}
    if not inline:
        head["offsets"] = {"file": "offsets.bin", "bytes": 8 * shards * (per_shard + 1), "sha256": "0" * 64}
    if not inline and shards > table_above:  # the binary shard table, from columns
        digests = np.zeros((shards, 32), np.uint8)
        digests[:, 24:] = np.arange(shards, dtype=">u8").view(np.uint8).reshape(shards, 8)
        head["shard_table"] = shard.write_table(
            os.path.join(folder, shard.SHARD_TABLE),
            "train",
            np.full(shards, per_shard),
            np.full(shards, offsets[-1] + 1024),
            digests.view("S32").ravel(),
        )
        with open(path, "w") as f:
            json.dump(head, f)
        return path
    with open(path, "w") as f:
        f.write(json.dumps(head)[:-1] + ', "shards": [')
        for s in range(shards):
            entry = {
                "name": shard.shard_name("train", s),
                "samples": per_shard,
                "bytes": offsets[-1] + 1024,
                "sha256": f"{s:064x}",
            }
            if inline:
                entry["offsets"] = offsets
            f.write(("," if s else "") + json.dumps(entry, separators=(",", ":")))
        f.write("]}")
    return path


def in_fresh_process(script: str, idle: list[str], work: list[str]) -> tuple[dict, float]:
    """(what ``script`` printed, MB of peak RSS added) given ``work`` in a fresh process,
    against the same script given ``idle`` (its imports alone)."""

    def probe(args: list[str]) -> dict:
        argv = [sys.executable, "-c", script, ROOT, *args]
        return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])

    base, got = probe(idle), probe(work)
    return got, (got["rss_kb"] - base["rss_kb"]) / 1024


def plan_seconds(samples: int, ranks: int, workers: int, batch: int, buffer: int) -> float:
    """One slot's epoch plan: its range of the epoch and the buffer shuffle over it."""
    from pipeline.data import _buffer_rng, _phase_layout, _shuffled

    t = time.perf_counter()
    _, slots = _phase_layout(samples, ranks, workers, batch)
    lo, hi = slots[0]
    list(_shuffled(iter(range(lo, hi)), buffer, _buffer_rng(0, 0, 0, 0, 0)))
    return time.perf_counter() - t


REPLAN = (
    PEAK
    + """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from pipeline.data import _phase_layout, _remaining, _remaining_eager
reset_peak()
mode = sys.argv[2]
samples, ranks, new_ranks, workers, batch, buffer = map(int, sys.argv[3:9])
history = ((ranks, workers, batch, samples // (ranks * batch) // 2),)
t = time.perf_counter()
if mode == "eager":  # the code before 2026-12-07: the whole epoch's leftovers, in every process
    _remaining_eager(0, 0, samples, buffer, history)
elif mode == "lazy":  # now: one new slot's share
    left = _remaining(0, 0, samples, buffer, history)
    lo, hi = _phase_layout(len(left), new_ranks, workers, batch)[1][0]
    sorted(left[lo:hi])
took = time.perf_counter() - t
print(json.dumps({"seconds": took, "rss_kb": peak_kb()}))
"""
)


def replan(mode: str, samples: int, ranks: int, new_ranks: int, workers: int, batch: int, buffer: int):
    """(seconds, MB of peak RSS added) of the elastic re-plan for one slot after half an
    epoch on ``ranks``, in a fresh process against one that skips it: ``eager`` (the whole
    epoch's leftovers, the code before 2026-12-07) or ``lazy`` (``pipeline.data._Left``)."""
    numbers = [str(n) for n in (samples, ranks, new_ranks, workers, batch, buffer)]
    got, grown = in_fresh_process(REPLAN, ["none", *numbers], [mode, *numbers])
    return got["seconds"], grown


def first_batch_from_store(images: int, per_shard: int, scale: float) -> tuple[list[float], int]:
    """([seconds from a fresh process to its first batch, for two ranks of one node in
    turn], GETs of the manifest by both) for a rank of 2 DataLoader workers reading a
    real set of ``images`` synthetic JPEGs (``pipeline/shard.py``) from the moto server
    through the fault proxy, with the node's shard cache. What the data set's size adds
    to it is the manifest's load (the rows above)."""
    import argparse as _argparse

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import peer_bench as peers
    from s3_server import FaultProxy, S3Server

    with tempfile.TemporaryDirectory() as tmp, S3Server() as s3, FaultProxy(s3.port) as proxy:
        os.environ.update(s3.env(proxy.url))
        s3.bucket(peers.BUCKET)
        src = peers.make_synthetic(os.path.join(tmp, "src"), images, scale)
        folder = peers.write("ours", src, os.path.join(tmp, "ours"), per_shard)
        remote = peers.upload(os.path.dirname(folder), s3, "ours")
        where = peers.Where(folder, remote, proxy.url, os.path.join(tmp, "node-cache"))
        args = _argparse.Namespace(batch=32, workers=2)
        seconds = []
        for _ in range(2):
            got = peers.first_batch_s("ours", where, args)
            if "failed" in got:
                raise RuntimeError(f"the first batch from the store failed: {got['failed']}")
            seconds.append(got["seconds"])
        gets = sum(
            n for (method, path), n in proxy.counts.items() if method == "GET" and path.endswith("manifest.json")
        )
        return seconds, gets


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
    # shards written per format: the inline 2B manifest (~20 GB of JSON) is projected, not written
    write_max = {"inline offsets (before)": 20_000, "offsets file (now)": 2_000_000}
    from pipeline import shard

    table_above = shard.TABLE_ABOVE  # past it, shard.py lists the shards in its binary table
    if args.dry_run:
        args.ranks, args.workers, args.elastic_ranks, args.batch, args.per_shard = 4, 2, 3, 8, 50
        sets, args.replan_max = [("tiny", 20), ("small", 60), ("projected", 600)], 5_000
        write_max = {"inline offsets (before)": 100, "offsets file (now)": 600}
        table_above = 100  # the largest tiny set in the shard table, as 2B samples are
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.ranks} ranks x {args.workers} workers, "
        f"batch {args.batch}, {args.per_shard} samples per shard"
    )
    measured: dict[str, tuple[int, float]] = {}  # row -> (samples, value) of the largest measured set
    for name, shards in sets:
        samples = shards * args.per_shard
        print(f"{name}: {samples:,} samples in {shards:,} shards")
        for form, most in write_max.items():
            if shards <= most:
                with tempfile.TemporaryDirectory() as tmp:
                    path = write_manifest(
                        tmp, shards, args.per_shard, inline=form.startswith("inline"), table_above=table_above
                    )
                    size = sum(os.path.getsize(os.path.join(tmp, n)) for n in os.listdir(tmp))
                    layout = [str(n) for n in (args.ranks, args.workers, args.batch, args.buffer)]
                    got, rss = in_fresh_process(PROBE, ["-", *layout], [path, *layout])
                rows = {"bytes": size, "load_s": got["load_s"], "start_s": got["seconds"], "mb": rss}
                for row, value in rows.items():
                    measured[form + row] = (samples, value)
                kind = " (JSON list)" if form.startswith("inline") or shards <= table_above else " (shard table)"
                print(
                    f"  {form}: manifest{kind} {size / 1e6:,.1f} MB | load {got['load_s']:.2f} s; start-up "
                    f"(load and one slot's plan) {got['seconds']:.2f} s, +{rss:,.0f} MB peak RSS in one process"
                )
            else:
                n = measured[form + "bytes"][0]
                rows = {row: measured[form + row][1] / n * samples for row in ("bytes", "load_s", "start_s", "mb")}
                print(
                    f"  {form}: manifest {rows['bytes'] / 1e9:,.1f} GB | load {rows['load_s']:,.0f} s; start-up "
                    f"{rows['start_s']:,.0f} s, +{rows['mb'] / 1e3:,.1f} GB peak RSS in one process "
                    f"(projected from {n:,} samples)"
                )
        plan_ms = plan_seconds(samples, args.ranks, args.workers, args.batch, args.buffer) * 1e3
        print(f"  plan of one slot: {plan_ms:.1f} ms")
        change = f"elastic re-plan {args.ranks} -> {args.elastic_ranks} ranks at mid-epoch"
        if samples <= args.replan_max:
            took, grown = replan(
                "eager", samples, args.ranks, args.elastic_ranks, args.workers, args.batch, args.buffer
            )
            measured["replan_s"] = (samples, took)
            print(f"  {change}, before (the whole epoch): {took:.2f} s, +{grown:,.0f} MB peak RSS, in every process")
        else:
            n, took = measured["replan_s"]
            print(
                f"  {change}, before (the whole epoch): {took / n * samples / 3600:,.1f} h "
                f"(projected from {n:,} samples), in every process"
            )
        took, grown = replan("lazy", samples, args.ranks, args.elastic_ranks, args.workers, args.batch, args.buffer)
        print(f"  {change}, now (one new slot's share): {took:.2f} s, +{grown:,.0f} MB peak RSS")
    images, per_shard, scale = (48, 12, 0.3) if args.dry_run else (1000, 100, 1.0)
    (first, second), gets = first_batch_from_store(images, per_shard, scale)
    print(
        f"time to the first batch (batch 32, 2 workers) from the moto server through the fault proxy, node cache on, "
        f"{images:,} real JPEGs: {first:.2f} s for the node's first rank, {second:.2f} s for its second; "
        f"manifest GETs by the two: {gets}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
