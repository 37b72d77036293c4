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
import logging
import os
import signal
import sys
import threading
import time
import warnings

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from pipeline import build, distributed, failures, resume, runlock
from pipeline import config as config_mod
from pipeline import export as export_mod
from pipeline import watchdog as watchdog_mod
from pipeline.checkpoint import CheckpointManager, CheckpointWriteError, RunState, estimate_bytes
from pipeline.errors import InputError, TrainingError, summary
from pipeline.evaluate import Validator
from pipeline.metrics import MetricsProcessor, sinks_for
from pipeline.registry import Registrar
from pipeline.resume import Finished
from pipeline.runlock import RunInUse
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
                raise RequeuesSpent(
                    f"checkpointed on the time-limit signal, but not requeued ({exc}); run the same command to resume"
                ) from None


class Requeued(Exception):
    """Checkpointed on SIGUSR2; the job is being requeued (or should be re-run)."""


class RequeuesSpent(Requeued):
    """Checkpointed on SIGUSR2, but submitit did not requeue (--max-requeues spent)."""


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


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()


class NonFinite:
    """The non-finite-loss policy: a batch whose loss is not finite on any rank is skipped
    by every rank together (the agreed flag); ``train.max_nonfinite`` in a row stop the run."""

    def __init__(self, limit: int, precision: str):
        self.limit, self.precision, self.count = limit, precision, 0

    def reset(self) -> None:
        self.count = 0

    def skip(self, step: int, say: bool, last_checkpoint: int | None) -> None:
        self.count += 1
        if say:
            log.warning("non-finite loss at step %d (%d in a row): batch skipped", step, self.count)
        if self.count >= self.limit:
            hint = (
                "lower optim.lr or use train.precision=bf16"
                if self.precision == "fp16"
                else "lower optim.lr, or set optim.clip_grad"
            )
            raise TrainingError(
                f"{self.count} non-finite losses in a row at step {step}: stopping "
                f"(last good checkpoint: step {last_checkpoint}); {hint}"
            )


