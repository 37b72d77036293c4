"""Resume policy: what a run in an existing ``train.out`` may continue from, and how.

* A finished run re-run with the same schedule does nothing (:class:`Finished`); with
  another, it is refused unless ``train.allow_schedule_change`` (:func:`check_finished`).
* On another number of ranks than the latest checkpoint's, ``train.grad_accum`` is
  chosen to keep its global batch, read by every rank before the process group
  (:func:`adapt_grad_accum`), then checked to agree across ranks
  (:func:`agree_grad_accum`).
* :func:`resume` restores the newest checkpoint: directly on the same layout, through
  the optimizer state by name on another (:meth:`CheckpointManager.load_resharded`),
  with the lr schedule put back at its step (:func:`schedule_at`).

The checks themselves (layout, schedule, the elastic batch arithmetic) are in
:mod:`pipeline.checkpoint`, beside the files they read.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from pipeline.atomic import write_atomic
from pipeline.checkpoint import (
    CheckpointManager,
    RunState,
    check_layout,
    check_schedule,
    elastic_grad_accum,
    peek_latest,
)
from pipeline.errors import InputError

log = logging.getLogger("tntpipe.train")


class Finished(Exception):
    """The run in this output directory is already finished: nothing to do."""


def adapt_grad_accum(cfg, world: int) -> str | None:
    """Resuming on another number of ranks: sets ``train.grad_accum`` to what keeps the
    latest checkpoint's global batch (or refuses, in one line). Returns the change
    (``"2 ranks x accum 1 -> 1 ranks x accum 2"``), None when there is none. Read by each
    rank before the process group exists; :func:`agree_grad_accum` checks they agree."""
    t = cfg.train
    meta = peek_latest(os.path.join(cfg.out_dir, "checkpoints"))
    if meta is None or meta.get("world_size", world) == world or "schedule" not in meta:
        return None
    accum = elastic_grad_accum(
        meta,
        world,
        t.micro_batch,
        t.grad_accum,
        t.allow_batch_change,
        f"the checkpoint at step {meta['step']} in {cfg.out_dir}",
    )
    change = f"{meta['world_size']} ranks x accum {meta.get('grad_accum', '?')} -> {world} ranks x accum {accum}"
    t.grad_accum = accum
    return change


def agree_grad_accum(grad_accum: int, world: int, device: torch.device, out: str) -> None:
    """Every rank must run the same ``train.grad_accum`` (DeepSpeed's config): one
    all-reduce of it and its negative. Synchronizes ranks."""
    if world < 2:
        return
    both = torch.tensor([grad_accum, -grad_accum], device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    if int(both[0]) != -int(both[1]):
        raise InputError(
            f"ranks read different checkpoints in {out} (train.grad_accum {int(-both[1])} to "
            f"{int(both[0])}): is the shared filesystem up to date on every node?"
        )


def expected_schedule(schedule: dict, meta: dict, world: int, allow_batch_change: bool) -> dict:
    """The schedule a resume of ``meta`` (a checkpoint's, a finished run's) must have:
    ``schedule`` (this run's), except that on another number of ranks with
    ``train.allow_batch_change`` the global batch, and so the steps per epoch, may change."""
    expected = dict(schedule)
    saved = meta.get("schedule") or {}
    if allow_batch_change and meta.get("world_size", world) != world:
        expected.update({k: saved[k] for k in ("global_batch", "steps_per_epoch") if k in saved})
    return expected


def check_finished(cfg, schedule: dict, total_steps: int) -> None:
    """A finished run re-run with the same settings: :class:`Finished` (no new model
    version, no duplicate evaluation). With another schedule: refused, unless
    ``train.allow_schedule_change``. Before any process group: any number of ranks may
    look at a finished run."""
    out, t = cfg.out_dir, cfg.train
    path = os.path.join(out, "FINISHED.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        done = json.load(f)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if "world_size" in done:
        check_layout(done, f"the finished run {path}", world, t.zero_stage, out, reshardable=True)
    changed = check_schedule(
        done.get("schedule"),
        expected_schedule(schedule, done, world, t.allow_batch_change),
        f"the finished run {path}",
        t.allow_schedule_change,
    )
    if not changed and done["step"] >= total_steps:
        raise Finished(
            f"{out} holds a finished run (step {done['step']}, MLflow run {done.get('run_id')}, "
            f"model version {done.get('version') or '-'}): nothing to do; use another train.out for a new run"
        )


def mark_finished(cfg, done: dict, schedule: dict) -> None:
    """``FINISHED.json``, what :func:`check_finished` reads: ``done`` (step, epoch, MLflow run,
    registered version, world size...) with the ZeRO stage and the schedule it ran."""
    done = {**done, "zero_stage": cfg.train.zero_stage, "schedule": schedule, "time": time.time()}
    write_atomic(os.path.join(cfg.out_dir, "FINISHED.json"), json.dumps(done, indent=1))


def resume(checkpointer: CheckpointManager, cfg, data, engine, world: int) -> tuple[RunState, list[str]] | None:
    """Restore the newest checkpoint into ``engine`` (:class:`pipeline.build.Engine`) and
    ``data.loader``: its run state and the schedule keys it changed
    (``train.allow_schedule_change``); None when there is none. Synchronizes ranks."""
    tag = checkpointer.latest()
    if tag is None:
        return None
    path = os.path.join(checkpointer.folder, tag)
    meta = checkpointer.meta(tag)
    t = cfg.train
    elastic = meta["world_size"] != world
    check_layout(meta, f"checkpoint {path}", world, t.zero_stage, cfg.out_dir, checkpointer.reshardable(tag))
    if elastic and data.layout_change is None:  # rank 0 fell back to an older checkpoint than the one peeked at
        raise InputError(
            f"checkpoint {path} was written by {meta['world_size']} ranks, the newest one by "
            f"{world}: run the same command again"
        )
    changed = check_schedule(
        meta.get("schedule"),
        expected_schedule(data.schedule, meta, world, t.allow_batch_change),
        f"checkpoint {path}",
        t.allow_schedule_change,
    )
    if changed:
        log.warning(
            "resuming %s with a changed schedule (train.allow_schedule_change=true): %s", path, "; ".join(changed)
        )
    if elastic:
        was = meta["schedule"]["global_batch"]
        log.warning(
            "resuming %s on another number of ranks: %s, global batch %d (was %d)%s",
            path,
            data.layout_change,
            data.global_batch,
            was,
            ", lr scaled to it (train.allow_batch_change)" if data.global_batch != was else "",
        )
        state = checkpointer.load_resharded(tag, engine.engine, t.seed, engine.ema)
        schedule_at(engine.scheduler, state.step)
        engine.engine.global_steps, engine.engine.global_samples = state.step, state.step * was
    else:
        state = checkpointer.load(tag, engine.engine, engine.ema)
    data.loader.load_state_dict(state.loader)
    log.info(
        "resumed from %s: step %d, epoch %d, batch %d, best top-1 %.2f",
        path,
        state.step,
        data.loader.epoch_index,
        data.loader.batch_index,
        state.best_top1,
    )
    return state, changed


def schedule_at(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """The lr schedule at ``step`` (resuming without DeepSpeed's own checkpoint, whose
    scheduler state it would have restored). ``_last_lr`` is what ``get_last_lr()``
    returns: torch has no public way to set it."""
    scheduler.last_epoch = step
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
