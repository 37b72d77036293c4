"""Faults of the storage under ``train.out`` (2 ranks on gloo, the demo digits): a
damaged newest checkpoint is moved aside and the run resumes exactly from the newest
intact one; a disk that fills up refuses the save in one line, leaves no partial
directory, keeps the previous checkpoint, and a re-run with space resumes from it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file
from test_train import command, losses, train

pytestmark = pytest.mark.slow  # training runs over a faulty network: bash .ci/run -m "not slow" leaves it out


def same_weights(a: str, b: str) -> float:
    wa = load_file(os.path.join(a, "export", "model.safetensors"))
    wb = load_file(os.path.join(b, "export", "model.safetensors"))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


OPTS = ("train.ckpt_every=4", "train.keep_last=3", "train.ema=false", "data.val=")


@pytest.fixture(scope="module")
def reference(demo_shards, tmp_path_factory):
    """12 steps in one go; max_steps is a stopping point, not the schedule, so its
    losses are those of every shorter run with the same options."""
    ref = str(tmp_path_factory.mktemp("storage") / "ref")
    train(ref, demo_shards, *OPTS, "train.max_steps=12")
    return ref


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(demo_shards, tmp_path, reference):
    opts, ref, out = OPTS, reference, str(tmp_path / "out")
    train(out, demo_shards, *opts, "train.max_steps=8")
    # what a node that crashed after COMPLETE but before its page cache reached the disk leaves
    victim = sorted(glob.glob(os.path.join(out, "checkpoints", "step00000008", "*optim_states.pt")))[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    resumed = train(out, demo_shards, *opts, "train.max_steps=12")
    assert f"checkpoint step00000008 is damaged ({victim} has " in resumed.stderr
    assert "resumed from " + os.path.join(out, "checkpoints", "step00000004") in resumed.stderr
    aside = glob.glob(os.path.join(out, "checkpoints", "damaged-step00000008-*", os.path.basename(victim)))
    assert len(aside) == 1  # kept for inspection, never deleted
    ref_loss, got = losses(ref), losses(out)
    assert all(got[s] == pytest.approx(ref_loss[s], rel=1e-5) for s in range(5, 13))
    assert same_weights(ref, out) < 1e-6


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs: room for one checkpoint of the tiny model (~16 MB, 6.7 of them its
    optimizer state by name), not two."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_refuses_the_save_in_one_line_and_loses_nothing(demo_shards, tmp_path, small_disk, reference):
    opts = ("train.ckpt_every=2", "train.keep_last=2", "data.val=", "train.max_steps=6")  # EMA on: losses alike
    out = str(small_disk / "run")
    proc = subprocess.run(
        command(out, demo_shards, *opts),
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(
        f"error: checkpoint step00000004 cannot be written to {out}/checkpoints: no space left on the device ("
    )
    assert "MB free, ~" in errors[0] and "the previous checkpoint step00000002 is intact" in errors[0]
    assert "Traceback" not in proc.stderr
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step"))
    assert kept == ["step00000002"]  # no partial directory keeps the disk full
    # with space again (the output directory moved to a bigger disk), the same command resumes
    moved = str(tmp_path / "moved")
    shutil.copytree(out, moved, symlinks=True)
    resumed = train(moved, demo_shards, *opts)
    assert "resumed from " + os.path.join(moved, "checkpoints", "step00000002") in resumed.stderr
    ref_loss, got = losses(reference), losses(moved)  # the uninterrupted run's, step for step
    assert all(got[s] == pytest.approx(ref_loss[s], rel=1e-5) for s in range(1, 7)), (got, ref_loss)
