"""Train TNT from the shards with DeepSpeed ZeRO, track and register it in MLflow.

    python -m pipeline.train --config configs/tnt_s.yaml                 # one process
    python launch/local.py --nproc 8 -- --config configs/tnt_s.yaml      # one machine
    python launch/slurm.py --nodes 4 -- --config configs/tnt_s.yaml      # a cluster

Rank, world size and rendezvous come from the usual environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as torchrun and our launchers set
them; with none set it is one process (``pipeline/distributed.py``).

Output directory (``train.out``): ``checkpoints/`` (``pipeline/checkpoint.py``),
``export/`` (consolidated fp32 weights in timm's layout as safetensors, loadable
without DeepSpeed; ``pipeline/export.py``), ``config.yaml``, ``train.log``,
``metrics.jsonl``, ``FINISHED.json`` once the run is done and registered. Restarting
with the same output directory resumes from ``latest``, mid-epoch, into the same
MLflow run; restarting a finished run says so and does nothing.

The loop (:meth:`Trainer.run`) is a list of calls to the components: the optimizer
step (:meth:`Trainer.train_step`), ``checkpointer.save``, ``validator.validate``,
``metrics.log``; at the end every rank leaves the process group before rank 0 alone
exports and registers (minutes for TNT-B over a network, which no collective waits for).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import yaml

from pipeline import config as config_mod
from pipeline import distributed, failures, mfu, pretrained, tnt
from pipeline import export as export_mod
from pipeline import watchdog as watchdog_mod
from pipeline.atomic import write_atomic
from pipeline.checkpoint import (CheckpointManager, CheckpointWriteError, check_layout, check_schedule,
                                 elastic_grad_accum, peek_latest)
from pipeline.data import EvalStream, Loader, TrainStream
from pipeline.transforms import DeviceFinish
from pipeline.evaluate import Validator
from pipeline.errors import InputError, TrainingError, summary
from pipeline.manifest import load_manifest
from pipeline.metrics import MetricsProcessor, sinks_for
from pipeline.registry import Registrar
from pipeline.runlock import RunInUse, RunLock
from pipeline.tracking import Tracker, default_artifact_root, default_uri
from pipeline.watchdog import Watchdog

log = logging.getLogger("tntpipe.train")

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
        """After our checkpoint: let the previous handler (submitit: requeue) act.
        submitit refuses once ``--max-requeues`` time-outs are spent: that is the end
        of this job, not a fault (the launcher does not resubmit it either)."""
        if callable(self.previous) and self.previous not in (signal.SIG_IGN, signal.SIG_DFL):
            try:
                self.previous(signal.SIGUSR2, self.frame)
            except Exception as exc:
                if type(exc).__name__ != "UncompletedJobError":
                    raise
                raise RequeuesSpent(f"checkpointed on the time-limit signal, but not requeued ({exc}); run the same "
                                    f"command to resume") from None


class Requeued(Exception):
    """Checkpointed on SIGUSR2; the job is being requeued (or should be re-run)."""


class RequeuesSpent(Requeued):
    """Checkpointed on SIGUSR2, but submitit did not requeue (--max-requeues spent)."""


class Finished(Exception):
    """The run in this output directory is already finished: nothing to do."""


def setup_logging(rank: int, out_dir: str | None) -> None:
    """Rank 0 logs INFO to stderr, and DEBUG too to train.log; other ranks only warnings."""
    root = logging.getLogger("tntpipe")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.DEBUG if rank == 0 else logging.WARNING)
    prefix = f"[rank {rank}] " if rank else ""
    fmt = logging.Formatter("%(asctime)s %(levelname).1s " + prefix + "%(message)s", "%H:%M:%S")
    handler = logging.StreamHandler()
    handler.setFormatter(fmt)
    handler.setLevel(logging.INFO)
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
        # timm 1.0.29 (a GPU machine's image) has no `dtype` here (1.0.31 has) and its lerp
        # needs equal dtypes: there the copy is made float32 and updated by us below
        self.cast = "dtype" not in inspect.signature(ModelEmaV3).parameters
        kwargs = {} if self.cast else {"dtype": torch.float32}
        self.ema = ModelEmaV3(module, decay=decay, device=device, **kwargs)
        if self.cast:
            self.ema.module.float()

    def update(self, module: torch.nn.Module) -> None:
        if not self.cast:
            self.ema.update(module)
            return
        with torch.no_grad():
            for ema_v, model_v in zip(self.ema.module.state_dict().values(), module.state_dict().values()):
                if ema_v.is_floating_point():
                    ema_v.lerp_(model_v.to(ema_v.dtype), 1.0 - self.ema.decay)
                else:
                    ema_v.copy_(model_v)

    @property
    def module(self) -> torch.nn.Module:
        return self.ema.module

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state)


def deepspeed_config(t: config_mod.TrainCfg, clip_grad: float, global_batch: int) -> dict:
    """DeepSpeed's config for a training section. In bf16 gradients are accumulated and
    all-reduced in fp32: DeepSpeed's default keeps both in bf16, which with accumulation
    and dozens of ranks rounds every gradient element dozens of times to 8 bits of
    mantissa. ZeRO-1 then runs as DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep fp32
    gradient partitions. ZeRO-0 (no ZeRO optimizer) cannot accumulate in fp32 in
    DeepSpeed ("unsupported mix of model_dtype and grad_accum_dtype"): only its
    all-reduce is fp32 there."""
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": global_batch,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built FusedAdam on CPU
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        ds["communication_data_type"] = "fp32"
        if t.zero_stage >= 1:
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if clip_grad > 0:
        ds["gradient_clipping"] = clip_grad
    return ds


def schedule_of(cfg: config_mod.Config, steps_per_epoch: int, global_batch: int) -> dict:
    """What fixes the lr curve and the data order: a resume must not change it silently."""
    o = cfg.optim
    return {
        "optim.epochs": o.epochs, "optim.lr": o.lr, "optim.lr_batch": o.lr_batch, "optim.min_lr": o.min_lr,
        "optim.warmup_lr": o.warmup_lr, "optim.warmup_epochs": o.warmup_epochs, "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch, "train.seed": cfg.train.seed,
    }


class Trainer:
    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.out = cfg.out_dir
        # Input and config errors first: before the process group, before train.out exists.
        self._build_data()
        self._check_finished()
        self._check_init_from()
        self.rank, self.world, self.local_rank = distributed.init_distributed(cfg.train.dist_timeout_s)
        self.step = 0
        self.watchdog = Watchdog(self.rank, self.world, cfg.train.heartbeat_timeout_s, self._lost_peer)
        self.watchdog.start()
        setup_logging(self.rank, self.out)
        self.device = distributed.device()
        self._agree_grad_accum()
        self._lock_out(cfg.train.lock_wait_s)
        self._build_engine()
        self.best_top1 = -1.0
        self.nonfinite = 0
        self.signal = CheckpointSignal()
        self.run_id: str | None = None
        self.schedule_changes: list[str] = []  # schedule keys changed on resume (train.allow_schedule_change)
        self.tracker = Tracker(
            cfg.mlflow.tracking_uri or default_uri(self.out), cfg.named(cfg.mlflow.experiment), enabled=self.rank == 0,
            artifact_root=cfg.mlflow.artifact_root or default_artifact_root(cfg.mlflow.tracking_uri, self.out),
        )
        # a manifest without a class list: the indices are the names
        classes = self.train_manifest.classes or tuple(str(i) for i in range(self.train_manifest.num_classes))
        self.registrar = Registrar(cfg, self.tracker, self.out, classes,
                                   {"train": self.train_manifest, "val": self.val_manifest}, self.parent,
                                   self.num_params)
        self.last_res: dict | None = None  # the last evaluation, model and EMA
        t = cfg.train
        self.checkpointer = CheckpointManager(os.path.join(self.out, "checkpoints"), self.rank, self.world,
                                              t.ckpt_every, t.ckpt_every_min, t.keep_last)
        self.finish = self.eval_finish = None  # DeviceFinish with data.finish=device
        if self.finish_on_device:
            n = self.train_manifest.num_classes
            self.finish = DeviceFinish(cfg.aug, n, True, t.seed, self.rank, self.device)
            self.eval_finish = DeviceFinish(cfg.aug, n, False, t.seed, self.rank, self.device)
        self.validator = None
        if self.val_loader:
            self.validator = Validator(self.val_loader, self.device, self.dtype, self.eval_finish)
        self.metrics = MetricsProcessor(sinks_for(self.rank, self.out, self.tracker), self.world, self.device,
                                        self.flops_per_image, self._peak_tflops())

    def _lock_out(self, wait_s: float) -> None:
        """One job at a time in train.out (pipeline/runlock.py): rank 0 holds the lock
        until its process ends; every rank learns whether it got it."""
        self.lock, in_use = RunLock(self.out), None
        if self.rank == 0:
            try:
                self.lock.acquire(wait_s)
            except RunInUse as exc:
                in_use = exc
        if distributed.agree_any([in_use is not None], self.device)[0]:
            raise in_use or RunInUse("train.out is in use by another job (rank 0 says which)")

    def _build_data(self) -> None:
        """Manifests, loaders and the schedule: needs the rank and world size from the
        environment only, no process group."""
        cfg, t = self.cfg, self.cfg.train
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        url_base, store = cfg.data.url_base or None, cfg.data.store()
        self.train_manifest = load_manifest(cfg.data.train, url_base, store)
        self.val_manifest = load_manifest(cfg.data.val, url_base, store) if cfg.data.val else None
        if t.precision == "fp16":
            from deepspeed.accelerator import get_accelerator

            if not get_accelerator().is_fp16_supported():
                # DeepSpeed's CPU accelerator has fp16 only where oneDNN has fp16 kernels
                # (AVX512-FP16/AMX-FP16); say so before any work, not from inside DeepSpeed
                raise InputError(f"train.precision=fp16 is not supported by DeepSpeed on this device "
                                 f"({get_accelerator().device_name()}); use train.precision=bf16")
        # uint8 batches, finished on the device (data.finish; auto: on CUDA)
        self.finish_on_device = cfg.data.finish == "device" or (cfg.data.finish == "auto" and torch.cuda.is_available())
        finish = "device" if self.finish_on_device else "worker"
        self.loader = Loader(
            TrainStream(self.train_manifest, t.micro_batch, rank=rank, world_size=world, seed=t.seed,
                        augment=cfg.aug, repeats=cfg.data.repeats, shuffle_buffer=cfg.data.shuffle_buffer,
                        finish=finish),
            workers=cfg.data.workers, timeout_s=cfg.data.timeout_s,
        )
        self.val_loader = None
        if self.val_manifest:
            eval_batch = cfg.data.eval_batch or t.micro_batch
            self.val_loader = Loader(
                EvalStream(self.val_manifest, eval_batch, rank=rank, world_size=world, augment=cfg.aug, finish=finish),
                workers=cfg.data.workers, timeout_s=cfg.data.timeout_s,
            )
        self._adapt_to_checkpoint(world)
        self.global_batch = t.micro_batch * t.grad_accum * world
        self.steps_per_epoch = len(self.loader) // t.grad_accum
        if self.steps_per_epoch == 0:
            raise InputError(f"an epoch has {len(self.loader)} micro-batches, "
                             f"fewer than train.grad_accum={t.grad_accum}")
        self.total_steps = cfg.optim.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.schedule = schedule_of(cfg, self.steps_per_epoch, self.global_batch)

    def _check_init_from(self) -> None:
        """``model.init_from`` found, read and checked against ``model.variant``
        (:func:`pipeline.pretrained.check`) before the process group, DeepSpeed or
        ``train.out``: a wrong source or variant is one line, with nothing built or written."""
        cfg, self.parent, self.init_weights = self.cfg, {}, None
        uri = cfg.model.init_from
        if not uri:
            return
        tracking_uri = cfg.mlflow.tracking_uri or default_uri(self.out)
        db = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else None
        if uri.startswith(("models:/", "runs:/")) and db and not os.path.isfile(db):
            # MLflow would create an empty store there (and train.out with it)
            raise InputError(f"model.init_from={uri}: no MLflow store at {tracking_uri}; set mlflow.tracking_uri "
                             f"(or MLFLOW_TRACKING_URI) to the store that holds it, e.g. sqlite:///runs/tiny-cpu/mlflow.db")
        weights, pretrained_cfg, self.parent = pretrained.resolve(uri, tracking_uri)
        pretrained.check(cfg.model.variant, weights, pretrained_cfg, self.train_manifest.num_classes, cfg.aug.img_size)
        self.init_weights = weights, pretrained_cfg

    def _adapt_to_checkpoint(self, world: int) -> None:
        """Resuming on another number of ranks: the ``train.grad_accum`` that keeps the
        checkpoint's global batch (or the refusal, in one line). Read by each rank
        before the process group exists; :meth:`_agree_grad_accum` checks they agree."""
        t = self.cfg.train
        self.layout_change = None
        meta = peek_latest(os.path.join(self.out, "checkpoints"))
        if meta is None or meta.get("world_size", world) == world or "schedule" not in meta:
            return
        accum = elastic_grad_accum(meta, world, t.micro_batch, t.grad_accum, t.allow_batch_change,
                                   f"the checkpoint at step {meta['step']} in {self.out}")
        self.layout_change = (f"{meta['world_size']} ranks x accum {meta.get('grad_accum', '?')} -> "
                              f"{world} ranks x accum {accum}")
        t.grad_accum = accum

    def _agree_grad_accum(self) -> None:
        """Every rank must run the same ``train.grad_accum`` (DeepSpeed's config): one
        all-reduce of it and its negative. Synchronizes ranks."""
        if self.world < 2:
            return
        both = torch.tensor([self.cfg.train.grad_accum, -self.cfg.train.grad_accum], device=self.device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        if int(both[0]) != -int(both[1]):
            raise InputError(f"ranks read different checkpoints in {self.out} (train.grad_accum {int(-both[1])} to "
                             f"{int(both[0])}): is the shared filesystem up to date on every node?")

    def _expected_schedule(self, meta: dict) -> dict:
        """The schedule a resume of ``meta`` (a checkpoint's, a finished run's) must have:
        this run's, except that on another number of ranks with ``train.allow_batch_change``
        the global batch, and so the steps per epoch, may change."""
        expected = dict(self.schedule)
        saved = meta.get("schedule") or {}
        world = self.loader.stream.world_size  # also before the process group (a finished run)
        if self.cfg.train.allow_batch_change and meta.get("world_size", world) != world:
            expected.update({k: saved[k] for k in ("global_batch", "steps_per_epoch") if k in saved})
        return expected

    def _check_finished(self) -> None:
        """A finished run re-run with the same settings: nothing to do (no new model
        version, no duplicate evaluation). With another schedule: refused, unless
        ``train.allow_schedule_change``."""
        path = os.path.join(self.out, "FINISHED.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            done = json.load(f)
        if "world_size" in done:  # any number of ranks may look at a finished run
            check_layout(done, f"the finished run {path}", int(os.environ.get("WORLD_SIZE", 1)),
                         self.cfg.train.zero_stage, self.out, reshardable=True)
        changed = check_schedule(done.get("schedule"), self._expected_schedule(done), f"the finished run {path}",
                                 self.cfg.train.allow_schedule_change)
        if not changed and done["step"] >= self.total_steps:
            raise Finished(
                f"{self.out} holds a finished run (step {done['step']}, MLflow run {done.get('run_id')}, "
                f"model version {done.get('version') or '-'}): nothing to do; use another train.out for a new run"
            )

    def _build_engine(self) -> None:
        import deepspeed

        cfg, t, o = self.cfg, self.cfg.train, self.cfg.optim
        if t.zero_stage == 0 and t.precision != "fp32":
            log.warning(
                "ZeRO stage 0 with %s: DeepSpeed then updates the 16-bit weights directly (no fp32 master copy); "
                "use train.zero_stage>=1 for fp32 masters (same memory per rank as DDP plus a partitioned fp32 copy)",
                t.precision,
            )
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t.precision]
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.manual_seed(t.seed)  # the same initial weights on every rank
        model = tnt.create(cfg.model.variant, num_classes=self.train_manifest.num_classes,
                           drop_path_rate=cfg.model.drop_path, img_size=cfg.aug.img_size)
        model.grad_checkpointing = cfg.model.checkpointing
        try:
            path, why = tnt.select_inner_kernel(cfg.model.inner_kernel, self.device, model)
        except ValueError as e:
            raise InputError(str(e)) from None
        fell_back = cfg.model.inner_kernel == "auto" and self.device.type == "cuda" and path != "triton"
        (log.warning if fell_back else log.info)("inner attention: %s (%s)", path, why)
        if self.init_weights:  # set by _check_init_from
            weights, pretrained_cfg = self.init_weights
            pretrained.load_into(model, cfg.model.variant, weights, pretrained_cfg)
            log.info("weights from %s (%s)", cfg.model.init_from, weights)
        # after the model: each rank its own DropPath masks (and any other draw)
        distributed.seed_rank(t.seed, self.rank)
        self.flops_per_image = mfu.step_flops_per_image(model)
        self.num_params = tnt.count_params(model)
        self.base_lr = o.lr * self.global_batch / o.lr_batch
        warmup = int(o.warmup_epochs * self.steps_per_epoch)
        groups = tnt.param_groups(model, o.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.base_lr, betas=o.betas, eps=o.eps)
        sched_total = o.epochs * self.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_at(step, o, self.base_lr, warmup, sched_total) / self.base_lr
        )
        # DeepSpeed's optimizers print() memory statistics while they start (18 lines on
        # rank 0, see_memory_usage(force=True)): kept out of the console, in train.log
        with contextlib.redirect_stdout(io.StringIO()) as said:
            self.engine, _, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler,
                config=deepspeed_config(t, o.clip_grad, self.global_batch),
            )
        if said.getvalue().strip():
            log.debug("DeepSpeed at start-up:\n%s", said.getvalue().rstrip())
        self.ema = EMA(self.engine.module, t.ema_decay) if t.ema else None
        # Default: on CUDA under ZeRO-1/2. Under ZeRO-3, dynamo traces DeepSpeed's parameter
        # hooks: on an H200 the tiny model's first 50 steps took 5 min and it then ran at
        # 200 img/s (bench/README.md), so ZeRO-3 stays eager unless train.compile=true.
        if t.compile is None:
            self.compiled = self.device.type == "cuda" and t.zero_stage < 3
        else:
            self.compiled = t.compile
        if self.compiled:
            # DeepSpeed compiles the module in place: engine.module, the EMA's source and
            # the export keep their parameter names. Our CPU kernels stay out of the graph
            # (kernels.cpu.kernel_on is false while dynamo traces): on CPU, compiled is slower
            # than our eager model (bench/README.md), hence off there by default.
            self.engine.compile()

    def _peak_tflops(self) -> float | None:
        if self.cfg.train.device_peak_tflops:
            return self.cfg.train.device_peak_tflops
        if self.device.type != "cuda":
            return None
        precision = mfu.matmul_precision(self.cfg.train.precision, torch.backends.cuda.matmul.allow_tf32)
        return mfu.peak_tflops(torch.cuda.get_device_name(self.device), precision)

    # ----- state

    def _client_state(self) -> dict:
        return {"loader": self.loader.state_dict(), "step": self.step, "best_top1": self.best_top1,
                "mlflow_run_id": self.run_id, "registry": self.registrar.state_dict()}

    def save(self) -> None:
        """Synchronizes ranks (every rank saves its partition)."""
        meta = {"world_size": self.world, "zero_stage": self.cfg.train.zero_stage, "schedule": self.schedule,
                "grad_accum": self.cfg.train.grad_accum, "epoch": self.loader.completed_epochs}
        with self.metrics.paused():
            self.checkpointer.save(self.step, self.engine, self._client_state(), meta,
                                   self.ema.module if self.ema else None, self._checkpoint_bytes())

    def _checkpoint_bytes(self) -> int:
        """A checkpoint's size before the first is written: the 16- or 32-bit weights,
        AdamW's two fp32 moments, the fp32 masters (ZeRO >= 1 in 16 bits), the EMA."""
        t = self.cfg.train
        per_param = {"bf16": 2, "fp16": 2, "fp32": 4}[t.precision] + 8
        per_param += 4 if t.zero_stage >= 1 and t.precision != "fp32" else 0
        per_param += 4 if self.ema is not None else 0
        per_param += 12 if t.zero_stage >= 1 else 0  # optim.safetensors: masters and moments by name
        return self.num_params * per_param

    def resume(self) -> bool:
        tag = self.checkpointer.latest()
        if tag is None:
            return False
        path = os.path.join(self.checkpointer.folder, tag)
        meta = self.checkpointer.meta(tag)
        t = self.cfg.train
        elastic = meta["world_size"] != self.world
        check_layout(meta, f"checkpoint {path}", self.world, t.zero_stage, self.out, self.checkpointer.reshardable(tag))
        if elastic and self.layout_change is None:  # rank 0 fell back to an older checkpoint than the one peeked at
            raise InputError(f"checkpoint {path} was written by {meta['world_size']} ranks, the newest one by "
                             f"{self.world}: run the same command again")
        changed = check_schedule(meta.get("schedule"), self._expected_schedule(meta), f"checkpoint {path}",
                                 t.allow_schedule_change)
        if changed:
            log.warning("resuming %s with a changed schedule (train.allow_schedule_change=true): %s",
                        path, "; ".join(changed))
        if elastic:
            was = meta["schedule"]["global_batch"]
            log.warning("resuming %s on another number of ranks: %s, global batch %d (was %d)%s", path,
                        self.layout_change, self.global_batch, was,
                        ", lr scaled to it (train.allow_batch_change)" if self.global_batch != was else "")
            client = self.checkpointer.load_resharded(tag, self.engine, t.seed, self.ema)
            self._schedule_at(int(client["step"]))
            self.engine.global_steps, self.engine.global_samples = int(client["step"]), int(client["step"]) * was
        else:
            client = self.checkpointer.load(tag, self.engine, self.ema)
        self.loader.load_state_dict(client["loader"])
        self.step = int(client["step"])
        self.best_top1 = float(client["best_top1"])
        self.run_id = client.get("mlflow_run_id")
        if "registry" in client:  # checkpoints before registrations at each best lack it
            self.registrar.load_state_dict(client["registry"])
        self.schedule_changes = changed
        log.info("resumed from %s: step %d, epoch %d, batch %d, best top-1 %.2f", path, self.step,
                 self.loader.epoch_index, self.loader.batch_index, self.best_top1)
        return True

    def _schedule_at(self, step: int) -> None:
        """The lr schedule at ``step`` (resuming without DeepSpeed's own checkpoint, whose
        scheduler state it would have restored)."""
        self.scheduler.last_epoch = step
        lrs = [base * fn(step) for base, fn in zip(self.scheduler.base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    # ----- the loop

    def close_loaders(self) -> None:
        for loader in (self.loader, self.val_loader):
            if loader is not None:
                loader.close()

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        resumed = self.resume()
        self.registrar.start_attempt(self.world)
        self._start_tracking(resumed)
        self.metrics.reset()  # the first window's img/s: training only, not the set-up
        last_eval = None
        epoch = self.loader.epoch_index
        while self.step < self.total_steps:
            t_wait = time.perf_counter()
            for batch in self.loader.epoch(epoch):
                wait = time.perf_counter() - t_wait
                if self.train_step(batch, wait) and self.step >= self.total_steps:
                    break
                t_wait = time.perf_counter()
            if self.loader.epoch_index > epoch:  # the epoch ran to its end
                epoch = self.loader.epoch_index
                if self.step < self.total_steps and self.validator and t.eval_every and epoch % t.eval_every == 0:
                    last_eval = self.validate()
        if self.validator:
            last_eval = self.validate()
        self.close_loaders()
        if not self.checkpointer.saved(self.step):
            self.save()
        state = export_mod.gather_fp32_state(self.engine.module)
        self.watchdog.stop(done=True)
        # Every collective is done: leave the process group before rank 0's long work
        # (export, registry), which no other rank may wait for in a collective.
        distributed.close()
        if self.rank != 0:
            return {"step": self.step, "eval": last_eval, "export": None, "run_id": self.run_id}
        return self._finish(state, last_eval)

    def _start_tracking(self, resumed: bool) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "config.yaml"), "w") as f:
                yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), f, sort_keys=False)
        run_name = cfg.named(cfg.mlflow.run_name or cfg.name)
        self.run_id = self.tracker.start(self.run_id, run_name, cfg.mlflow.system_metrics)
        if self.rank == 0 and not resumed:
            self.tracker.params(cfg.resolved())  # train.out=runs/tiny-cpu, not runs/{name}
            self.tracker.params({
                "world_size": self.world, "global_batch": self.global_batch, "base_lr": self.base_lr,
                "params": self.num_params,
                **{f"train_data.{k}": v for k, v in self.train_manifest.summary().items()},
                **({f"val_data.{k}": v for k, v in self.val_manifest.summary().items()} if self.val_manifest else {}),
            })
            self.tracker.artifact(os.path.join(self.out, "config.yaml"))
        if self.schedule_changes:
            self.tracker.tags({f"schedule_change.step{self.step}": "; ".join(self.schedule_changes)})
        if self.layout_change and resumed:
            self.tracker.tags({f"layout_change.step{self.step}": self.layout_change,
                               f"global_batch.step{self.step}": str(self.global_batch)})
        log.info(
            "TNT %s: %.2fM params | %d ranks x micro-batch %d x accum %d = %d | lr %.2e | %d steps/epoch, %d steps | "
            "ZeRO %d %s (%s) | %s%s",
            cfg.model.variant, self.num_params / 1e6, self.world, t.micro_batch, t.grad_accum, self.global_batch,
            self.base_lr, self.steps_per_epoch, self.total_steps, t.zero_stage, t.precision,
            type(self.engine.optimizer).__name__, self.device, " | compiled" if self.compiled else "",
        )

    def train_step(self, batch: dict, wait: float) -> bool:
        """One micro-batch; True when it completed an optimizer step. Synchronizes ranks
        (the flags all-reduce, DeepSpeed's gradient reduction, saves)."""
        t = self.cfg.train
        if self.finish is not None:
            x, y = self.finish(batch)
            x = x.to(self.dtype)
        else:
            x = batch["image"].to(self.device, self.dtype, non_blocking=True)
            y = batch["target"].to(self.device, non_blocking=True)
        loss = soft_cross_entropy(self.engine(x).float(), y)
        # One all-reduce carries every flag the ranks must agree on before they branch:
        # a non-finite loss anywhere (skip before backward: DeepSpeed can neither take
        # a NaN back out of accumulated gradients nor skip a bf16 step), a checkpoint
        # signal anywhere, rank 0's clock for time-based checkpoints. This is the one
        # host sync per micro-batch; the loss itself is read only when logging.
        nonfinite, signalled, time_due = distributed.agree_any(
            [~torch.isfinite(loss), self.signal.received, self.rank == 0 and self.checkpointer.time_due()], self.device
        )
        # The handler may set `received` on one rank at any moment, also after this
        # all-reduce; only the agreed value is acted on.
        if signalled:
            self.signal.received = True  # never cleared: a signal is sent only once
        if nonfinite:
            self._skip_nonfinite()
            return False
        self.nonfinite = 0
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        self.metrics.micro_batch(loss, len(x), wait)
        if not boundary:
            return False
        self.step += 1
        self.metrics.grad_norm = self.engine.get_global_grad_norm()
        if self.ema is not None:
            self.ema.update(self.engine.module)
        if self.step % t.log_every == 0 or self.step == self.total_steps:
            self.metrics.log(self.step, self.total_steps, self.loader.completed_epochs,
                             self.scheduler.get_last_lr()[0], self.loader.counters)
        if signalled:
            self._checkpoint_and_requeue()
        if self.checkpointer.due(self.step) or time_due:
            self.save()
        return True

    def _skip_nonfinite(self) -> None:
        """Every rank comes here together (the agreed flag); rank 0 says so."""
        self.nonfinite += 1
        if self.rank == 0:
            log.warning("non-finite loss at step %d (%d in a row): batch skipped", self.step, self.nonfinite)
        if self.nonfinite >= self.cfg.train.max_nonfinite:
            hint = "lower optim.lr or use train.precision=bf16" if self.cfg.train.precision == "fp16" else \
                "lower optim.lr, or set optim.clip_grad"
            raise TrainingError(
                f"{self.nonfinite} non-finite losses in a row at step {self.step}: stopping "
                f"(last good checkpoint: step {self.checkpointer.last_step}); {hint}"
            )

    def _checkpoint_and_requeue(self) -> None:
        log.warning("checkpoint signal (time limit or preemption): checkpointing at step %d, then requeue", self.step)
        self.registrar.requeues += 1
        self.save()
        self.tracker.end("KILLED")
        self.watchdog.stop(done=True)  # rank 0's store goes with it: not a lost peer
        self.signal.hand_over()  # rank 0 under submitit: requeue and exit; Slurm then stops every task
        distributed.barrier()  # the other ranks wait here to be stopped
        raise Requeued(f"checkpointed at step {self.step} on the time-limit signal; run the same command to resume")

    def _lost_peer(self, message: str) -> None:
        failures.record(self.out, "lost a peer rank (it died or hung, or its node or network did)", message,
                        self.rank, self.step)

    def validate(self) -> dict:
        """The model and its EMA on the same batches, one pass. Synchronizes ranks."""
        models = {"val": (self.engine, True)}
        if self.ema is not None:
            models["val_ema"] = (self.ema.module, False)
        with self.metrics.paused():
            res = self.validator.validate(models)
        main = res["val"]
        epoch = self.loader.completed_epochs
        line = (f"eval epoch {epoch} step {self.step}: loss {main['loss']:.4f} top-1 {main['top1']:.2f} "
                f"top-5 {main['top5']:.2f} ({int(main['count'])} images)")
        if "val_ema" in res:
            line += f" | EMA top-1 {res['val_ema']['top1']:.2f}"
        log.info(line)
        self.metrics.record({f"{split}/{k}": v for split, r in res.items() for k, v in r.items() if k != "count"}
                            | {"val/epoch": epoch}, self.step)
        self.best_top1 = max(self.best_top1, main["top1"])
        self.last_res = res
        if self.registrar.is_new_best(res):
            self._register_best(res)
        return main

    def _register_best(self, res: dict) -> None:
        """A new best evaluation: checkpoint (the version's ``checkpoint`` tag names it),
        export to ``export/best/`` and register (rank 0; the others wait at their next
        collective, within train.dist_timeout_s). Synchronizes ranks."""
        if not self.checkpointer.saved(self.step):
            self.save()
        state = export_mod.gather_fp32_state(self.engine.module)
        version = None
        if self.rank == 0:
            with self.metrics.paused():
                version = self.registrar.export_and_register("best", state, self.ema.module if self.ema else None, res,
                                                             self.step, self.loader.completed_epochs)
        self.registrar.registered_best(version, res, self.step)

    # ----- the end (rank 0 alone)

    def _finish(self, state: dict, last_eval: dict | None) -> dict:
        cfg, reg = self.cfg, self.registrar
        epoch = self.loader.completed_epochs
        files, version = reg.finish(state, self.ema.module if self.ema else None, self.last_res, self.step, epoch)
        self.tracker.end()
        done = {"step": self.step, "epoch": epoch, "run_id": self.run_id, "version": version,
                "world_size": self.world, "zero_stage": cfg.train.zero_stage,
                "registered_as": reg.name, "schedule": self.schedule, "time": time.time()}
        write_atomic(os.path.join(self.out, "FINISHED.json"), json.dumps(done, indent=1))
        return {"step": self.step, "eval": last_eval, "export": files, "run_id": self.run_id}


