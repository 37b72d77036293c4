"""The checkpoint component alone, with a fake engine (torchtitan's test_checkpoint.py
style) in a one-process gloo group: which tag resumes after a crash mid-save, pruning,
the in-memory save decision, RNG round trips, schedule and layout checks."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    CheckpointManager,
    check_layout,
    check_schedule,
    elastic_grad_accum,
    rng_state,
    set_rng_state,
)
from pipeline.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine: a file per save, the client state back."""

    def __init__(self):
        self.loaded = None

    def zero_optimization_stage(self):
        return 0  # no optimizer state by name to gather (pipeline/reshard.py: test_reshard.py)

    def save_checkpoint(self, folder, tag, client_state, save_latest):
        assert save_latest is False
        os.makedirs(os.path.join(folder, tag), exist_ok=True)
        with open(os.path.join(folder, tag, "mp_rank_00_model_states.pt"), "w") as f:
            json.dump(client_state, f)

    def load_checkpoint(self, folder, tag):
        with open(os.path.join(folder, tag, "mp_rank_00_model_states.pt")) as f:
            self.loaded = tag
            return None, json.load(f)


@pytest.fixture(scope="module", autouse=True)
def process_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def manager(tmp_path, keep_last=2):
    return CheckpointManager(str(tmp_path / "checkpoints"), rank=0, world=1, every_steps=4, keep_last=keep_last)


def save(m, engine, step):
    return m.save(step, engine, {"step": step, "loader": {}}, {"world_size": 1, "zero_stage": 1})


def test_save_writes_complete_then_latest_and_prunes(tmp_path):
    m, engine = manager(tmp_path), FakeEngine()
    for step in (4, 8, 12):
        save(m, engine, step)
        assert m.saved(step) and not m.saved(step - 4)  # decided in memory, not from the filesystem
    kept = sorted(os.listdir(m.folder))
    assert kept == ["latest", "step00000008", "step00000012"]
    assert open(os.path.join(m.folder, "latest")).read() == "step00000012"
    assert all(os.path.isfile(os.path.join(m.folder, t, "COMPLETE")) for t in kept[1:])
    assert m.due(16) and not m.due(15)


def test_a_crash_mid_save_resumes_from_the_previous_complete_checkpoint(tmp_path):
    m, engine = manager(tmp_path, keep_last=3), FakeEngine()
    save(m, engine, 4)
    save(m, engine, 8)
    # a save of step 12 killed before COMPLETE: its files, no COMPLETE, latest untouched
    os.makedirs(os.path.join(m.folder, "step00000012"))
    open(os.path.join(m.folder, "step00000012", "mp_rank_00_model_states.pt"), "w").write("{partial")
    fresh = manager(tmp_path)
    assert fresh.latest() == "step00000008"
    assert fresh.load("step00000008", engine).step == 8 and fresh.last_step == 8
    # latest itself naming an incomplete checkpoint (written by hand, or a lost COMPLETE): the newest complete one
    open(os.path.join(m.folder, "latest"), "w").write("step00000012")
    assert manager(tmp_path).latest() == "step00000008"
    os.remove(os.path.join(m.folder, "latest"))
    assert manager(tmp_path).latest() == "step00000008"


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert manager(tmp_path).latest() is None


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    state = rng_state()
    a = (torch.rand(4), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_schedule_and_layout_checks_name_the_change_and_the_way_out():
    saved = {"optim.epochs": 2, "optim.lr": 1e-3}
    assert check_schedule(saved, dict(saved), "checkpoint x", allow=False) == []
    assert check_schedule(None, dict(saved), "checkpoint x", allow=False) == []  # written before schedules were kept
    with pytest.raises(InputError, match=r"optim.epochs 2 -> 4\).*train.allow_schedule_change=true"):
        check_schedule(saved, {**saved, "optim.epochs": 4}, "checkpoint x", allow=False)
    assert check_schedule(saved, {**saved, "optim.epochs": 4}, "checkpoint x", allow=True) == ["optim.epochs 2 -> 4"]
    with pytest.raises(InputError, match=r"written by 2 ranks.*model.init_from=/o/export/model.safetensors"):
        check_layout({"world_size": 2, "zero_stage": 1}, "checkpoint x", 1, 1, "/o")
    check_layout({"world_size": 2, "zero_stage": 1}, "checkpoint x", 1, 1, "/o", reshardable=True)
    with pytest.raises(InputError, match=r"with ZeRO stage 1, this run has 1 ranks and stage 2"):
        check_layout({"world_size": 2, "zero_stage": 1}, "checkpoint x", 1, 2, "/o", reshardable=True)


@pytest.mark.parametrize(
    "world,allow,expected",
    [
        (1, False, 4),
        (4, False, 1),
        (2, False, 2),
        (8, True, 3),
        (3, False, "resume on 1, 2, 4 ranks"),
        (8, False, "1, 2, 4 ranks"),
    ],
)
def test_another_number_of_ranks_keeps_the_global_batch_or_is_refused_in_one_line(world, allow, expected):
    meta = {"world_size": 2, "schedule": {"global_batch": 256}}  # 2 ranks x micro-batch 64 x accum 2
    if isinstance(expected, int):
        assert elastic_grad_accum(meta, world, 64, 3, allow, "checkpoint x") == expected
    else:
        with pytest.raises(
            InputError,
            match=rf"global batch of 256; {world} ranks x micro-batch 64 .*{expected}.*"
            rf"train.allow_batch_change=true \(global batch {64 * 3 * world}",
        ):
            elastic_grad_accum(meta, world, 64, 3, allow, "checkpoint x")


def test_a_damaged_checkpoint_is_moved_aside_and_the_intact_one_used(tmp_path, caplog):
    m, engine = manager(tmp_path, keep_last=3), FakeEngine()
    save(m, engine, 4)
    save(m, engine, 8)
    sums = json.load(open(os.path.join(m.folder, "step00000008", "checksums.json")))
    assert set(sums) == {"mp_rank_00_model_states.pt", "rng_rank0.pt"}
    victim = os.path.join(m.folder, "step00000008", "rng_rank0.pt")
    with open(victim, "r+b") as f:  # same size, one byte flipped
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    with caplog.at_level("WARNING", logger="tntpipe.checkpoint"):
        assert manager(tmp_path).latest() == "step00000004"
    assert f"checkpoint step00000008 is damaged ({victim} does not match its checksum)" in caplog.text
    aside = [d for d in os.listdir(m.folder) if d.startswith("damaged-step00000008-")]
    assert len(aside) == 1 and os.path.isfile(os.path.join(m.folder, aside[0], "rng_rank0.pt"))
    assert open(os.path.join(m.folder, "latest")).read() == "step00000004"


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path):
    from pipeline.checkpoint import CheckpointWriteError

    m, engine = manager(tmp_path), FakeEngine()
    save(m, engine, 4)
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint step00000008 cannot be written to .*: no space left on "
        r"the device \(.* MB free, ~.* MB needed\); the previous checkpoint step00000004 is intact",
    ) as e:
        m._check_space("step00000008", 1 << 60)
    assert e.value.everywhere
    assert not os.path.isdir(os.path.join(m.folder, "step00000008"))


