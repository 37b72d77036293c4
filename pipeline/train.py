"""Train TNT from the shards with DeepSpeed ZeRO, track and register it in MLflow.

    python -m pipeline.train --config configs/tnt_s.yaml                 # one process
    python launch/local.py --nproc 8 -- --config configs/tnt_s.yaml      # one machine
    python launch/slurm.py --nodes 4 -- --config configs/tnt_s.yaml      # a cluster

Rank, world size and rendezvous come from the usual environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun and our launchers set
them; with none set it is one process. NCCL on GPUs, gloo on CPU (DeepSpeed's CPU
accelerator).

Output directory (``train.out``): ``checkpoints/<tag>/`` (DeepSpeed ZeRO files plus
our ``meta.json``, ``rng_rank<r>.pt``, ``ema.safetensors``, ``COMPLETE``),
``checkpoints/latest`` (the newest *complete* checkpoint: written last, atomically, so
a crash mid-save leaves the previous one in force), ``export/`` (consolidated fp32
weights in timm's layout as safetensors, loadable without DeepSpeed), ``config.yaml``,
``train.log``. Restarting with the same output directory resumes from ``latest``,
mid-epoch, into the same MLflow run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
import torch.distributed as dist
import yaml

from pipeline import config as config_mod
from pipeline import tnt
from pipeline.data import EvalStream, Loader, TrainStream, load_manifest
from pipeline.imagenet import InputError
from pipeline.tracking import Tracker, default_uri

log = logging.getLogger("tntpipe.train")

# Dense bf16 peak TFLOP/s by device name, for MFU (a config value overrides).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


@contextlib.contextmanager
def weights_only_loads():
    """Make every ``torch.load`` inside (DeepSpeed's checkpoint engine and zero_to_fp32
    call it with ``weights_only=False``) a ``weights_only=True`` load that allows just
    the DeepSpeed data classes its checkpoints hold: loading a checkpoint can then
    not run arbitrary code. Checked on ZeRO 0-3 with bf16, fp16 and fp32 checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        torch.load = original


class CheckpointSignal:
    """SIGUSR2 (Slurm's time-limit/preemption signal via submitit): noted, acted on at
    the next optimizer step by all ranks together (see ``launch/slurm.py``)."""

    def __init__(self):
        self.received = False
        self.frame = None
        self.previous = None
        if hasattr(signal, "SIGUSR2") and threading.current_thread() is threading.main_thread():
            self.previous = signal.getsignal(signal.SIGUSR2)
            signal.signal(signal.SIGUSR2, self._note)

    def _note(self, signum, frame) -> None:
        self.received, self.frame = True, frame

    def hand_over(self) -> None:
        """After our checkpoint: let the previous handler (submitit: requeue) act."""
        if callable(self.previous) and self.previous not in (signal.SIG_IGN, signal.SIG_DFL):
            self.previous(signal.SIGUSR2, self.frame)


class Requeued(Exception):
    """Checkpointed on SIGUSR2; the job is being requeued (or should be re-run)."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example: repeated non-finite losses)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; one process if unset."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        import deepspeed

        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return rank, world, local


def setup_logging(rank: int, out_dir: str | None) -> None:
    """Rank 0 logs INFO to stderr and train.log; other ranks only warnings."""
    root = logging.getLogger("tntpipe")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname).1s " + (f"[rank {rank}] " if rank else "") + "%(message)s", "%H:%M:%S")
    handler = logging.StreamHandler()
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if out_dir and rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def lr_at(step: int, cfg: config_mod.OptimCfg, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from warmup_lr, then cosine to min_lr, per optimizer step."""
    if step < warmup:
        return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()


