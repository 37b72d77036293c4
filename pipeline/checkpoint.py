"""Checkpoints of a DeepSpeed run: save, prune, resume, with every rank's RNG state.

Layout under ``<train.out>/checkpoints/``::

    step00001000/            DeepSpeed's ZeRO files (model states, optimizer partitions)
        meta.json            step, world size, ZeRO stage, schedule, loader state, run id
        rng_rank<r>.pt       each rank's torch (CPU and CUDA), python and numpy RNG states
        ema.safetensors      the fp32 EMA (rank 0), when there is one
        optim.safetensors    ZeRO >= 1: fp32 masters and Adam moments by parameter name, the
                             same for any number of ranks (pipeline/reshard.py; rank 0)
        checksums.json       size and CRC-32 of every file above
        COMPLETE             written after every rank's files are on disk (fsynced)
    latest                   the newest complete tag: written last, atomically
    damaged-step00000900-*   a checkpoint found damaged on resume, moved aside (kept)

A crash at any point of a save leaves ``latest`` on the previous complete checkpoint.
**Another number of ranks**: DeepSpeed's files only load on the world size that wrote
them; ``optim.safetensors`` loads on any (:meth:`CheckpointManager.load_resharded`),
with the global batch kept by another ``train.grad_accum`` (:func:`elastic_grad_accum`).
On resume every file is checked against ``checksums.json`` (a node that crashes after
``COMPLETE`` but before its page cache reached the disk leaves truncated files): a
damaged checkpoint is moved aside, with a warning naming the file, and the newest
intact one is used. A save that would not fit on the disk is refused before writing
(one line: free and needed bytes, which checkpoint is intact); one that fails while
writing has its partial directory removed.
Decisions that every rank must take alike (whether to save now, which tag to resume)
are never read from the shared filesystem by each rank: on NFS with attribute caching
ranks can see different contents and then meet in mismatched collectives. The step
of the last save is kept in memory, and the tag to resume is rank 0's, broadcast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import random
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from pipeline.atomic import fsync_dir, write_atomic
from pipeline.errors import InputError, first_line

log = logging.getLogger("tntpipe.checkpoint")


@contextlib.contextmanager
def weights_only_loads():
    """Make every ``torch.load`` inside (DeepSpeed's checkpoint engine and zero_to_fp32
    call it with ``weights_only=False``) a ``weights_only=True`` load that allows just
    the DeepSpeed data classes its checkpoints hold: loading a checkpoint can then
    not run arbitrary code. Checked on ZeRO 0-3 with bf16 (ZeRO-1 with fp32 gradient
    accumulation: DeepSpeed's BF16_Optimizer), fp16 and fp32 checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    def enum_member(cls, name):
        """Some Pythons pickle an Enum member as ``getattr(cls, name)`` (3.11.2 does;
        3.11.7 pickles it by value): the state of DeepSpeed's ZeRO optimizer (fp32 at
        ZeRO-1, any precision at ZeRO-2/3) holds a ZeroStageEnum, so without this a
        checkpoint written there cannot be resumed. Only that class."""
        if cls is ZeroStageEnum:
            return getattr(cls, name)
        raise pickle.UnpicklingError(f"checkpoint asks for getattr({cls!r}, {name!r}): not allowed")

    torch.load = load
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (enum_member, "builtins.getattr")]
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original


def fsync_tree(path: str) -> None:
    """fsync every file under ``path`` and the directories: a node that crashes after
    ``COMPLETE`` must not leave a checkpoint whose files never reached the disk."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except FileNotFoundError:  # another rank's temporary file, renamed since the listing: its
                continue  # writer fsyncs the file under its final name in its own walk
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (no space, I/O error); the previous one is intact.
    ``everywhere``: every rank raises it (an agreed decision), else only the rank that failed."""

    def __init__(self, message: str, everywhere: bool):
        super().__init__(message)
        self.everywhere = everywhere