def test_a_failed_write_removes_its_partial_directory(tmp_path):
    from pipeline.checkpoint import CheckpointWriteError

    class FailingEngine(FakeEngine):
        def save_checkpoint(self, folder, tag, client_state, save_latest):
            super().save_checkpoint(folder, tag, client_state, save_latest)
            raise OSError(5, "Input/output error")

    m = manager(tmp_path)
    save(m, FakeEngine(), 4)
    with pytest.raises(
        CheckpointWriteError,
        match=r"checkpoint step00000008 could not be written to .* \(.*Input/output "
        r"error\); its partial directory was removed; the previous checkpoint step00000004 is intact",
    ):
        save(m, FailingEngine(), 8)
    assert sorted(os.listdir(m.folder)) == ["latest", "step00000004"]


def test_train_out_lock_refuses_a_second_job_and_dies_with_its_holder(tmp_path):
    """One job at a time per train.out: a live holder (another process) is refused in
    one line naming it; once the holder dies (SIGKILL: no clean-up), the lock is free."""
    import signal
    import subprocess
    import sys

    from pipeline.runlock import RunInUse, RunLock

    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {ROOT!r}); "
            f"from pipeline.runlock import RunLock; RunLock({out!r}).acquire(); print('held', flush=True); "
            "time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUse, match=f'is in use by another live job .*"pid": {holder.pid}'):
            RunLock(out).acquire(wait_s=1)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out)
    lock.acquire(wait_s=1)
    lock.release()


def test_fsync_tree_skips_a_file_renamed_away_by_another_rank(tmp_path, monkeypatch):
    """Every rank fsyncs the checkpoint directory while the others may still write into
    it: a temporary file listed, then renamed by its writer (safetensors writes through
    one), made the save fail on the rank that listed it, whose clean-up then removed
    the directory under every other rank (seen on the two-host Slurm cluster)."""
    from pipeline import checkpoint

    (tmp_path / "kept").write_bytes(b"x")
    listing = [(str(tmp_path), [], ["kept", ".tmpRenamedAway"])]
    monkeypatch.setattr(checkpoint.os, "walk", lambda path: iter(listing))
    checkpoint.fsync_tree(str(tmp_path))  # no FileNotFoundError


class _ByName:
    """What Python 3.11.2 writes for an Enum member (``getattr(cls, name)``; 3.11.7
    writes it by value): made here so that the test runs on any Python."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_a_zero_stage_enum_pickled_by_name_loads_and_other_getattrs_are_refused(tmp_path):
    """DeepSpeed's ZeRO optimizer state (fp32 at ZeRO-1, any precision at ZeRO-2/3) holds
    a ZeroStageEnum; on Python 3.11.2 it is pickled by name, and weights_only loading
    refused it: a fresh clone on that Python could resume none of those runs (found by
    the suite). Only that class is let through."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.checkpoint import weights_only_loads

    path = str(tmp_path / "state.pt")
    torch.save({"stage": _ByName(ZeroStageEnum, "optimizer_states"), "t": torch.ones(2)}, path)
    with weights_only_loads():
        got = torch.load(path)
    assert got["stage"] is ZeroStageEnum.optimizer_states and torch.equal(got["t"], torch.ones(2))
    torch.save({"f": _ByName(LossScaler, "update_scale")}, path)
    with weights_only_loads(), pytest.raises(Exception, match="not allowed"):
        torch.load(path)
