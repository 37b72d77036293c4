"""The parts of a training run, built from its configuration: the data (manifests,
loaders, batch and schedule arithmetic; :func:`build_data`) and the model's engine
(TNT, AdamW, the lr schedule, DeepSpeed, the EMA; :func:`build_engine`).

:class:`pipeline.train.Trainer` calls them in order and runs the loop over what they
return. Input and configuration errors surface here, as :class:`InputError`, before the
process group or ``train.out`` exist wherever they can.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import math
import os

import torch

from pipeline import config as config_mod
from pipeline import distributed, mfu, pretrained, resume, tnt
from pipeline.data import EvalStream, Loader, TrainStream
from pipeline.errors import InputError
from pipeline.manifest import Manifest, load_manifest
from pipeline.tracking import Tracker, default_artifact_root, default_uri
from pipeline.transforms import DeviceFinish

log = logging.getLogger("tntpipe.train")


def lr_at(step: int, cfg: config_mod.OptimCfg, base_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up from warmup_lr, then cosine to min_lr, per optimizer step."""
    if step < warmup:
        return cfg.warmup_lr + (base_lr - cfg.warmup_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def schedule_of(cfg: config_mod.Config, steps_per_epoch: int, global_batch: int) -> dict:
    """What fixes the lr curve and the data order: a resume must not change it silently."""
    o = cfg.optim
    return {
        "optim.epochs": o.epochs,
        "optim.lr": o.lr,
        "optim.lr_batch": o.lr_batch,
        "optim.min_lr": o.min_lr,
        "optim.warmup_lr": o.warmup_lr,
        "optim.warmup_epochs": o.warmup_epochs,
        "global_batch": global_batch,
        "steps_per_epoch": steps_per_epoch,
        "train.seed": cfg.train.seed,
    }


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


# ------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Data:
    """The run's data and the arithmetic that follows from it."""

    train_manifest: Manifest
    val_manifest: Manifest | None
    loader: Loader
    val_loader: Loader | None
    finish_on_device: bool  # uint8 batches finished on the device (data.finish)
    layout_change: str | None  # "2 ranks x accum 1 -> 1 ranks x accum 2" on an elastic resume
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    schedule: dict  # schedule_of(): what a resume must not change silently

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names; a manifest without a class list: the indices are the names."""
        m = self.train_manifest
        return m.classes or tuple(str(i) for i in range(m.num_classes))


def build_data(cfg: config_mod.Config) -> Data:
    """Manifests, loaders and the schedule. Needs the rank and world size from the
    environment only, no process group. On another number of ranks than the latest
    checkpoint's, sets ``train.grad_accum`` to what keeps its global batch
    (:func:`pipeline.resume.adapt_grad_accum`)."""
    t = cfg.train
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    url_base, store = cfg.data.url_base or None, cfg.data.store()
    train_manifest = load_manifest(cfg.data.train, url_base, store)
    val_manifest = load_manifest(cfg.data.val, url_base, store) if cfg.data.val else None
    if t.precision == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            # DeepSpeed's CPU accelerator has fp16 only where oneDNN has fp16 kernels
            # (AVX512-FP16/AMX-FP16); say so before any work, not from inside DeepSpeed
            raise InputError(
                f"train.precision=fp16 is not supported by DeepSpeed on this device "
                f"({get_accelerator().device_name()}); use train.precision=bf16"
            )
    on_device = cfg.data.finish == "device" or (cfg.data.finish == "auto" and torch.cuda.is_available())
    finish = "device" if on_device else "worker"
    loader = Loader(
        TrainStream(
            train_manifest,
            t.micro_batch,
            rank=rank,
            world_size=world,
            seed=t.seed,
            augment=cfg.aug,
            repeats=cfg.data.repeats,
            shuffle_buffer=cfg.data.shuffle_buffer,
            finish=finish,
        ),
        workers=cfg.data.workers,
        timeout_s=cfg.data.timeout_s,
    )
    val_loader = None
    if val_manifest:
        val_loader = Loader(
            EvalStream(
                val_manifest,
                cfg.data.eval_batch or t.micro_batch,
                rank=rank,
                world_size=world,
                augment=cfg.aug,
                finish=finish,
            ),
            workers=cfg.data.workers,
            timeout_s=cfg.data.timeout_s,
        )
    layout_change = resume.adapt_grad_accum(cfg, world)
    global_batch = t.micro_batch * t.grad_accum * world
    steps_per_epoch = len(loader) // t.grad_accum
    if steps_per_epoch == 0:
        raise InputError(f"an epoch has {len(loader)} micro-batches, fewer than train.grad_accum={t.grad_accum}")
    total_steps = cfg.optim.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    return Data(
        train_manifest,
        val_manifest,
        loader,
        val_loader,
        on_device,
        layout_change,
        global_batch,
        steps_per_epoch,
        total_steps,
        schedule_of(cfg, steps_per_epoch, global_batch),
    )


def check_init_from(cfg: config_mod.Config, num_classes: int) -> tuple[tuple | None, dict]:
    """``model.init_from`` found, read and checked against ``model.variant``
    (:func:`pipeline.pretrained.check`) before the process group, DeepSpeed or
    ``train.out``: a wrong source or variant is one line, with nothing built or written.
    Returns ((weights, pretrained_cfg) or None, the parent's tags for the registry)."""
    uri = cfg.model.init_from
    if not uri:
        return None, {}
    tracking_uri = cfg.mlflow.tracking_uri or default_uri(cfg.out_dir)
    db = tracking_uri[len("sqlite:///") :] if tracking_uri.startswith("sqlite:///") else None
    if uri.startswith(("models:/", "runs:/")) and db and not os.path.isfile(db):
        # MLflow would create an empty store there (and train.out with it)
        raise InputError(
            f"model.init_from={uri}: no MLflow store at {tracking_uri}; set mlflow.tracking_uri "
            f"(or MLFLOW_TRACKING_URI) to the store that holds it, e.g. sqlite:///runs/tiny-cpu/mlflow.db"
        )
    weights, pretrained_cfg, parent = pretrained.resolve(uri, tracking_uri)
    pretrained.check(cfg.model.variant, weights, pretrained_cfg, num_classes, cfg.aug.img_size)
    return (weights, pretrained_cfg), parent


# ---------------------------------------------------------------------------- engine


@dataclasses.dataclass
class Engine:
    """The model as DeepSpeed runs it, with what was decided while building it."""

    engine: object  # deepspeed.DeepSpeedEngine
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    dtype: torch.dtype
    compiled: bool
    base_lr: float  # optim.lr scaled to the global batch
    num_params: int
    flops_per_image: float  # one training step's, for MFU


def build_engine(
    cfg: config_mod.Config, data: Data, device: torch.device, rank: int, init_weights: tuple | None
) -> Engine:
    import deepspeed

    t, o = cfg.train, cfg.optim
    if t.zero_stage == 0 and t.precision != "fp32":
        log.warning(
            "ZeRO stage 0 with %s: DeepSpeed then updates the 16-bit weights directly (no fp32 master copy); "
            "use train.zero_stage>=1 for fp32 masters (same memory per rank as DDP plus a partitioned fp32 copy)",
            t.precision,
        )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t.precision]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = tnt.create(
        cfg.model.variant,
        num_classes=data.train_manifest.num_classes,
        drop_path_rate=cfg.model.drop_path,
        img_size=cfg.aug.img_size,
    )
    model.grad_checkpointing = cfg.model.checkpointing
    try:
        path, why = tnt.select_inner_kernel(cfg.model.inner_kernel, device, model)
    except ValueError as e:
        raise InputError(str(e)) from None
    fell_back = cfg.model.inner_kernel == "auto" and device.type == "cuda" and path != "triton"
    (log.warning if fell_back else log.info)("inner attention: %s (%s)", path, why)
    if init_weights:  # from check_init_from
        weights, pretrained_cfg = init_weights
        pretrained.load_into(model, cfg.model.variant, weights, pretrained_cfg)
        log.info("weights from %s (%s)", cfg.model.init_from, weights)
    # after the model: each rank its own DropPath masks (and any other draw)
    distributed.seed_rank(t.seed, rank)
    flops_per_image = mfu.step_flops_per_image(model)
    num_params = tnt.count_params(model)  # before ZeRO-3 partitions the parameters
    base_lr = o.lr * data.global_batch / o.lr_batch
    warmup = int(o.warmup_epochs * data.steps_per_epoch)
    optimizer = torch.optim.AdamW(tnt.param_groups(model, o.weight_decay), lr=base_lr, betas=o.betas, eps=o.eps)
    sched_total = o.epochs * data.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, o, base_lr, warmup, sched_total) / base_lr
    )
    # DeepSpeed's optimizers print() memory statistics while they start (18 lines on
    # rank 0, see_memory_usage(force=True)): kept out of the console, in train.log
    with contextlib.redirect_stdout(io.StringIO()) as said:
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(t, o.clip_grad, data.global_batch),
        )
    if said.getvalue().strip():
        log.debug("DeepSpeed at start-up:\n%s", said.getvalue().rstrip())
    ema = EMA(engine.module, t.ema_decay) if t.ema else None
    # Default: on CUDA under ZeRO-1/2. Under ZeRO-3, dynamo traces DeepSpeed's parameter
    # hooks: on an H200 the tiny model's first 50 steps took 5 min and it then ran at
    # 200 img/s (bench/README.md), so ZeRO-3 stays eager unless train.compile=true.
    compiled = (device.type == "cuda" and t.zero_stage < 3) if t.compile is None else t.compile
    if compiled:
        # DeepSpeed compiles the module in place: engine.module, the EMA's source and
        # the export keep their parameter names. Our CPU kernels stay out of the graph
        # (kernels.cpu.kernel_on is false while dynamo traces): on CPU, compiled is slower
        # than our eager model (bench/README.md), hence off there by default.
        engine.compile()
    return Engine(engine, scheduler, ema, dtype, compiled, base_lr, num_params, flops_per_image)


