"""What the optimizer state by name (pipeline/reshard.py) costs a checkpoint: TNT-S,
one rank, bf16, after one AdamW step, for ZeRO-1 (BF16_Optimizer) and ZeRO-2.

    .venv/bin/python bench/reshard_bench.py [--variant tntp_s_patch16_224] [--stages 1 2]

Per stage, in the same run: DeepSpeed's own ``save_checkpoint`` (its files: the
baseline) against our gather + ``optim.safetensors`` write, in seconds and MB, and
the ratio; the load of that state into a fresh engine (what a resume on another
number of ranks does instead of DeepSpeed's load) against ``load_checkpoint``. The
ceiling: the seconds to write the same number of bytes as one raw file (fsynced) on
the same disk, so that a ratio can be read against the disk it ran on. One rank
measures the copies and the file; the gathers' all-reduces over a real network add
(3 x 4 bytes per parameter) / bandwidth on top.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1e6


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def raw_write_s(path: str, nbytes: int) -> float:
    """Seconds to write ``nbytes`` as one file, fsynced: the disk's ceiling for a save."""
    block = os.urandom(1 << 24)

    def write():
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
            f.flush()
            os.fsync(f.fileno())

    s = timed(write)
    os.remove(path)
    return s


def engine_for(variant: str, stage: int):
    import deepspeed
    import torch

    from pipeline import tnt

    torch.manual_seed(0)
    model = tnt.create(variant, num_classes=1000)
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
        "zero_allow_untested_optimizer": True,
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "steps_per_print": 1 << 30,
    }
    opt = torch.optim.AdamW(tnt.param_groups(model, 0.05), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tntp_s_patch16_224", help="model variant (pipeline/tnt.py)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2], help="ZeRO stages to measure")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args()

    import torch

    from pipeline import reshard
    from pipeline.checkpoint import fsync_tree
    from pipeline.distributed import init_distributed

    init_distributed(600)
    work = tempfile.mkdtemp(prefix="reshard_bench_", dir=args.dir)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; {args.variant}, 1 "
        f"rank, bf16; in {work}"
    )
    for stage in args.stages:
        engine = engine_for(args.variant, stage)
        x = torch.randn(2, 3, 224, 224, dtype=torch.bfloat16)
        loss = engine(x).float().logsumexp(-1).mean()
        engine.backward(loss)
        engine.step()
        ds_dir, ours = os.path.join(work, f"ds{stage}"), os.path.join(work, f"ours{stage}", "optim.safetensors")
        os.makedirs(os.path.dirname(ours))
        # both fsynced, as pipeline/checkpoint.py does before a checkpoint counts as complete
        t_ds = timed(lambda: (engine.save_checkpoint(ds_dir, tag="t", save_latest=False), fsync_tree(ds_dir)))
        box = {}
        t_gather = timed(lambda: box.update(zip(("state", "step"), reshard.gather(engine))))
        t_write = timed(lambda: (reshard.save(ours, box["state"], box["step"]), fsync_tree(os.path.dirname(ours))))
        mb_ds, mb_ours = folder_mb(ds_dir), os.path.getsize(ours) / 1e6
        ceiling = raw_write_s(os.path.join(work, "raw"), int(mb_ours * 1e6))
        fresh = engine_for(args.variant, stage)
        t_load = timed(lambda: reshard.load(fresh, *reshard.read(ours)))
        t_ds_load = timed(lambda: engine.load_checkpoint(ds_dir, tag="t"))
        ours_s = t_gather + t_write
        print(
            f"ZeRO-{stage}: DeepSpeed save {t_ds:6.2f} s {mb_ds:7.1f} MB | by name: gather {t_gather:5.2f} s + write "
            f"{t_write:5.2f} s = {ours_s:5.2f} s {mb_ours:7.1f} MB | save time x{(t_ds + ours_s) / t_ds:.2f}, "
            f"size x{(mb_ds + mb_ours) / mb_ds:.2f} | disk ceiling for {mb_ours:.0f} MB: {ceiling:.2f} s"
        )
        print(
            f"        load by name {t_load:5.2f} s vs DeepSpeed's load {t_ds_load:5.2f} s (x{t_load / t_ds_load:.2f})"
        )
        engine = fresh = box = None  # freed before the next stage's engine
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
