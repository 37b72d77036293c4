"""Training metrics: a window of steps reduced over ranks, and the sinks they go to.

Keys are ``split/name`` (``train/loss``, ``val/top1``, ``data/bad_samples``). One
:meth:`MetricsProcessor.log` per logging step reduces the window over all ranks in one
all-reduce (the loss sum stays on the device until then: no host sync per
micro-batch) and hands the result to every sink; the trainer does not know how many
sinks there are (MLflow on rank 0, ``metrics.jsonl`` on rank 0).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import torch
import torch.distributed as dist

from pipeline import mfu

log = logging.getLogger("tntpipe.train")


class JsonlSink:
    """``<out>/metrics.jsonl``: the log survives a tracking outage."""

    def __init__(self, path: str):
        self.path = path

    def log(self, metrics: dict, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        pass


class MetricsProcessor:
    def __init__(
        self,
        sinks: list,
        world: int,
        device: torch.device,
        flops_per_image: float,
        peak_tflops: float | None,
        log_every: int = 1,
        total_steps: int = 0,
    ):
        self.sinks = sinks
        self.log_every, self.total_steps = log_every, total_steps
        self.world = world
        self.device = device
        self.flops_per_image = flops_per_image
        self.peak = peak_tflops
        self.reset()

    def reset(self) -> None:
        """A new window from now (the trainer calls it before its first step: set-up and
        resuming are not training time)."""
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.images = 0
        self.wait = 0.0  # seconds waiting for the loader
        self.excluded = 0.0  # seconds of evaluation and checkpoints, not counted in img/s
        self.grad_norm = None  # of the window's last optimizer step (before clipping), as DeepSpeed gives it
        self.start = time.perf_counter()

    def should_log(self, step: int) -> bool:
        """Every ``train.log_every`` optimizer steps, and at the last."""
        return step % self.log_every == 0 or step == self.total_steps

    def optimizer_step(self, grad_norm: float | None) -> None:
        """An optimizer step ended: its gradient norm (before clipping, as DeepSpeed gives it)."""
        self.grad_norm = grad_norm

    def micro_batch(self, loss: torch.Tensor, images: int, wait: float) -> None:
        self.loss += loss.detach().double()
        self.micro_batches += 1
        self.images += images
        self.wait += wait

    @contextlib.contextmanager
    def paused(self):
        """Time inside is not training time (evaluation, checkpoints)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t

    def log(self, step: int, total: int, epoch: int, lr: float, bad: dict[str, int]) -> dict:
        """Synchronizes ranks: one all-reduce of the window and of the bad-data counters
        (each rank's loader counts its own)."""
        stats = torch.stack(
            [
                self.loss,
                *(
                    torch.tensor(float(v), dtype=torch.float64, device=self.device)
                    for v in (self.micro_batches, self.images, self.wait, bad["bad_samples"], bad["bad_shards"])
                ),
            ]
        )
        dist.all_reduce(stats)
        loss_sum, n, images, wait, bad_samples, bad_shards = stats.tolist()
        dt = max(1e-9, time.perf_counter() - self.start - self.excluded)
        ips = images / dt
        metrics = {
            "train/loss": loss_sum / max(1.0, n),
            "train/lr": lr,
            "train/img_per_s": ips,
            "train/img_per_s_per_rank": ips / self.world,
            "train/data_wait": wait / self.world / dt,
            "data/bad_samples": int(bad_samples),
            "data/bad_shards": int(bad_shards),
        }
        if self.grad_norm is not None:  # the same on every rank (computed over all of them)
            metrics["train/grad_norm"] = float(self.grad_norm)
        util = mfu.mfu(ips / self.world, self.flops_per_image, self.peak)
        if util is not None:
            metrics["train/mfu"] = util
        log.info(
            "epoch %d step %d/%d | loss %.4f | lr %.2e | %.0f img/s (%.0f/rank) | data wait %.0f%%%s%s",
            epoch,
            step,
            total,
            metrics["train/loss"],
            lr,
            ips,
            ips / self.world,
            100 * metrics["train/data_wait"],
            f" | MFU {100 * util:.1f}%" if util is not None else "",
            f" | bad samples {int(bad_samples)}, shards {int(bad_shards)}" if bad_samples or bad_shards else "",
        )
        self.record(metrics, step)
        self.reset()
        return metrics

    def record(self, metrics: dict, step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def sinks_for(rank: int, out: str, tracker) -> list:
    """Rank 0 writes; other ranks reduce but keep nothing."""
    if rank != 0:
        return []
    os.makedirs(out, exist_ok=True)
    return [tracker, JsonlSink(os.path.join(out, "metrics.jsonl"))]