class Trainer:
    """The loop over the run's parts, built in order in ``__init__`` (:mod:`pipeline.build`)."""

    def __init__(self, cfg: config_mod.Config):
        self.cfg, self.out, t = cfg, cfg.out_dir, cfg.train
        # Input and config errors first: before the process group, before train.out exists.
        self.data = data = build.build_data(cfg)
        resume.check_finished(cfg, data.schedule, data.total_steps)
        init_weights, parent = build.check_init_from(cfg, data.train_manifest.num_classes)
        self.loader, self.val_loader, self.total_steps = data.loader, data.val_loader, data.total_steps
        self.rank, self.world, self.local_rank = distributed.init_distributed(t.dist_timeout_s)
        self.step = 0
        self.watchdog = Watchdog(self.rank, self.world, t.heartbeat_timeout_s, self._lost_peer)
        self.watchdog.start()
        setup_logging(self.rank, self.out)
        self.device = distributed.device()
        resume.agree_grad_accum(t.grad_accum, self.world, self.device, self.out)
        self.lock = runlock.hold(self.out, self.rank, self.device, t.lock_wait_s)
        self.parts = parts = build.build_engine(cfg, data, self.device, self.rank, init_weights)
        self.engine, self.scheduler, self.ema = parts.engine, parts.scheduler, parts.ema
        self.best_top1 = -1.0
        self.nonfinite = NonFinite(t.max_nonfinite, t.precision)
        self.signal = CheckpointSignal()
        self.run_id: str | None = None
        self.tracker = build.tracker(cfg, self.rank)
        manifests = {"train": data.train_manifest, "val": data.val_manifest}
        self.registrar = Registrar(cfg, self.tracker, self.out, data.classes, manifests, parent, parts.num_params)
        self.last_res: dict | None = None  # the last evaluation, model and EMA
        self.checkpointer = CheckpointManager(
            os.path.join(self.out, "checkpoints"), self.rank, self.world, t.ckpt_every, t.ckpt_every_min, t.keep_last
        )
        # data.finish=device: uint8 batches normalised and mixed here (DeviceFinish); None: done in the workers
        self.finish, eval_finish = build.device_finishes(cfg, data, self.rank, self.device)
        self.validator = None
        if self.val_loader:
            self.validator = Validator(self.val_loader, self.device, parts.dtype, eval_finish, t.eval_every)
        self.figures = build.figures(cfg, data, parts, self.rank, self.device, self.tracker)
        sinks, peak = sinks_for(self.rank, self.out, self.tracker), build.peak_tflops(cfg, self.device)
        self.metrics = MetricsProcessor(
            sinks, self.world, self.device, parts.flops_per_image, peak, t.log_every, self.total_steps
        )

    # ----- state

    def save(self) -> None:
        """Synchronizes ranks (every rank saves its partition)."""
        t = self.cfg.train
        meta = {
            "world_size": self.world,
            "zero_stage": t.zero_stage,
            "schedule": self.data.schedule,
            "grad_accum": t.grad_accum,
            "epoch": self.loader.completed_epochs,
        }
        state = RunState(self.loader.state_dict(), self.step, self.best_top1, self.run_id, self.registrar.state_dict())
        size = estimate_bytes(self.parts.num_params, t.precision, t.zero_stage, self.ema is not None)
        with self.metrics.paused():
            self.checkpointer.save(
                self.step, self.engine, state.client(), meta, self.ema.module if self.ema else None, size
            )

    def resume(self) -> list[str] | None:
        """The newest checkpoint restored: the schedule keys it changed, None without one."""
        restored = resume.resume(self.checkpointer, self.cfg, self.data, self.parts, self.world)
        if restored is None:
            return None
        state, changed = restored
        self.step, self.best_top1, self.run_id = state.step, state.best_top1, state.mlflow_run_id
        if state.registry is not None:  # checkpoints before registrations at each best lack it
            self.registrar.load_state_dict(state.registry)
        return changed

    # ----- the loop

    def close_loaders(self) -> None:
        for loader in (self.loader, self.val_loader):
            if loader is not None:
                loader.close()

    def run(self) -> dict:
        changed = self.resume()
        self.registrar.start_attempt(self.world)
        self._start_tracking(changed)
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
                if self.step < self.total_steps and self.validator and self.validator.due(epoch):
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
        self.figures.close()  # every set written and logged before the end's registration
        return self._finish(state, last_eval)

    def _start_tracking(self, changed: list[str] | None) -> None:
        data, parts = self.data, self.parts
        params = {
            "world_size": self.world,
            "global_batch": data.global_batch,
            "base_lr": parts.base_lr,
            "params": parts.num_params,
        }
        self.run_id = self.registrar.start_run(
            self.run_id, self.rank == 0, changed, self.step, params, data.layout_change
        )
        log.info(build.describe(self.cfg, data, parts, self.world, self.device))

    def train_step(self, batch: dict, wait: float) -> bool:
        """One micro-batch; True when it completed an optimizer step. Synchronizes ranks
        (the flags all-reduce, DeepSpeed's gradient reduction, saves)."""
        if self.finish is not None:
            x, y = self.finish(batch)
            x = x.to(self.parts.dtype)
        else:
            x = batch["image"].to(self.device, self.parts.dtype, non_blocking=True)
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
            self.nonfinite.skip(self.step, self.rank == 0, self.checkpointer.last_step)
            return False
        self.nonfinite.reset()
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        self.metrics.micro_batch(loss, len(x), wait)
        if not boundary:
            return False
        self.step += 1
        self.metrics.optimizer_step(self.engine.get_global_grad_norm())
        if self.ema is not None:
            self.ema.update(self.engine.module)
        if self.metrics.should_log(self.step):
            self.metrics.log(
                self.step,
                self.total_steps,
                self.loader.completed_epochs,
                self.scheduler.get_last_lr()[0],
                self.loader.counters,
            )
        if signalled:
            self._checkpoint_and_requeue()
        if self.checkpointer.due(self.step) or time_due:
            self.save()
        return True

    def _checkpoint_and_requeue(self) -> None:
        log.warning("checkpoint signal (time limit or preemption): checkpointing at step %d, then requeue", self.step)
        self.registrar.requeued()
        self.save()
        self.tracker.end("KILLED")
        self.watchdog.stop(done=True)  # rank 0's store goes with it: not a lost peer
        self.signal.hand_over()  # rank 0 under submitit: requeue and exit; Slurm then stops every task
        distributed.barrier()  # the other ranks wait here to be stopped
        raise Requeued(f"checkpointed at step {self.step} on the time-limit signal; run the same command to resume")

    def _lost_peer(self, message: str) -> None:
        failures.record(
            self.out, "lost a peer rank (it died or hung, or its node or network did)", message, self.rank, self.step
        )

    def validate(self) -> dict:
        """The model and its EMA on the same batches, one pass. Synchronizes ranks."""
        models = {"val": (self.engine, True)}
        if self.ema is not None:
            models["val_ema"] = (self.ema.module, False)
        started = time.perf_counter()
        with self.metrics.paused():
            res = self.validator.validate(models)
        took = time.perf_counter() - started
        main = res["val"]
        epoch = self.loader.completed_epochs
        line = (
            f"eval epoch {epoch} step {self.step}: loss {main['loss']:.4f} top-1 {main['top1']:.2f} "
            f"top-5 {main['top5']:.2f} ({int(main['count'])} images)"
        )
        if "val_ema" in res:
            line += f" | EMA top-1 {res['val_ema']['top1']:.2f}"
        log.info(line)
        self.metrics.record(
            {f"{split}/{k}": v for split, r in res.items() for k, v in r.items() if k != "count"}
            | {"val/epoch": epoch},
            self.step,
        )
        with self.metrics.paused():
            figures_s = self.figures.draw(self.engine.module, self.step)  # rank 0; drawn in a thread
        log.debug("evaluation %.3f s; figures' forward pass %.4f s", took, figures_s)
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
                self.figures.wait()  # the version carries this evaluation's figures
                version = self.registrar.export_and_register(
                    "best", state, self.ema.module if self.ema else None, res, self.step, self.loader.completed_epochs
                )
        self.registrar.registered_best(version, res, self.step)

    # ----- the end (rank 0 alone)

    def _finish(self, state: dict, last_eval: dict | None) -> dict:
        epoch = self.loader.completed_epochs
        ema = self.ema.module if self.ema else None
        files, version = self.registrar.finish(state, ema, self.last_res, self.step, epoch)
        self.tracker.end()
        done = {"step": self.step, "epoch": epoch, "run_id": self.run_id, "version": version, "world_size": self.world}
        resume.mark_finished(self.cfg, done | {"registered_as": self.registrar.name}, self.data.schedule)
        return {"step": self.step, "eval": last_eval, "export": files, "run_id": self.run_id}