def _record(cfg, trainer, exc: BaseException, everywhere: bool, kind: str | None = None) -> None:
    """Into <train.out>/failures.jsonl: by rank 0 when every rank has the same fault,
    else by each rank that has it."""
    rank = int(os.environ.get("RANK", 0))
    if everywhere and rank != 0:
        return
    try:
        failures.record(cfg.out_dir, kind or failures.classify(exc), f"{type(exc).__name__}: {exc}", rank,
                        trainer.step if trainer is not None else None)
    except OSError:  # the record must not hide the fault itself (a full disk, say)
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys and defaults:\n" + config_mod.describe()
        + "\n\nexit status: 0 done (or already finished); 2 input, config or training error (one 'error:' line; "
        "retrying cannot help); 3 checkpointed on the time-limit signal; 4 a checkpoint could not be written "
        "(disk full or I/O error); 5 another rank was lost (no heartbeat for train.heartbeat_timeout_s, or it failed); "
        "1 any other fault; faults are recorded in <train.out>/failures.jsonl",
    )
    config_mod.add_arguments(p)
    args = p.parse_args(argv)
    # DeepSpeed's ZeRO calls it at every step; said twice per rank, for torch to change, not the user
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated", category=FutureWarning)
    rank0 = int(os.environ.get("RANK", 0)) == 0
    cfg = trainer = None
    alone = False  # a fault of this rank alone (the others are told through the watchdog)
    try:
        cfg = config_mod.load(args.config, args.overrides)
        trainer = Trainer(cfg)
        result = trainer.run()
    except Finished as exc:
        if rank0:
            print(f"finished: {exc}")
        return 0
    except CheckpointWriteError as exc:  # a fault of the storage, not of the input: exit 4
        alone = not exc.everywhere
        _record(cfg, trainer, exc, exc.everywhere)
        if not exc.everywhere or rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 4
    except TrainingError as exc:  # decided on agreed values: every rank raises it together
        _record(cfg, trainer, exc, everywhere=True)
        if rank0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        # before the process group, every rank finds the same error: rank 0 says it;
        # after it, the rank that found it (rank 0 for a train.out in use)
        if rank0 or (torch.distributed.is_initialized() and not isinstance(exc, RunInUse)):
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except Requeued as exc:
        kind = ("checkpointed at the time limit, not requeued (--max-requeues spent)" if isinstance(exc, RequeuesSpent)
                else "checkpointed and requeued (time limit or preemption)")
        _record(cfg, trainer, exc, everywhere=True, kind=kind)
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # a fault: recorded and said in one line, then the traceback
        alone = True
        if cfg is not None:
            _record(cfg, trainer, exc, everywhere=False)
            print(f"error: rank {os.environ.get('RANK', 0)}: {failures.classify(exc)}: {summary(exc)} "
                  f"(recorded in {os.path.join(cfg.out_dir, failures.FILE)})", file=sys.stderr)
        raise
    finally:
        if trainer is not None:
            trainer.close_loaders()
        watchdog_mod.stop_current(done=not alone)
        distributed.close()
    if rank0:
        ev = result["eval"]
        top1 = f", top-1 {ev['top1']:.2f}%" if ev else ""
        print(f"done: step {result['step']}{top1}, MLflow run {result['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