def tracker(cfg: config_mod.Config, rank: int) -> Tracker:
    """The run's MLflow tracker: active on rank 0, a no-op elsewhere."""
    uri, root = cfg.mlflow.tracking_uri, cfg.mlflow.artifact_root
    return Tracker(
        uri or default_uri(cfg.out_dir),
        cfg.named(cfg.mlflow.experiment),
        enabled=rank == 0,
        artifact_root=root or default_artifact_root(uri, cfg.out_dir),
    )


def device_finishes(cfg: config_mod.Config, data: Data, rank: int, device: torch.device) -> tuple:
    """(training, evaluation) :class:`DeviceFinish` with ``data.finish=device``; (None, None)
    when the workers finish the batches."""
    if not data.finish_on_device:
        return None, None
    n, t = data.train_manifest.num_classes, cfg.train
    return (DeviceFinish(cfg.aug, n, True, t.seed, rank, device), DeviceFinish(cfg.aug, n, False, t.seed, rank, device))


def figures(cfg: config_mod.Config, data: Data, parts: Engine, rank: int, device: torch.device, tracker: Tracker):
    """The feature-map figures drawn at each evaluation (``mlflow.figures``), on rank 0.
    Not under ZeRO-3, whose parameters are partitioned over the ranks: said once."""
    from pipeline.visualize import EvalFigures

    count, zero3 = cfg.mlflow.figures, cfg.train.zero_stage == 3
    if count and zero3 and rank == 0 and data.val_manifest is not None:
        log.info("figures: not drawn under ZeRO-3 (its parameters are partitioned over the ranks)")
    return EvalFigures(
        data.val_manifest,
        cfg.aug,
        data.train_manifest.num_classes,
        count,
        cfg.out_dir,
        tracker,
        rank == 0 and not zero3,
        parts.dtype,
        device,
        cfg.train.seed,
    )


def describe(cfg: config_mod.Config, data: Data, parts: Engine, world: int, device: torch.device) -> str:
    """The run in one line, for the log."""
    t = cfg.train
    return (
        f"TNT {cfg.model.variant}: {parts.num_params / 1e6:.2f}M params | {world} ranks x micro-batch {t.micro_batch} "
        f"x accum {t.grad_accum} = {data.global_batch} | lr {parts.base_lr:.2e} | {data.steps_per_epoch} steps/epoch, "
        f"{data.total_steps} steps | ZeRO {t.zero_stage} {t.precision} ({type(parts.engine.optimizer).__name__}) | "
        f"{device}{' | compiled' if parts.compiled else ''}"
    )


def peak_tflops(cfg: config_mod.Config, device: torch.device) -> float | None:
    """The device's peak for MFU: ``train.device_peak_tflops``, or the known GPU's."""
    if cfg.train.device_peak_tflops:
        return cfg.train.device_peak_tflops
    if device.type != "cuda":
        return None
    precision = mfu.matmul_precision(cfg.train.precision, torch.backends.cuda.matmul.allow_tf32)
    return mfu.peak_tflops(torch.cuda.get_device_name(device), precision)
