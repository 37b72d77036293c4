"""One typed training configuration: a YAML file plus ``section.key=value`` overrides.

    python -m pipeline.train --config configs/tnt_s.yaml train.micro_batch=64 optim.lr=5e-4

Every field below is a valid override key; values are parsed as YAML (``true``,
``1e-3``, ``[0.5, 1.0]``). Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Any, Literal

import yaml

from pipeline.errors import InputError, first_line
from pipeline.transforms import Augment
from pipeline.variants import VARIANTS


@dataclasses.dataclass
class ModelCfg:
    variant: str = "tntp_s_patch16_224"  # pipeline/variants.py
    drop_path: float = 0.1  # stochastic depth rate (paper: 0.1)
    checkpointing: bool = False  # activation checkpointing per block
    # weights to start from (fine-tuning): models:/<name>@<alias> or models:/<name>/<version>
    # (resolved against mlflow.tracking_uri), runs:/<run id>/<path>, a safetensors file (our
    # export or timm's layout), an export/ directory or a timm checkpoint (.pth, .pth.tar);
    # another class count re-initialises the head, another image size resamples patch_pos
    init_from: str = ""  # "" : random initialisation (pipeline/pretrained.py)
    # inner attention kernel: auto (the Triton kernel on CUDA after a start-up self-check,
    # else torch's path, said in one warning line), triton (the kernel or an error), torch
    inner_kernel: str = "auto"

    def __post_init__(self):
        if self.inner_kernel not in ("auto", "triton", "torch"):
            raise InputError(f"model.inner_kernel must be auto, triton or torch, not {self.inner_kernel!r}")


@dataclasses.dataclass
class DataCfg:
    train: str = "shards/imagenet/train"  # split dir holding manifest.json
    val: str = "shards/imagenet/val"  # "" for no evaluation
    url_base: str = ""  # shard URL prefix or template with {shard}; default: next to the manifest
    workers: int = 8  # DataLoader workers per rank
    shuffle_buffer: int = 1000  # samples held per worker for shuffling (memory: x mean JPEG size)
    repeats: int = 1  # repeated augmentation (the official recipe uses 3)
    eval_batch: int = 0  # 0: the training micro-batch
    # normalise/erase/Mixup: worker (float batches), device (uint8 batches, done on the GPU), auto: device on CUDA
    finish: str = "auto"
    timeout_s: float = 600.0  # a rank whose DataLoader workers deliver no batch for this long fails (0: wait forever)
    # Shards in an object store (data.train=s3://bucket/prefix/train, or http(s)://):
    retries: int = 6  # attempts per request; each resumes from the byte reached; then the shard counts as bad
    backoff_s: float = 0.5  # first wait between attempts, doubled each time (full jitter, at most 10 s)
    read_timeout_s: float = 60.0  # a connection that sends nothing for this long is retried
    cache_dir: str = ""  # local directory caching whole shards (sha256-checked, shared by a node's ranks); "": none
    cache_limit: int = 0  # cache size in bytes, least recently used evicted (0: no limit)

    def store(self):
        """The :class:`pipeline.store.Store` these settings describe."""
        from pipeline.store import Policy, ShardCache, Store

        policy = Policy(
            attempts=self.retries,
            backoff=self.backoff_s,
            read_timeout=self.read_timeout_s,
            connect_timeout=min(10.0, self.read_timeout_s),
        )
        return Store(policy, ShardCache(self.cache_dir, self.cache_limit) if self.cache_dir else None)

    def __post_init__(self):
        if self.finish not in ("auto", "worker", "device"):
            raise InputError(f"data.finish must be auto, worker or device, not {self.finish!r}")
        from pipeline.store import check_url

        for url in (self.train, self.val, self.url_base):
            if url:
                check_url(url)


@dataclasses.dataclass
class OptimCfg:
    epochs: int = 300  # schedule length
    lr: float = 1e-3  # at global batch lr_batch, scaled linearly
    lr_batch: int = 1024  # official TNT: 1e-3 at 1024; DeiT rule: lr 5e-4, lr_batch 512
    min_lr: float = 1e-5  # end of the cosine
    warmup_lr: float = 1e-6  # start of the linear warm-up
    warmup_epochs: float = 5.0  # linear warm-up length (fractions allowed)
    weight_decay: float = 0.05  # AdamW; not on norms, biases, position encodings, class token
    eps: float = 1e-8  # AdamW epsilon
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    clip_grad: float = 0.0  # 0: off


@dataclasses.dataclass
class TrainCfg:
    out: str = "runs/{name}"  # checkpoints, exports, logs ({name}, {data}, {model}); the same out resumes
    micro_batch: int = 128  # per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0-3
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # bf16 | fp16 | fp32 (TF32 matmuls on CUDA)
    ema: bool = True  # keep and evaluate a weight EMA (ZeRO 0-2)
    ema_decay: float = 0.99996  # per optimizer step
    seed: int = 0  # model init, data order and augmentation
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs)
    log_every: int = 50  # optimizer steps
    eval_every: int = 1  # epochs (0: only at the end)
    ckpt_every: int = 1000  # optimizer steps between checkpoints (0: off); always one at the end
    ckpt_every_min: float = 0.0  # minutes between checkpoints by rank 0's clock (0: off)
    keep_last: int = 3  # complete checkpoints kept (>= 2: one to fall back to)
    max_nonfinite: int = 10  # consecutive non-finite losses before stopping
    device_peak_tflops: float = 0.0  # for MFU; 0: looked up from the exact device name (pipeline/mfu.py)
    dist_timeout_s: float = 600.0  # seconds a collective waits for a missing rank before failing
    lock_wait_s: float = (
        120.0  # wait this long for another job's lock on train.out (a dead NFS client's lease) before refusing
    )
    heartbeat_timeout_s: float = (
        30.0  # a rank silent this long (stopped, hung, node or network down) ends the run (0: off)
    )
    allow_schedule_change: bool = False  # resume although the lr schedule (epochs, lr, batch...) changed
    allow_batch_change: bool = (
        False  # resume on a number of ranks that cannot keep the global batch (lr scales with it)
    )
    compile: bool | None = (
        None  # torch.compile the model (DeepSpeed's engine.compile); null: on CUDA under ZeRO-1/2, else off
    )

    def __post_init__(self):
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise InputError(f"train.precision must be bf16, fp16 or fp32, not {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise InputError(f"train.zero_stage must be 0, 1, 2 or 3, not {self.zero_stage!r}")
        if self.zero_stage == 3 and self.ema:
            raise InputError(
                "train.ema needs the full weights on every rank: use train.zero_stage<=2 or train.ema=false"
            )
        if self.compile not in (None, True, False):
            raise InputError(f"train.compile must be true, false or null (on CUDA only), not {self.compile!r}")


@dataclasses.dataclass
class MlflowCfg:
    tracking_uri: str = ""  # default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db
    artifact_root: str = ""  # new experiments' artifacts; default: <out>/mlartifacts with the SQLite store
    experiment: str = "tnt-{data}"  # MLflow experiment; {data}: the data set's name (shards/<data>/train)
    run_name: str = ""  # default: the config name; {data} as above
    register_as: str = "{model}-{data}"  # registered model name ("" to skip); {model}: the variant's short name (tnt-s)
    system_metrics: bool = True  # CPU/GPU/memory metrics of rank 0
    register_best: bool = True  # register a version at each new best evaluation, not only at the end
    register_weights: str = "auto"  # auto (the better top-1 of model and EMA at that evaluation), model or ema
    # validation images in the feature-map figures drawn at each evaluation (pipeline/visualize.py), 0: none
    figures: int = 4

    def __post_init__(self):
        if self.register_weights not in ("auto", "model", "ema"):
            raise InputError(f"mlflow.register_weights must be auto, model or ema, not {self.register_weights!r}")


@dataclasses.dataclass
class Config:
    name: str = "tnt-s"  # run name; fills {name} in train.out
    model: ModelCfg = dataclasses.field(default_factory=ModelCfg)
    data: DataCfg = dataclasses.field(default_factory=DataCfg)
    aug: Augment = dataclasses.field(default_factory=Augment)
    optim: OptimCfg = dataclasses.field(default_factory=OptimCfg)
    train: TrainCfg = dataclasses.field(default_factory=TrainCfg)
    mlflow: MlflowCfg = dataclasses.field(default_factory=MlflowCfg)

    def __post_init__(self):
        if self.mlflow.register_weights == "ema" and not self.train.ema:
            raise InputError("mlflow.register_weights=ema needs train.ema=true (or use auto or model)")
        check_limits(self)

    @property
    def out_dir(self) -> str:
        return self.named(self.train.out)

    @property
    def data_name(self) -> str:
        """The data set's name: ``mnist`` for ``shards/mnist/train``, ``x`` for ``x/``."""
        train = self.data.train.split("://", 1)[-1].rstrip("/")  # s3://bucket/x/train: x
        path = os.path.normpath(os.path.abspath(train)) if train else ""
        if os.path.basename(path) in ("train", "val", "validation", "test"):
            path = os.path.dirname(path)
        return os.path.basename(path) or "data"

    @property
    def model_name(self) -> str:
        """The variant's short name: ``tnt-s`` for ``tntp_s_patch16_224``, ``tnt-b-se``
        for ``tntp_b_se_patch16_224``, ``tnt-digits-imgconv`` for the demo's."""
        return "tnt-" + self.model.variant.removeprefix("tntp_").split("_patch")[0].replace("_", "-")

    def named(self, template: str) -> str:
        """``template`` with ``{name}``, ``{data}`` and ``{model}`` filled in (MLflow names)."""
        return template.format(name=self.name, data=self.data_name, model=self.model_name)

    def resolved(self) -> dict[str, Any]:
        """:meth:`flat` with the name templates filled in: what MLflow shows as params."""
        flat = self.flat()
        return {**flat, **{k: self.named(flat[k]) for k in TEMPLATED}}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``, for MLflow params."""
        out = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return out


@dataclasses.dataclass(frozen=True)
class Limit:
    """The values a numeric key takes: ``lo <= x <= hi`` (``None``: no bound); ``lo_open``/
    ``hi_open`` make a bound strict. Tuples (``aug.scale``) are checked element by element."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def holds(self, x: float) -> bool:
        return (
            math.isfinite(x)
            and (self.lo is None or x > self.lo or (not self.lo_open and x == self.lo))
            and (self.hi is None or x < self.hi or (not self.hi_open and x == self.hi))
        )

    def __str__(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() and abs(x) < 2**63 else f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, PROBABILITY = Limit(0, lo_open=True), Limit(0), Limit(0, 1)
COUNT = Limit(1)  # 1, 2, 3...
# Every numeric key's range, checked when a config loads (a value outside it: one line,
# exit 2, nothing written). Upper bounds catch typos (micro_batch=12800000) and values
# that would fail hours later (a seed past numpy's 2**32). optim.lr allows 1e30: the
# non-finite-loss test blows the weights up with it.
LIMITS: dict[str, Limit] = {
    "model.drop_path": Limit(0, 1, hi_open=True),
    "data.workers": Limit(0, 1024),
    "data.shuffle_buffer": Limit(0, 10**8),
    "data.repeats": Limit(1, 64),
    "data.eval_batch": Limit(0, 2**20),
    "data.timeout_s": NON_NEGATIVE,
    "data.retries": Limit(1, 1000),
    "data.backoff_s": Limit(0, 3600),
    "data.read_timeout_s": POSITIVE,
    "data.cache_limit": NON_NEGATIVE,
    "optim.epochs": Limit(1, 10**6),
    "optim.lr": Limit(0, 1e30, lo_open=True),
    "optim.lr_batch": Limit(1, 2**24),
    "optim.min_lr": Limit(0, 10),
    "optim.warmup_lr": Limit(0, 10),
    "optim.warmup_epochs": Limit(0, 10**6),
    "optim.weight_decay": Limit(0, 10),
    "optim.eps": Limit(0, 1, lo_open=True),
    "optim.betas": Limit(0, 1, hi_open=True),
    "optim.clip_grad": NON_NEGATIVE,
    "train.micro_batch": Limit(1, 2**20),
    "train.grad_accum": Limit(1, 2**16),  # train.zero_stage: TrainCfg
    "train.ema_decay": Limit(0, 1, hi_open=True),
    "train.seed": Limit(0, 2**31 - 1),
    "train.max_steps": Limit(0, 2**53),
    "train.log_every": COUNT,
    "train.eval_every": NON_NEGATIVE,
    "mlflow.figures": Limit(0, 64),  # images per set of figures (0: none)
    "train.ckpt_every": NON_NEGATIVE,
    "train.ckpt_every_min": NON_NEGATIVE,
    "train.keep_last": Limit(1, 10**4),
    "train.max_nonfinite": COUNT,
    "train.device_peak_tflops": NON_NEGATIVE,
    "train.dist_timeout_s": POSITIVE,
    "train.lock_wait_s": NON_NEGATIVE,
    "train.heartbeat_timeout_s": NON_NEGATIVE,
    "aug.img_size": Limit(8, 4096),
    "aug.scale": Limit(0, 1, lo_open=True),
    "aug.ratio": Limit(0, 100, lo_open=True),
    "aug.hflip": PROBABILITY,
    "aug.color_jitter": NON_NEGATIVE,
    "aug.mean": Limit(-1e3, 1e3),
    "aug.std": Limit(0, 1e3, lo_open=True),
    "aug.re_prob": PROBABILITY,
    "aug.re_count": Limit(1, 100),
    "aug.mixup": NON_NEGATIVE,
    "aug.cutmix": NON_NEGATIVE,
    "aug.mixup_prob": PROBABILITY,
    "aug.mixup_switch_prob": PROBABILITY,
    "aug.label_smoothing": Limit(0, 1, hi_open=True),
    "aug.crop_pct": Limit(0, 1, lo_open=True),
}
# keys whose value is a name template ({name}, {data}, {model}: Config.named)
TEMPLATED = ("mlflow.experiment", "mlflow.run_name", "mlflow.register_as", "train.out")
# string keys whose value cannot be empty, and those with a fixed set of values
NOT_EMPTY = ("name", "model.variant", "data.train", "train.out", "mlflow.experiment")
CHOICES = {"aug.interpolation": ("bicubic", "bilinear", "nearest"), "aug.re_mode": ("pixel", "rand", "const")}


def check_limits(cfg: "Config") -> None:
    """InputError naming the first key outside :data:`LIMITS`, :data:`NOT_EMPTY` or
    :data:`CHOICES`, or a variant :mod:`pipeline.variants` does not have."""
    flat = cfg.flat()
    for key, limit in LIMITS.items():
        value = flat[key]
        if not all(limit.holds(x) for x in (value if isinstance(value, tuple) else (value,))):
            raise InputError(f"{key} must be {limit}{' (each)' if isinstance(value, tuple) else ''}, not {value!r}")
    for key in NOT_EMPTY:
        if not str(flat[key]).strip():
            raise InputError(f"{key} cannot be empty")
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise InputError(f"{key} must be one of {', '.join(choices)}, not {flat[key]!r}")
    for key in ("aug.scale", "aug.ratio"):
        if flat[key][0] > flat[key][1]:
            raise InputError(f"{key} is a (low, high) range, not {flat[key]!r}")
    for key in TEMPLATED:
        try:
            flat[key].format(name="n", data="d", model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(
                f"{key}={flat[key]!r}: not a name template ({type(exc).__name__}: {exc}; "
                "placeholders: {name}, {data}, {model})"
            ) from None
    if cfg.model.variant not in VARIANTS:
        raise InputError(f"model.variant {cfg.model.variant!r} is not one of {', '.join(VARIANTS)}")


def _build(cls, values: dict, where: str):
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    defaults = cls()
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in types:
            raise InputError(f"unknown config key {where}{key} (valid: {', '.join(sorted(types))})")
        default = getattr(defaults, key)
        if value is None and "None" not in types[key]:  # `key=` or `key: null`
            if not isinstance(default, str):
                raise InputError(f"config key {where}{key} wants a value of type {type(default).__name__}, got none")
            value = ""
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise InputError(f"config key {where}{key} is a section, not a value")
            kwargs[key] = _build(type(default), value, f"{where}{key}.")
        elif isinstance(default, tuple):
            if not (
                isinstance(value, list)
                and len(value) == len(default)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
            ):
                raise InputError(f"config key {where}{key} wants {len(default)} numbers ([a, b...]), got {value!r}")
            kwargs[key] = tuple(float(x) for x in value)
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and isinstance(value, bool):
            raise InputError(f"config key {where}{key} wants a number, got {value!r}")
        elif isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads 4e-3 (no dot) as a string
                kwargs[key] = float(value)
            except ValueError:
                raise InputError(f"config key {where}{key} wants a number, got {value!r}") from None
        elif default is not None and value is not None and not isinstance(value, type(default)):
            raise InputError(f"config key {where}{key} wants a value of type {type(default).__name__}, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _set(tree: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise InputError(f"config key {dotted}: {part} is not a section")
    tree[last] = value


def load(path: str = "", overrides: list[str] = ()) -> Config:
    tree: dict = {}
    if path:
        if not os.path.isfile(path):
            raise InputError(f"no config file {path}")
        with open(path) as f:
            tree = _parse_yaml(f, path) or {}
        if not isinstance(tree, dict):
            raise InputError(
                f"{path}: a config file is a mapping of sections (model:, data:, ...), not a {type(tree).__name__}"
            )
    for item in overrides:
        if "=" not in item:
            raise InputError(f"override {item!r} is not section.key=value")
        key, value = item.split("=", 1)
        _set(tree, key.strip(), _parse_yaml(value, f"override {item!r}"))
    return _build(Config, tree, "")


def _parse_yaml(text, where: str):
    """YAML, or one line naming ``where`` and the line and column of the first error
    (yaml's own message is a multi-line traceback-like report)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise InputError(f"{where}:{at}: not valid YAML ({problem})") from None


def _comments(cls) -> dict[str, str]:
    """The ``# ...`` comment after each field of a dataclass: the keys' documentation."""
    import inspect
    import re

    found = re.findall(r"^\s+(\w+): [^=]+=.*?#\s*(.+)$", inspect.getsource(cls), re.M)
    return dict(found)


def describe() -> str:
    """Every key with its default and its comment, for --help."""
    lines = []
    for key, value in Config().to_dict().items():
        if isinstance(value, dict):
            notes = _comments(type(getattr(Config(), key)))
            for k, v in value.items():
                line = f"  {key}.{k} = {v!r}"
                lines.append(f"{line:<48} {notes[k]}" if k in notes else line)
        else:
            line = f"  {key} = {value!r}"
            note = _comments(Config).get(key)
            lines.append(f"{line:<48} {note}" if note else line)
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="", help="YAML config file (configs/*.yaml); defaults: the TNT-S recipe")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, applied after the file")


def load_argv(argv: list[str]) -> Config:
    """The config a trainer command line (``--config FILE key=value ...``) loads."""
    p = argparse.ArgumentParser(prog="python -m pipeline.train")
    add_arguments(p)
    args = p.parse_args(argv)
    return load(args.config, args.overrides)
