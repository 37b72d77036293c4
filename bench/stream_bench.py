"""Shards in an object store vs on local disk: loader images/s, bytes read, builder time.

    .venv/bin/python bench/stream_bench.py [--images 2000] [--workers 2]

One run, one data set (``--images`` crops of scikit-learn's photos, ~500x375 q90,
ImageNet-like, 200 per shard), served by a real S3-compatible server on 127.0.0.1
(moto's server mode, tests/s3_server.py: a single Python process, far slower than S3
or MinIO, so the remote rows are a lower bound):

  - builder: ``shard.py SRC --out DIR`` vs ``--out s3://...`` (built, uploaded).
  - raw bytes: every shard read whole, no decoding: local disk vs the server (MB/s).
  - loader: one epoch of the full DeiT/TNT training recipe (224 px), ``--workers``
    DataLoader workers, after a warm-up epoch on local disk: local disk (baseline),
    the store streamed (no cache), the store into a cold cache, the warm cache.
  - samples read, not decoded, one slot in-process: local disk, the store streamed,
    the warm cache (the store's own cost, apart from decoding).
  - bytes read per epoch / data set bytes, for 2 and 64 slots (ranks x workers,
    simulated in-process on positions only, no decoding), and for a resume half-way.

Every ratio is against the local-disk figure of the same run; the machine's CPU is
printed with them (CPUs differ: the ratios, not the absolute figures, carry over).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.dirname(os.path.abspath(__file__))]

from reshard_bench import cpu_name  # noqa: E402
from s3_server import S3Server  # noqa: E402
from shard_bench import make_synthetic, timed, warm  # noqa: E402

from pipeline import shard, store  # noqa: E402
from pipeline.data import Loader, TrainStream  # noqa: E402
from pipeline.manifest import _Reporter, _Sequence, load_manifest  # noqa: E402
from pipeline.transforms import Augment  # noqa: E402


def build(src: str, out: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        assert shard.main([src, "--out", out, "--shard-size", "200", "--quiet", "--workers", "2"]) == 0


def loader_rate(manifest, workers: int, batch: int, epoch: int) -> float:
    """images/s over one epoch, the first batch (worker start-up) not timed."""
    loader = Loader(TrainStream(manifest, batch, augment=Augment(img_size=224)), workers=workers)
    it = iter(loader.epoch(epoch))
    next(it)
    n, t = 0, time.perf_counter()
    for b in it:
        n += len(b["key"])
    return n / (time.perf_counter() - t)


def bytes_per_epoch(manifest, world: int, workers: int, batch: int, half: bool = False) -> int:
    """Bytes the store returns for one epoch of every slot (raw samples, not decoded)."""
    store.Stats.reset()
    for rank in range(world):
        stream = TrainStream(manifest, batch, rank=rank, world_size=world, augment=Augment.light(32))
        for w in range(workers):
            total = stream.worker_batches(w, workers) * batch
            skip = total // 2 if half else 0
            for _ in zip(range(total - skip), stream._positions(w, workers, _Reporter("bench"), skip=skip)):
                pass
    return store.Stats.bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic ImageNet-sized JPEGs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the loader rows")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="loader epochs per row (interleaved; best kept)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="stream_bench-")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.images} images; workers {args.workers}; in {work}")
    try:
        src = make_synthetic(os.path.join(work, "src"), args.images)
        files, size = warm(src)
        with S3Server() as server:
            os.environ.update(server.env())
            server.bucket("bench")
            t_local = timed(lambda: build(src, os.path.join(work, "local")))
            t_s3 = timed(lambda: build(src, "s3://bench/data"))
            print(
                f"builder: {files} files, {size / 1e6:.1f} MB | to disk {t_local:.1f} s | to the store {t_s3:.1f} s "
                f"({t_local / t_s3:.2f}x of disk speed)"
            )
            local = load_manifest(os.path.join(work, "local", "train"))
            remote = load_manifest("s3://bench/data/train")
            total = sum(local.shard_bytes)

            def read_all(m):
                for url, n in zip(m.urls, m.shard_bytes):
                    with store.open_range(url, 0, n) as f:
                        while f.read(1 << 22):
                            pass

            warm(os.path.join(work, "local"))
            r_local = total / timed(lambda: read_all(local)) / 1e6
            r_s3 = total / timed(lambda: read_all(remote)) / 1e6
            print(
                f"raw read, {total / 1e6:.1f} MB: local {r_local:,.0f} MB/s | server {r_s3:,.0f} MB/s "
                f"({r_s3 / r_local:.3f}x)"
            )

            loader_rate(local, args.workers, args.batch, 0)  # warm-up: page cache, imports, JIT
            cache = store.ShardCache(os.path.join(work, "cache"))
            cached = load_manifest("s3://bench/data/train", store=store.Store(cache=cache))
            rows: dict[str, list[float]] = {}
            for _ in range(args.repeats):  # interleaved, best of: the same epoch for every row
                shutil.rmtree(cache.root, ignore_errors=True)
                for name, m in (
                    ("local disk (baseline)", local),
                    ("store, streamed (no cache)", remote),
                    ("store, cold cache (1st epoch)", cached),
                    ("store, warm cache", cached),
                ):
                    rows.setdefault(name, []).append(loader_rate(m, args.workers, args.batch, 1))
            base = max(rows["local disk (baseline)"])
            print(f"loader, full recipe at 224 px, batch {args.batch}, best of {args.repeats}:")
            for name, r in rows.items():
                print(f"  {name:<32} {max(r):8.1f} img/s  {max(r) / base:5.2f}x")
            # The store's own cost, without the decoding that dominates (and adds noise to) the rows above
            raw: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, m in (
                    ("local disk (baseline)", local),
                    ("store, streamed (no cache)", remote),
                    ("store, warm cache", cached),
                ):
                    raw.setdefault(name, []).append(timed(lambda m=m: bytes_per_epoch(m, 1, 1, 8)))
            n = local.num_samples // 8 * 8
            print(f"samples read, not decoded (one slot, in-process), best of {args.repeats}:")
            for name, t in raw.items():
                print(f"  {name:<32} {n / min(t):8.0f} samples/s  {min(raw['local disk (baseline)']) / min(t):5.2f}x")
            for world, workers in ((1, 2), (16, 4)):
                b = bytes_per_epoch(remote, world, workers, 8)
                print(
                    f"bytes read per epoch, {world * workers} slots: {b / 1e6:.1f} MB of {total / 1e6:.1f} MB = "
                    f"{b / total:.3f}x"
                )
            full, rest = bytes_per_epoch(local, 1, 2, 8), bytes_per_epoch(local, 1, 2, 8, half=True)
            gap, _Sequence.gap_bytes = _Sequence.gap_bytes, 0  # exact ranges: just the samples still to use
            needed = bytes_per_epoch(local, 1, 2, 8, half=True)
            _Sequence.gap_bytes = gap
            print(
                f"resume half-way through the epoch, 2 slots: reads {rest / 1e6:.1f} MB; the samples not yet used "
                f"(the shuffle buffers' and the rest) are {needed / 1e6:.1f} MB ({rest / needed:.3f}x); a whole epoch "
                f"{full / 1e6:.1f} MB"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