def _record(cfg, trainer, exc: BaseException, everywhere: bool, kind: str | None = None) -> None:
    """Into <train.out>/failures.jsonl: by rank 0 when every rank has the same fault,
    else by each rank that has it."""
    rank = int(os.environ.get("RANK", 0))
    if everywhere and rank != 0:
        return
    try:
        failures.record(
            cfg.out_dir,
            kind or failures.classify(exc),
            f"{type(exc).__name__}: {exc}",
            rank,
            trainer.step if trainer is not None else None,
        )
    except OSError:  # the record must not hide the fault itself (a full disk, say)
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys and defaults:\n"
        + config_mod.describe()
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
        kind = (
            "checkpointed at the time limit, not requeued (--max-requeues spent)"
            if isinstance(exc, RequeuesSpent)
            else "checkpointed and requeued (time limit or preemption)"
        )
        _record(cfg, trainer, exc, everywhere=True, kind=kind)
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # a fault: recorded and said in one line, then the traceback
        alone = True
        if cfg is not None:
            _record(cfg, trainer, exc, everywhere=False)
            print(
                f"error: rank {os.environ.get('RANK', 0)}: {failures.classify(exc)}: {summary(exc)} "
                f"(recorded in {os.path.join(cfg.out_dir, failures.FILE)})",
                file=sys.stderr,
            )
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
