"""The DeepSpeed trainer, 2 processes on gloo (DeepSpeed's CPU accelerator), the
tiny TNT on the real demo digits: every ZeRO stage, fp16, accumulation, kill/resume,
export. MLflow server tests are in test_mlflow.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def command(out, shards, *overrides, nproc=2):
    return [
        sys.executable, os.path.join(ROOT, "launch", "local.py"), "--nproc", str(nproc), "--",
        "--config", CONFIG, f"train.out={out}", f"data.train={shards['train']}", f"data.val={shards['val']}",
        "data.workers=1", "mlflow.register_as=", "mlflow.system_metrics=false", "train.log_every=1",
        "optim.warmup_epochs=0.1", *overrides,
    ]


def train(out, shards, *overrides, nproc=2, env=None, timeout=300):
    env = dict(os.environ, MLFLOW_TRACKING_URI="", **(env or {}))
    proc = subprocess.run(command(out, shards, *overrides, nproc=nproc), env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(out) if "train/loss" in m}


@pytest.mark.parametrize("stage,precision", [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (3, "fp32"), (2, "fp16")])
def test_zero_stages_train_and_export(stage, precision, demo_shards, tmp_path):
    out = str(tmp_path / "run")
    ema = "train.ema=false" if stage == 3 else "train.ema=true"
    if precision == "fp16" and not fp16_supported():
        # DeepSpeed's CPU accelerator has fp16 only on CPUs with oneDNN fp16 kernels
        # (AVX512-FP16/AMX-FP16). On others the trainer must refuse in one clear line.
        proc = subprocess.run(command(out, demo_shards, f"train.zero_stage={stage}", "train.precision=fp16"),
                              env=dict(os.environ, MLFLOW_TRACKING_URI=""), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2
        assert "error: train.precision=fp16 is not supported by DeepSpeed on this device (cpu); use train.precision=bf16" in proc.stderr
        pytest.skip("fp16 training needs a CPU with AVX512-FP16/AMX-FP16 (checked the refusal instead)")
    train(out, demo_shards, f"train.zero_stage={stage}", f"train.precision={precision}", ema, "train.max_steps=16")
    loss = losses(out)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.02, loss
    evals = [m for m in metrics(out) if "val/top1" in m]
    assert evals and evals[-1]["val/top1"] > 0
    # consolidated fp32 weights, in timm's layout, load into our model and into timm's TNT class
    from timm.models.tnt import TNT as TimmTNT

    from pipeline import tnt

    state = load_file(os.path.join(out, "export", "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in state.values())
    ours = tnt.create("tntp_tiny_patch8_32", num_classes=10).eval()
    tnt.load_timm_state_dict(ours, state)
    ref = TimmTNT(**tnt.VARIANTS["tntp_tiny_patch8_32"], num_classes=10).eval()
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
    assert os.path.isfile(os.path.join(out, "export", "model_ema.safetensors")) == (stage != 3)


def test_zero3_with_ema_is_refused(demo_shards, tmp_path):
    proc = subprocess.run(
        command(str(tmp_path / "run"), demo_shards, "train.zero_stage=3", "train.ema=true", nproc=1),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "error: train.ema needs the full weights" in proc.stderr


def test_gradient_accumulation_equals_larger_batch(demo_shards, tmp_path):
    """2 micro-batches of 32 accumulated = 1 micro-batch of 64 (fp32, same samples)."""
    common = ("train.precision=fp32", "train.zero_stage=1", "train.ema=false", "train.max_steps=2", "data.val=")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(a, demo_shards, "train.micro_batch=64", "train.grad_accum=1", *common)
    train(b, demo_shards, "train.micro_batch=32", "train.grad_accum=2", *common)
    wa = load_file(os.path.join(a, "export", "model.safetensors"))
    wb = load_file(os.path.join(b, "export", "model.safetensors"))
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < 1e-5
    la, lb = losses(a), losses(b)
    assert la[2] == pytest.approx(lb[2], rel=1e-4)


def test_kill_and_resume_matches_uninterrupted_run(demo_shards, tmp_path):
    """A real kill -9 of every rank mid-run, then the same command: the resumed run's
    losses and final weights equal those of a run that was never interrupted."""
    steps = ("train.max_steps=14", "train.ckpt_every=4", "train.keep_last=2", "data.val=")
    ref = str(tmp_path / "ref")
    train(ref, demo_shards, *steps)

    out = str(tmp_path / "killed")
    proc = subprocess.Popen(command(out, demo_shards, *steps), env=dict(os.environ, MLFLOW_TRACKING_URI=""),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = os.path.join(out, "checkpoints", "latest")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.isfile(latest) and open(latest).read().strip() >= "step00000008"):
        assert proc.poll() is None, "run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # launcher, ranks and their DataLoader workers
    proc.wait()
    killed_at = open(latest).read().strip()
    assert not os.path.isdir(os.path.join(out, "export"))

    with open(os.path.join(out, "checkpoints", killed_at, "meta.json")) as f:
        run_id = json.load(f)["mlflow_run_id"]
    resumed = train(out, demo_shards, *steps)
    assert f"resumed from {os.path.join(out, 'checkpoints', killed_at)}" in resumed.stderr
    assert resumed.stdout.strip().endswith(f"MLflow run {run_id}")  # the same MLflow run continues
    start = int(killed_at[4:])
    ref_loss, got = losses(ref), losses(out)
    for step in range(start + 1, 15):
        assert got[step] == pytest.approx(ref_loss[step], rel=1e-5), (step, got[step], ref_loss[step])
    wr = load_file(os.path.join(ref, "export", "model.safetensors"))
    wo = load_file(os.path.join(out, "export", "model.safetensors"))
    assert max((wr[k] - wo[k]).abs().max().item() for k in wr) < 1e-6
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step"))
    assert len(kept) <= 2 and kept[-1] == "step00000014"


def test_resume_with_another_world_size_is_refused(demo_shards, tmp_path):
    out = str(tmp_path / "run")
    train(out, demo_shards, "train.max_steps=2", "data.val=", nproc=2)
    proc = subprocess.run(command(out, demo_shards, "train.max_steps=4", "data.val=", nproc=1),
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    assert proc.returncode == 2
    assert "written by 2 ranks" in proc.stderr and "model.init_from=" in proc.stderr
