"""Training step throughput: DeepSpeed ZeRO 0/1/2 vs plain PyTorch DDP, CPU, 2 ranks.

    .venv/bin/python bench/train_bench.py [--variant tntp_tiny_patch8_32] [--batch 64] [--steps 30]

Same model, same inputs (a fixed set of random images, so the data loader is not
measured: bench/loader_bench.py does that), same precision (bf16: DeepSpeed's bf16
engine vs DDP under bf16 autocast with fp32 weights), torch AdamW in both, gloo.
Prints images/s (after warm-up steps), the ratio to DDP, and peak memory (max RSS)
per rank. Run it once more with ``--variant tntp_s_patch16_224 --batch 4 --steps 4``
to see memory at TNT-S size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from pipeline import tnt
    from pipeline.distributed import init_distributed
    from pipeline.train import soft_cross_entropy

    rank, world, _ = init_distributed()
    torch.manual_seed(0)
    model = tnt.create(args.variant, num_classes=10)
    size = model.pixel_embed.img_size[0]
    g = torch.Generator().manual_seed(rank)
    data = [
        (
            torch.randn(args.batch, 3, size, size, generator=g),
            torch.nn.functional.one_hot(torch.randint(0, 10, (args.batch,), generator=g), 10).float(),
        )
        for _ in range(4)
    ]
    optimizer = torch.optim.AdamW(tnt.param_groups(model, 0.05), lr=1e-4)
    if args.mode == "ddp":
        net = torch.nn.parallel.DistributedDataParallel(model)

        def step(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = soft_cross_entropy(net(x).float(), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        import deepspeed

        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config={
                "train_micro_batch_size_per_gpu": args.batch,
                "gradient_accumulation_steps": 1,
                "train_batch_size": args.batch * world,
                "zero_optimization": {"stage": args.stage},
                "bf16": {"enabled": True},
                "zero_allow_untested_optimizer": True,
                "steps_per_print": 1 << 30,
            },
        )

        def step(x, y):
            loss = soft_cross_entropy(engine(x.bfloat16()).float(), y)
            engine.backward(loss)
            engine.step()

    for i in range(args.warmup):
        step(*data[i % len(data)])
    dist.barrier()
    t = time.perf_counter()
    for i in range(args.steps):
        step(*data[i % len(data)])
    dist.barrier()
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB
    stats = [None] * world
    dist.all_gather_object(stats, rss)
    if rank == 0:
        with open(args.result, "w") as f:
            json.dump({"img_s": args.steps * args.batch * world / dt, "rss": stats}, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tntp_tiny_patch8_32")
    p.add_argument("--batch", type=int, default=64, help="micro-batch per rank")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return worker(args)
    from launch.local import launch

    print(f"{args.variant}, micro-batch {args.batch} x {args.nproc} ranks, bf16, CPU gloo, {args.steps} timed steps")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, stage in [("ddp", 0), ("ds", 0), ("ds", 1), ("ds", 2)]:
            result = os.path.join(tmp, f"{mode}{stage}.json")
            common = [
                "--variant",
                args.variant,
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            env = dict(os.environ, PYTHONWARNINGS="ignore")
            status = launch(
                args.nproc,
                [*common, "--mode", mode, "--stage", str(stage), "--result", result],
                entry=(__file__,),
                env=env,
            )
            assert status == 0, f"{mode} {stage} failed"
            with open(result) as f:
                rows.append((("DDP (torch)" if mode == "ddp" else f"DeepSpeed ZeRO-{stage}"), json.load(f)))
    base = rows[0][1]["img_s"]
    for name, r in rows:
        print(
            f"  {name:<18} {r['img_s']:8.1f} img/s  {r['img_s'] / base:5.2f}x   peak RSS per rank: "
            + ", ".join(f"{m:,.0f} MiB" for m in r["rss"])
        )


if __name__ == "__main__":
    main()