def file_crc(path: str) -> int:
    """CRC-32 of a file: enough to find a truncated or damaged file (not an attacker),
    at ~1 GB/s, so checking a TNT-B checkpoint (~1 GB) takes about a second."""
    import zlib

    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def checksums(path: str) -> dict[str, list[int]]:
    return {
        name: [os.path.getsize(os.path.join(path, name)), file_crc(os.path.join(path, name))]
        for name in sorted(os.listdir(path))
        if name not in ("checksums.json", "meta.json", "COMPLETE") and os.path.isfile(os.path.join(path, name))
    }


def damage(path: str) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when all match."""
    listed = os.path.join(path, "checksums.json")
    if not os.path.isfile(listed):  # written before checksums were kept
        return None
    with open(listed) as f:
        expected = json.load(f)
    for name, (size, crc) in expected.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if os.path.getsize(file) != size:
            return f"{file} has {os.path.getsize(file)} bytes, {size} were written"
        if file_crc(file) != crc:
            return f"{file} does not match its checksum"
    return None


def written_bytes(path: str) -> int:
    """A complete checkpoint's size as written (its checksums.json); 0 if it has none."""
    listed = os.path.join(path, "checksums.json")
    if not os.path.isfile(listed):
        return 0
    with open(listed) as f:
        return sum(size for size, _ in json.load(f).values())


SPACE_MARGIN = 1.05  # free space wanted per byte of a checkpoint


def has_room(free: int, needed: int) -> bool:
    """Whether ``free`` bytes hold a checkpoint of ``needed`` bytes (0: size unknown, yes)."""
    return not needed or free >= needed * SPACE_MARGIN