class EMA:
    """Weight EMA kept in fp32 (timm's ModelEmaV3), updated from the module.

    Under bf16/fp16 DeepSpeed keeps the module in 16 bits and the fp32 masters in
    the (partitioned) optimizer; the EMA accumulates the 16-bit weights in fp32,
    which keeps decays like 0.99996 meaningful (a 16-bit EMA would not move)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        from timm.utils import ModelEmaV3

        device = None if torch.cuda.is_available() else torch.device("cpu")
        self.ema = ModelEmaV3(module, decay=decay, dtype=torch.float32, device=device)

    def update(self, module: torch.nn.Module) -> None:
        self.ema.update(module)

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module


class Trainer:
    def __init__(self, cfg: config_mod.Config):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        self.rank, self.world, self.local_rank = init_distributed()
        self.out = cfg.out_dir
        setup_logging(self.rank, self.out)
        self.ckdir = os.path.join(self.out, "checkpoints")
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        t = cfg.train
        if t.zero_stage == 3 and t.ema:
            raise InputError("train.ema needs the full weights on every rank: use train.zero_stage<=2 or train.ema=false")
        if t.precision not in ("bf16", "fp16", "fp32"):
            raise InputError(f"train.precision must be bf16, fp16 or fp32, not {t.precision!r}")
        if t.precision == "fp16" and not get_accelerator().is_fp16_supported():
            # DeepSpeed's CPU accelerator has fp16 only where oneDNN has fp16 kernels
            # (AVX512-FP16/AMX-FP16); say so before any work, not from inside DeepSpeed
            raise InputError(f"train.precision=fp16 is not supported by DeepSpeed on this device "
                             f"({get_accelerator().device_name()}); use train.precision=bf16")
        if t.zero_stage == 0 and t.precision != "fp32":
            log.warning(
                "ZeRO stage 0 with %s: DeepSpeed then updates the 16-bit weights directly (no fp32 master copy); "
                "use train.zero_stage>=1 for fp32 masters (same memory per rank as DDP plus a partitioned fp32 copy)",
                t.precision,
            )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t.precision]
        url_base = cfg.data.url_base or None
        self.train_manifest = load_manifest(cfg.data.train, url_base)
        self.val_manifest = load_manifest(cfg.data.val, url_base) if cfg.data.val else None

        torch.manual_seed(t.seed)
        model = tnt.create(
            cfg.model.variant,
            num_classes=self.train_manifest.num_classes,
            drop_path_rate=cfg.model.drop_path,
            img_size=cfg.aug.img_size,
        )
        model.grad_checkpointing = cfg.model.checkpointing
        if cfg.model.init_from:
            from safetensors.torch import load_file

            tnt.load_timm_state_dict(model, load_file(cfg.model.init_from))
            log.info("weights from %s", cfg.model.init_from)
        self.flops_per_image = 3 * tnt.count_flops(model)["flops"]  # forward + backward ~ 3x forward
        self.num_params = tnt.count_params(model)

        self.loader = Loader(
            TrainStream(
                self.train_manifest,
                t.micro_batch,
                rank=self.rank,
                world_size=self.world,
                seed=t.seed,
                augment=cfg.aug,
                repeats=cfg.data.repeats,
                shuffle_buffer=cfg.data.shuffle_buffer,
            ),
            workers=cfg.data.workers,
        )
        self.val_loader = None
        if self.val_manifest:
            eval_batch = cfg.data.eval_batch or t.micro_batch
            self.val_loader = Loader(
                EvalStream(self.val_manifest, eval_batch, rank=self.rank, world_size=self.world, augment=cfg.aug),
                workers=cfg.data.workers,
            )
        self.global_batch = t.micro_batch * t.grad_accum * self.world
        self.steps_per_epoch = len(self.loader) // t.grad_accum
        if self.steps_per_epoch == 0:
            raise InputError(f"an epoch has {len(self.loader)} micro-batches, fewer than train.grad_accum={t.grad_accum}")
        o = cfg.optim
        self.total_steps = o.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.base_lr = o.lr * self.global_batch / o.lr_batch
        warmup = int(o.warmup_epochs * self.steps_per_epoch)
        optimizer = torch.optim.AdamW(tnt.param_groups(model, o.weight_decay), lr=self.base_lr, betas=o.betas, eps=o.eps)
        sched_total = o.epochs * self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, o, self.base_lr, warmup, sched_total) / self.base_lr
        )
        ds_config = {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": self.global_batch,
            "zero_optimization": {"stage": t.zero_stage},
            "bf16": {"enabled": t.precision == "bf16"},
            "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built FusedAdam on CPU
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if o.clip_grad > 0:
            ds_config["gradient_clipping"] = o.clip_grad
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        self.ema = EMA(self.engine.module, t.ema_decay) if t.ema else None
        self.step = 0
        self.best_top1 = -1.0
        self.nonfinite = 0
        self.signal = CheckpointSignal()
        self.run_id: str | None = None
        self.tracker = Tracker(
            cfg.mlflow.tracking_uri or default_uri(self.out), cfg.mlflow.experiment, enabled=self.rank == 0
        )

    # ------------------------------------------------------------ checkpoints

    def _latest(self) -> str | None:
        path = os.path.join(self.ckdir, "latest")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            tag = f.read().strip()
        return tag if os.path.isfile(os.path.join(self.ckdir, tag, "COMPLETE")) else None

    def save(self) -> None:
        tag = f"step{self.step:08d}"
        path = os.path.join(self.ckdir, tag)
        client = {
            "loader": self.loader.state_dict(),
            "step": self.step,
            "best_top1": self.best_top1,
            "mlflow_run_id": self.run_id,
        }
        self.engine.save_checkpoint(self.ckdir, tag=tag, client_state=client, save_latest=False)
        rng = {
            "torch": torch.random.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_rest": [random.getstate()[0], random.getstate()[2]],
            "numpy": np.random.get_state()[1].tolist(),
            "numpy_pos": np.random.get_state()[2],
        }
        torch.save(rng, os.path.join(path, f"rng_rank{self.rank}.pt"))
        if self.ema is not None and self.rank == 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.ema.module.state_dict().items()}, os.path.join(path, "ema.safetensors"))
        dist.barrier()
        if self.rank == 0:
            meta = {**client, "world_size": self.world, "zero_stage": self.cfg.train.zero_stage, "time": time.time()}
            _write_atomic(os.path.join(path, "meta.json"), json.dumps(meta, indent=1))
            _write_atomic(os.path.join(path, "COMPLETE"), "")
            _write_atomic(os.path.join(self.ckdir, "latest"), tag)
            self._prune(tag)
            log.info("checkpoint %s", path)
        dist.barrier()

    def _prune(self, latest: str) -> None:
        tags = sorted(d for d in os.listdir(self.ckdir) if d.startswith("step") and os.path.isdir(os.path.join(self.ckdir, d)))
        complete = [d for d in tags if os.path.isfile(os.path.join(self.ckdir, d, "COMPLETE"))]
        keep = set(complete[-max(1, self.cfg.train.keep_last) :]) | {latest}
        for d in tags:
            if d not in keep and d <= latest:
                shutil.rmtree(os.path.join(self.ckdir, d), ignore_errors=True)

    def resume(self) -> bool:
        tag = self._latest()
        if tag is None:
            return False
        path = os.path.join(self.ckdir, tag)
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta["world_size"] != self.world or meta["zero_stage"] != self.cfg.train.zero_stage:
            raise InputError(
                f"checkpoint {path} was written by {meta['world_size']} ranks with ZeRO stage {meta['zero_stage']}, "
                f"this run has {self.world} ranks and stage {self.cfg.train.zero_stage}: resume with the same layout, "
                f"or start a new output directory from the weights with model.init_from={self.out}/export/model.safetensors "
                "(optimizer state restarts)"
            )
        with weights_only_loads():
            _, client = self.engine.load_checkpoint(self.ckdir, tag=tag)
        rng = torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=True)
        torch.random.set_rng_state(rng["torch"])
        random.setstate((rng["python_rest"][0], tuple(rng["python"]), rng["python_rest"][1]))
        np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"], 0, 0.0))
        if self.ema is not None:
            from safetensors.torch import load_file

            self.ema.module.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
        self.loader.load_state_dict(client["loader"])
        self.step = int(client["step"])
        self.best_top1 = float(client["best_top1"])
        self.run_id = client.get("mlflow_run_id")
        log.info("resumed from %s: step %d, epoch %d, batch %d", path, self.step, self.loader.epoch_index, self.loader.batch_index)
        return True

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, cast: bool) -> dict[str, float]:
        was = module.training
        module.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, top1, top5, count
        for batch in self.val_loader.epoch(0):
            x = batch["image"].to(self.device, non_blocking=True)
            if cast:
                x = x.to(self.dtype)
            y = batch["label"].to(self.device)
            logits = module(x).float()
            mask = y >= 0
            if mask.any():
                logits, y = logits[mask], y[mask]
                sums[0] += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                sums[1] += (top[:, 0] == y).sum().item()
                sums[2] += (top == y[:, None]).any(1).sum().item()
                sums[3] += len(y)
        module.train(was)
        sums = sums.to(self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(sums)
        n = max(1.0, sums[3].item())
        return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "count": n}

    # ------------------------------------------------------------ main loop

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)
        self.run_id = self.tracker.start(self.run_id, cfg.mlflow.run_name or cfg.name, cfg.mlflow.system_metrics)
        if self.rank == 0 and not resumed:
            self.tracker.params(cfg.flat())
            self.tracker.params(
                {
                    "world_size": self.world,
                    "global_batch": self.global_batch,
                    "base_lr": self.base_lr,
                    "params": self.num_params,
                    **{f"train_data.{k}": v for k, v in self.train_manifest.summary().items()},
                    **({f"val_data.{k}": v for k, v in self.val_manifest.summary().items()} if self.val_manifest else {}),
                }
            )
            self.tracker.artifact(os.path.join(self.out, "config.yaml"))
        log.info(
            "TNT %s: %.2fM params | %d ranks x micro-batch %d x accum %d = %d | lr %.2e | %d steps/epoch, %d steps | ZeRO %d %s | %s",
            cfg.model.variant, self.num_params / 1e6, self.world, t.micro_batch, t.grad_accum, self.global_batch,
            self.base_lr, self.steps_per_epoch, self.total_steps, t.zero_stage, t.precision, self.device,
        )
        peak = t.device_peak_tflops or next(
            (v for k, v in PEAK_TFLOPS.items() if torch.cuda.is_available() and k in torch.cuda.get_device_name()), 0.0
        )
        last_eval = None
        window = {"loss": 0.0, "n": 0, "images": 0, "wait": 0.0, "t": time.perf_counter()}
        epoch = self.loader.epoch_index
        while self.step < self.total_steps:
            t_wait = time.perf_counter()
            for batch in self.loader.epoch(epoch):
                window["wait"] += time.perf_counter() - t_wait
                if self._train_batch(batch, window, peak, epoch) and self.step >= self.total_steps:
                    break
                t_wait = time.perf_counter()
            if self.loader.epoch_index > epoch:  # the epoch ran to its end
                epoch = self.loader.epoch_index
                if self.step < self.total_steps:
                    if self.val_loader and t.eval_every and epoch % t.eval_every == 0:
                        last_eval = self._evaluate_all(epoch)
                    if self._latest() != f"step{self.step:08d}":
                        self.save()
        if self.val_loader:
            last_eval = self._evaluate_all(epoch)
        if self._latest() != f"step{self.step:08d}":
            self.save()
        export = self.export()
        if self.rank == 0:
            self._register(export, last_eval, aliases=["last"])
        dist.barrier()
        self.tracker.end()
        return {"step": self.step, "eval": last_eval, "export": export, "run_id": self.run_id}

    def _train_batch(self, batch: dict, window: dict, peak: float, epoch: int) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        t = self.cfg.train
        x = batch["image"].to(self.device, self.dtype, non_blocking=True)
        y = batch["target"].to(self.device, non_blocking=True)
        loss = soft_cross_entropy(self.engine(x).float(), y)
        # One all-reduce carries both flags: a non-finite loss anywhere, a checkpoint signal anywhere.
        flags = torch.tensor([float(not torch.isfinite(loss)), float(self.signal.received)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signalled = flags.tolist()  # one device sync for both
        # Decide on the agreed value only: the handler may set `received` on one rank
        # at any moment, also after this all-reduce (that rank alone would then
        # checkpoint, a collective, while the others wait in the next all-reduce).
        stop = signalled > 0
        if stop:
            self.signal.received = True  # never cleared: a signal is sent only once
        if nonfinite > 0:  # every rank skips together (ZeRO steps are collective)
            self.nonfinite += 1
            log.warning("non-finite loss at step %d (%d in a row): batch skipped", self.step, self.nonfinite)
            if self.nonfinite >= t.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite} non-finite losses in a row at step {self.step}: stopping "
                    f"(last good checkpoint: {self._latest()}); lower optim.lr or use train.precision=bf16"
                )
            return False
        self.nonfinite = 0
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        window["loss"] += loss.item()
        window["n"] += 1
        window["images"] += len(x)
        if not boundary:
            return False
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.engine.module)
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self._log_window(window, peak, epoch)
        if stop:
            log.warning("checkpoint signal (time limit or preemption): checkpointing at step %d, then requeue", self.step)
            self.save()
            self.tracker.end("KILLED")
            self.signal.hand_over()  # rank 0 under submitit: requeue and exit; Slurm then stops every task
            dist.barrier()  # the other ranks wait here to be stopped
            raise Requeued(f"checkpointed at step {self.step} on the time-limit signal; run the same command to resume")
        if t.ckpt_every and self.step % t.ckpt_every == 0:
            self.save()
        return True

    def _log_window(self, w: dict, peak: float, epoch: int) -> None:
        stats = torch.tensor([w["loss"], w["n"], w["images"], w["wait"]], dtype=torch.float64, device=self.device)
        dist.all_reduce(stats)
        dt = time.perf_counter() - w["t"]
        loss = stats[0].item() / max(1, stats[1].item())
        ips = stats[2].item() / dt
        wait = stats[3].item() / self.world / dt
        lr = self.scheduler.get_last_lr()[0]
        metrics = {"train/loss": loss, "train/lr": lr, "train/img_per_s": ips, "train/img_per_s_per_rank": ips / self.world, "train/data_wait": wait}
        counters = self.loader.counters
        metrics["data/bad_samples"] = counters["bad_samples"]
        metrics["data/bad_shards"] = counters["bad_shards"]
        mfu = ""
        if peak:
            metrics["train/mfu"] = ips / self.world * self.flops_per_image / (peak * 1e12)
            mfu = f" | MFU {100 * metrics['train/mfu']:.1f}%"
        log.info(
            "epoch %d step %d/%d | loss %.4f | lr %.2e | %.0f img/s (%.0f/rank) | data wait %.0f%%%s%s",
            epoch, self.step, self.total_steps, loss, lr, ips, ips / self.world, 100 * wait, mfu,
            f" | bad samples {counters['bad_samples']}, shards {counters['bad_shards']}" if counters["bad_samples"] or counters["bad_shards"] else "",
        )
        self._record(metrics)
        w.update(loss=0.0, n=0, images=0, wait=0.0, t=time.perf_counter())

    def _record(self, metrics: dict) -> None:
        """To MLflow and to <out>/metrics.jsonl (rank 0): the log survives a tracking outage."""
        self.tracker.metrics(metrics, self.step)
        if self.rank == 0:
            with open(os.path.join(self.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _evaluate_all(self, epoch: int) -> dict:
        res = self.evaluate(self.engine, cast=True)
        metrics = {f"val/{k}": v for k, v in res.items() if k != "count"}
        line = f"eval epoch {epoch} step {self.step}: loss {res['loss']:.4f} top-1 {res['top1']:.2f} top-5 {res['top5']:.2f} ({int(res['count'])} images)"
        if self.ema is not None:
            ema = self.evaluate(self.ema.module, cast=False)
            metrics.update({f"val_ema/{k}": v for k, v in ema.items() if k != "count"})
            line += f" | EMA top-1 {ema['top1']:.2f}"
        log.info(line)
        self._record(metrics)
        self.best_top1 = max(self.best_top1, res["top1"])
        return res

    # ------------------------------------------------------------ export / registry

    def export(self) -> dict | None:
        """Consolidated fp32 weights (any ZeRO stage) as safetensors in timm's layout."""
        from safetensors.torch import save_file

        tag = self._latest()
        if self.rank != 0:
            dist.barrier()
            return None
        if self.cfg.train.zero_stage in (1, 2, 3):  # the fp32 masters, from the checkpoint's partitions
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with weights_only_loads():
                state = get_fp32_state_dict_from_zero_checkpoint(self.ckdir, tag=tag)
        else:  # stage 0: the module holds the weights (DeepSpeed keeps no fp32 copy there)
            state = self.engine.module.state_dict()
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        model = tnt.create(self.cfg.model.variant, num_classes=self.train_manifest.num_classes, img_size=self.cfg.aug.img_size)
        model.load_state_dict(state)
        out = os.path.join(self.out, "export")
        os.makedirs(out, exist_ok=True)
        meta = {"variant": self.cfg.model.variant, "num_classes": str(self.train_manifest.num_classes), "step": str(self.step)}
        files = {"model": os.path.join(out, "model.safetensors")}
        save_file(tnt.to_timm_state_dict(model), files["model"], metadata=meta)
        if self.ema is not None:
            files["ema"] = os.path.join(out, "model_ema.safetensors")
            save_file({k: v.contiguous() for k, v in tnt.to_timm_state_dict(self.ema.module).items()}, files["ema"], metadata=meta)
        with open(os.path.join(out, "classes.json"), "w") as f:
            json.dump(list(self.train_manifest.classes), f)
        files["classes"] = os.path.join(out, "classes.json")
        log.info("exported %s", ", ".join(files.values()))
        dist.barrier()
        return files

    def _register(self, export: dict, last_eval: dict | None, aliases: list[str]) -> None:
        name = self.cfg.mlflow.register_as
        if not name or export is None:
            return
        from safetensors.torch import load_file

        model = tnt.create(self.cfg.model.variant, num_classes=self.train_manifest.num_classes, img_size=self.cfg.aug.img_size)
        tnt.load_timm_state_dict(model, load_file(export["model"]))
        model.eval()
        size = self.cfg.aug.img_size
        example = np.zeros((1, 3, size, size), np.float32)
        tags = {"run_id": self.run_id, "step": self.step, "epoch": self.loader.epoch_index, "variant": self.cfg.model.variant}
        if last_eval:
            tags["top1"] = f"{last_eval['top1']:.2f}"
        version = self.tracker.register(model, name, example, [export["model"], export.get("ema", export["model"]), export["classes"]], tags, aliases)
        if version:
            log.info(
                "registered %s version %s; load with mlflow.set_tracking_uri('%s'); "
                "mlflow.pytorch.load_model('models:/%s@last') (or @best: the best top-1 registered)",
                name, version, self.tracker.uri, name,
            )


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys and defaults:\n" + config_mod.describe(),
    )
    config_mod.add_arguments(p)
    args = p.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        result = Trainer(cfg).run()
    except (InputError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Requeued as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", 0)) == 0:
        ev = result["eval"]
        print(f"done: step {result['step']}" + (f", top-1 {ev['top1']:.2f}%" if ev else "") + f", MLflow run {result['run_id']}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