def free_bytes(path: str) -> int:
    """Free bytes of the filesystem that holds ``path`` (or would: its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def rng_state() -> dict:
    state = {
        "torch": torch.random.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_rest": [random.getstate()[0], random.getstate()[2]],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": np.random.get_state()[2],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate((state["python_rest"][0], tuple(state["python"]), state["python_rest"][1]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def tag_of(step: int) -> str:
    return f"step{step:08d}"


class CheckpointManager:
    """Saves and restores the engine, the EMA, the RNG states and a client dict.

    ``every_steps`` / ``every_min`` are the saving policy (:meth:`due`); ``keep_last``
    complete checkpoints are kept."""

    def __init__(
        self, folder: str, rank: int, world: int, every_steps: int = 0, every_min: float = 0.0, keep_last: int = 3
    ):
        self.folder = folder
        self.rank, self.world = rank, world
        self.every_steps, self.every_min = every_steps, every_min
        self.keep_last = max(1, keep_last)
        self.last_step: int | None = None  # the step of the newest complete checkpoint, in memory
        self.last_bytes = 0  # its size on disk
        self.last_time = time.monotonic()

    # ----- policy

    def due(self, step: int) -> bool:
        """This rank's view of whether the step interval says save. (The time interval is
        rank 0's clock: :meth:`time_due`, agreed on by the trainer's flags all-reduce.)"""
        return bool(self.every_steps) and step % self.every_steps == 0

    def time_due(self) -> bool:
        return bool(self.every_min) and time.monotonic() - self.last_time >= 60 * self.every_min

    def saved(self, step: int) -> bool:
        return self.last_step == step

    # ----- save

    def save(self, step: int, engine, client: dict, meta: dict, ema=None, needed_bytes: int = 0) -> str:
        """Synchronizes ranks (the space check's all-reduce, DeepSpeed's save, barriers):
        every rank calls it together. ``needed_bytes``: the size of a checkpoint before
        the first one was written (after that, the last one's size)."""
        tag = tag_of(step)
        path = os.path.join(self.folder, tag)
        self._check_space(tag, self.last_bytes or needed_bytes)
        try:
            engine.save_checkpoint(self.folder, tag=tag, client_state=client, save_latest=False)
            if engine.zero_optimization_stage() >= 1:  # the optimizer state by name: resumable on any world size
                from pipeline import reshard

                state, adam_step = reshard.gather(engine, keep=self.rank == 0)
                if self.rank == 0:
                    reshard.save(os.path.join(path, RESHARDABLE), state, adam_step)
                del state
            torch.save(rng_state(), os.path.join(path, f"rng_rank{self.rank}.pt"))
            if ema is not None and self.rank == 0:
                from safetensors.torch import save_file

                state = {k: v.contiguous() for k, v in ema.state_dict().items()}
                save_file(state, os.path.join(path, "ema.safetensors"))
            fsync_tree(path)  # each rank, before anyone marks the checkpoint complete
        except (OSError, RuntimeError) as exc:
            # this rank alone may fail here: the others then wait at the barrier below
            # until the launcher stops them (it does when one rank exits non-zero) or
            # train.dist_timeout_s passes
            raise self._write_failed(tag, path, exc) from None
        dist.barrier()
        if self.rank == 0:
            sums = checksums(path)
            self.last_bytes = sum(size for size, _ in sums.values())
            write_atomic(os.path.join(path, "checksums.json"), json.dumps(sums, indent=1))
            write_atomic(os.path.join(path, "meta.json"), json.dumps({**client, **meta, "time": time.time()}, indent=1))
            write_atomic(os.path.join(path, "COMPLETE"), "")
            write_atomic(os.path.join(self.folder, "latest"), tag)
            self._prune(tag)
            log.info("checkpoint %s", path)
        dist.barrier()
        self.last_step, self.last_time = step, time.monotonic()
        return path

    def _check_space(self, tag: str, needed: int) -> None:
        """Rank 0 compares the free space with the size a checkpoint takes; every rank
        agrees on its answer before anyone writes. Synchronizes ranks."""
        from pipeline import distributed

        free = free_bytes(self.folder) if self.rank == 0 else 0
        (short,) = distributed.agree_any([self.rank == 0 and not has_room(free, needed)], distributed.device())
        if short:
            raise CheckpointWriteError(
                f"checkpoint {tag} cannot be written to {self.folder}: no space left on the device "
                f"({free / 1e6:.1f} MB free, ~{needed / 1e6:.1f} MB needed); "
                f"{self._intact()}; free space and run the same command to resume",
                everywhere=True,
            )

    def _intact(self) -> str:
        return (
            f"the previous checkpoint {tag_of(self.last_step)} is intact"
            if self.last_step is not None
            else "no checkpoint was written yet"
        )

    def _write_failed(self, tag: str, path: str, exc: BaseException) -> CheckpointWriteError:
        free = free_bytes(self.folder)
        first = first_line(exc, 200) or type(exc).__name__
        nospace = (
            isinstance(exc, OSError)
            and exc.errno == 28
            or free < max(self.last_bytes, 1)
            or "iostream error" in str(exc)
            or "No space" in str(exc)
        )
        why = f"no space left on the device ({free / 1e6:.1f} MB free)" if nospace else first
        shutil.rmtree(path, ignore_errors=True)  # the partial directory would keep the disk full
        return CheckpointWriteError(
            f"checkpoint {tag} could not be written to {self.folder} ({why}); "
            f"its partial directory was removed; {self._intact()}",
            everywhere=False,
        )

    def _prune(self, latest: str) -> None:
        tags = sorted(
            d for d in os.listdir(self.folder) if d.startswith("step") and os.path.isdir(os.path.join(self.folder, d))
        )
        complete = [d for d in tags if os.path.isfile(os.path.join(self.folder, d, "COMPLETE"))]
        keep = set(complete[-self.keep_last :]) | {latest}
        for d in tags:
            if d not in keep and d <= latest:
                shutil.rmtree(os.path.join(self.folder, d), ignore_errors=True)

    # ----- resume

    def latest(self) -> str | None:
        """The newest complete tag as rank 0 reads it, the same on every rank
        (synchronizes ranks: a broadcast)."""
        found = [self._read_latest() if self.rank == 0 else None]
        if dist.is_initialized() and self.world > 1:
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def _complete(self, tag: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, tag, "COMPLETE"))

    def _read_latest(self) -> str | None:
        """``latest`` when it names a complete, intact checkpoint; else the newest one
        that is, with a warning. A damaged one is moved aside (never deleted)."""
        path = os.path.join(self.folder, "latest")
        tag = None
        if os.path.isfile(path):
            with open(path) as f:
                tag = f.read().strip()
        complete = (
            sorted(d for d in os.listdir(self.folder) if d.startswith("step") and self._complete(d))
            if os.path.isdir(self.folder)
            else []
        )
        candidates = ([tag] if tag in complete else []) + [d for d in reversed(complete) if d != tag]
        for candidate in candidates:
            wrong = damage(os.path.join(self.folder, candidate))
            if wrong:
                aside = os.path.join(self.folder, f"damaged-{candidate}-{time.strftime('%Y%m%dT%H%M%S')}")
                os.replace(os.path.join(self.folder, candidate), aside)
                log.warning(
                    "checkpoint %s is damaged (%s): moved to %s, trying the one before", candidate, wrong, aside
                )
                continue
            if candidate != tag:
                log.warning(
                    "%s names %s, which is not a complete intact checkpoint: resuming from %s, the newest that is",
                    path,
                    tag or "nothing",
                    candidate,
                )
                write_atomic(path, candidate)
            self.last_bytes = written_bytes(os.path.join(self.folder, candidate)) or self.last_bytes
            return candidate
        return None

    def meta(self, tag: str) -> dict:
        with open(os.path.join(self.folder, tag, "meta.json")) as f:
            return json.load(f)

    def reshardable(self, tag: str) -> bool:
        return os.path.isfile(os.path.join(self.folder, tag, RESHARDABLE))

    def load_resharded(self, tag: str, engine, seed: int, ema=None) -> RunState:
        """Restore ``tag``, written on another number of ranks: the weights, fp32 masters
        and Adam state from ``optim.safetensors``, the EMA; each rank's RNG states are
        drawn afresh from ``(seed, step, rank)`` (the old ranks' do not map onto the new
        ones). Returns the run's state (from ``meta.json``). Synchronizes ranks."""
        from pipeline import distributed, reshard

        path = os.path.join(self.folder, tag)
        meta = self.meta(tag)
        reshard.load(engine, *reshard.read(os.path.join(path, RESHARDABLE)))
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
        derived = distributed.rank_seed(seed, self.rank) ^ int(meta["step"])
        distributed.seed_rank(derived, self.rank)
        random.seed(derived)
        np.random.seed(derived % (1 << 32))
        self.last_step = int(meta["step"])
        return RunState.of(meta)

    def load(self, tag: str, engine, ema=None) -> RunState:
        """Restore the engine, this rank's RNG states and the EMA from ``tag``; returns
        the run's state. Synchronizes ranks (DeepSpeed's load)."""
        path = os.path.join(self.folder, tag)
        with weights_only_loads():
            _, client = engine.load_checkpoint(self.folder, tag=tag)
        set_rng_state(torch.load(os.path.join(path, f"rng_rank{self.rank}.pt"), weights_only=True))
        if ema is not None:
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(os.path.join(path, "ema.safetensors")))
        self.last_step = int(client["step"])
        return RunState.of(client)


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds besides the engine, the RNG states and the EMA: the
    trainer's client state, saved by DeepSpeed and in ``meta.json``. Its fields are the
    one list of those keys, which :meth:`CheckpointManager.save` writes and both loads
    read (a reshard once lost a key that its own copy of the list lacked)."""

    loader: dict | None = None  # Loader.state_dict()
    step: int = 0
    best_top1: float = -1.0
    mlflow_run_id: str | None = None
    registry: dict | None = None  # Registrar.state_dict(); absent in checkpoints from before 2026-11

    def client(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, client: dict) -> "RunState":
        """From a saved client dict (or a ``meta.json``, which holds it)."""
        state = cls(**{f.name: client[f.name] for f in dataclasses.fields(cls) if f.name in client})
        state.step, state.best_top1 = int(state.step), float(state.best_top1)
        return state


RESHARDABLE = "optim.safetensors"


def estimate_bytes(num_params: int, precision: str, zero_stage: int, ema: bool) -> int:
    """A checkpoint's size before the first is written (the free-space check): the 16- or
    32-bit weights, AdamW's two fp32 moments, the fp32 masters (ZeRO >= 1 in 16 bits),
    the EMA, and ``optim.safetensors`` (ZeRO >= 1: masters and moments by name)."""
    per_param = {"bf16": 2, "fp16": 2, "fp32": 4}[precision] + 8
    per_param += 4 if zero_stage >= 1 and precision != "fp32" else 0
    per_param += 4 if ema else 0
    per_param += 12 if zero_stage >= 1 else 0
    return num_params * per_param


def check_layout(meta: dict, path: str, world: int, zero_stage: int, out: str, reshardable: bool = False) -> None:
    """``path``: what wrote ``meta`` (a checkpoint, a finished run), for the message.
    Another number of ranks is fine when the checkpoint has its optimizer state by name
    (``reshardable``); another ZeRO stage is not."""
    if meta["zero_stage"] != zero_stage or (meta["world_size"] != world and not reshardable):
        why = (
            ""
            if meta["zero_stage"] != zero_stage
            else " (a checkpoint without optimizer state by name: ZeRO-0, or written before it was kept)"
        )
        raise InputError(
            f"{path} was written by {meta['world_size']} ranks with ZeRO stage {meta['zero_stage']}{why}, "
            f"this run has {world} ranks and stage {zero_stage}: resume with the same layout, "
            f"or start a new output directory from the weights with model.init_from={out}/export/model.safetensors "
            "(optimizer state restarts)"
        )


def peek_latest(folder: str) -> dict | None:
    """The meta of the checkpoint ``latest`` names, as this process reads it (before any
    process group: the trainer's batch layout depends on it; it checks afterwards that
    every rank read the same)."""
    try:
        with open(os.path.join(folder, "latest")) as f:
            tag = f.read().strip()
        with open(os.path.join(folder, tag, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def elastic_grad_accum(meta: dict, world: int, micro_batch: int, grad_accum: int, allow_change: bool, path: str) -> int:
    """``train.grad_accum`` for resuming on ``world`` ranks what ``meta`` was written
    with on another number: the one that keeps the global batch (and so the lr, the
    steps per epoch and the schedule). When none does: refused in one line naming the
    numbers of ranks that can, unless ``allow_change`` (``train.allow_batch_change``):
    then the configured one, and the lr follows the new global batch (linear rule)."""
    saved = meta["schedule"]["global_batch"]
    if saved % (micro_batch * world) == 0:
        return saved // (micro_batch * world)
    if allow_change:
        return grad_accum
    per = saved // micro_batch if saved % micro_batch == 0 else 0
    fits = [str(r) for r in range(1, per + 1) if per % r == 0]
    raise InputError(
        f"{path} was written by {meta['world_size']} ranks with a global batch of {saved}; {world} ranks x "
        f"micro-batch {micro_batch} cannot make it with any train.grad_accum: resume on "
        f"{', '.join(fits) or 'the same number of'} ranks, or pass train.allow_batch_change=true "
        f"(global batch {micro_batch * grad_accum * world}, lr scaled to it)"
    )


def check_schedule(saved: dict | None, current: dict, path: str, allow: bool) -> list[str]:
    """The schedule keys that differ from the checkpoint's (``key old -> new``). A change
    is refused, since the lr curve would jump (a 2-epoch run resumed with 4 epochs went
    from lr 1e-5 back to 8e-4), unless ``train.allow_schedule_change=true``."""
    if saved is None:  # a checkpoint from before schedules were recorded
        return []
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in current.items() if saved.get(k) != v]
    if changed and not allow:
        raise InputError(
            f"{path} was written with another schedule ({'; '.join(changed)}): resume with the same "
            "settings, use a new train.out, or pass train.allow_schedule_change=true to continue with the new one"
        )
    return changed
