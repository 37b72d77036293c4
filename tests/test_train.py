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
from conftest import FAST_PRECISION
from safetensors.torch import load_file
from waiting import wait_for

pytestmark = pytest.mark.slow  # 2-rank DeepSpeed training runs: bash .ci/run -m "not slow" leaves it out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny_cpu.yaml")


def command(out, shards, *overrides, nproc=2):
    return [
        sys.executable,
        os.path.join(ROOT, "launch", "local.py"),
        "--nproc",
        str(nproc),
        "--",
        "--config",
        CONFIG,
        f"train.out={out}",
        f"data.train={shards['train']}",
        f"data.val={shards['val']}",
        "data.workers=1",
        "mlflow.register_as=",
        "mlflow.system_metrics=false",
        "train.log_every=1",
        "optim.warmup_epochs=0.1",
        f"train.precision={FAST_PRECISION}",
        *overrides,
    ]


def train(out, shards, *overrides, nproc=2, env=None, timeout=300):
    env = dict(os.environ, MLFLOW_TRACKING_URI="", **(env or {}))
    proc = subprocess.run(
        command(out, shards, *overrides, nproc=nproc), env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def start_until_checkpoint(out, shards, steps, at_least: str, **popen):
    """Start a 2-rank run in the background; return it (still running) once ``latest``
    names a checkpoint at or past the tag ``at_least``."""
    proc = subprocess.Popen(command(out, shards, *steps), env=dict(os.environ, MLFLOW_TRACKING_URI=""), **popen)
    latest = os.path.join(out, "checkpoints", "latest")
    try:
        wait_for(
            f"a checkpoint at or past {at_least}",
            lambda: os.path.isfile(latest) and open(latest).read().strip() >= at_least,
            240,
            0.05,
            proc,
        )
    except BaseException:
        proc.kill()
        raise
    return proc


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def accuracy(state: dict, val_dir: str) -> float:
    """Top-1 (%) of timm-layout weights on the demo's val split, with the trainer's eval transform."""
    from pipeline import config, tnt
    from pipeline.data import EvalStream, Loader, load_manifest

    cfg = config.load(CONFIG)
    model = tnt.create(cfg.model.variant, num_classes=10, img_size=cfg.aug.img_size).eval()
    tnt.load_timm_state_dict(model, state)
    hits = n = 0
    with torch.no_grad():
        for batch in Loader(EvalStream(load_manifest(val_dir), 250, augment=cfg.aug), workers=0).epoch(0):
            y = batch["label"]
            pred = model(batch["image"]).argmax(1)
            hits += int((pred[y >= 0] == y[y >= 0]).sum())
            n += int((y >= 0).sum())
    return 100.0 * hits / n


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(out) if "train/loss" in m}


# ZeRO-0 and ZeRO-2 in bf16 train and export in the resume test below (ZeRO-0's weights
# compared there); the masters' equality with DeepSpeed's own reader is checked on ZeRO-3
# and on ZeRO-2 in fp16 (ZeRO-2 bf16 dropped for the suite's 30-minute budget: 26 s)
@pytest.mark.parametrize("stage,precision", [(1, "bf16"), (3, "bf16"), (3, "fp32"), (2, "fp16")])
def test_zero_stages_train_and_export(stage, precision, demo_shards, tmp_path):
    out = str(tmp_path / "run")
    ema = "train.ema=false" if stage == 3 else "train.ema=true"
    if precision == "fp16" and not fp16_supported():
        # DeepSpeed's CPU accelerator has fp16 only on CPUs with oneDNN fp16 kernels
        # (AVX512-FP16/AMX-FP16). On others the trainer must refuse in one clear line.
        proc = subprocess.run(
            command(out, demo_shards, f"train.zero_stage={stage}", "train.precision=fp16"),
            env=dict(os.environ, MLFLOW_TRACKING_URI=""),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 2
        assert (
            "error: train.precision=fp16 is not supported by DeepSpeed on this device (cpu); use train.precision=bf16"
            in proc.stderr
        )
        pytest.skip("fp16 training needs a CPU with AVX512-FP16/AMX-FP16 (checked the refusal instead)")
    proc = train(
        out, demo_shards, f"train.zero_stage={stage}", f"train.precision={precision}", ema, "train.max_steps=16"
    )
    if precision == "bf16" and stage >= 1:  # fp32 gradient accumulation (DeepSpeed's BF16_Optimizer at ZeRO-1)
        assert ("(BF16_Optimizer)" if stage == 1 else "(DeepSpeedZeroOptimizer") in proc.stderr
    if stage == 1:  # BF16_Optimizer's 18 lines of memory statistics: in train.log, not on the console
        console = proc.stdout + proc.stderr
        assert "CPU Virtual Memory" not in console and "all_gather_into_tensor" not in console, console[-3000:]
        assert "CPU Virtual Memory" in open(os.path.join(out, "train.log")).read()
    loss = losses(out)
    first, last = sum(loss[s] for s in (1, 2, 3)) / 3, sum(loss[s] for s in (14, 15, 16)) / 3
    assert last < first - 0.02, loss
    evals = [m for m in metrics(out) if "val/top1" in m]
    assert len(evals) == 1
    state = load_file(os.path.join(out, "export", "model.safetensors"))
    # the export holds the trained weights: it scores what the trainer's last evaluation
    # scored (the engine ran them in bf16 there: a point of difference allowed)
    assert accuracy(state, demo_shards["val"]) == pytest.approx(evals[-1]["val/top1"], abs=1.5)
    if stage in (2, 3):  # and equals the fp32 masters DeepSpeed's own tool reads from the checkpoint
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from pipeline.checkpoint import weights_only_loads

        with weights_only_loads():
            masters = get_fp32_state_dict_from_zero_checkpoint(os.path.join(out, "checkpoints"), tag="step00000016")
        assert set(masters) == set(state)
        assert max((masters[k].float() - state[k]).abs().max().item() for k in state) == 0.0
    # consolidated fp32 weights, in timm's layout, load into our model and into timm's TNT class
    from timm.models.tnt import TNT as TimmTNT

    from pipeline import tnt

    assert all(v.dtype == torch.float32 for v in state.values())
    ours = tnt.create("tntp_tiny_patch8_32", num_classes=10).eval()
    tnt.load_timm_state_dict(ours, state)
    ref = TimmTNT(**tnt.VARIANTS["tntp_tiny_patch8_32"], num_classes=10).eval()
    ref.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= 1e-5
    assert os.path.isfile(os.path.join(out, "export", "model_ema.safetensors")) == (stage != 3)
    # the size the trainer expects of a checkpoint before the first is written (its
    # free-space check) against the real one: within a quarter, either way
    from pipeline import config as config_mod
    from pipeline.checkpoint import estimate_bytes

    cfg = config_mod.load(CONFIG, [f"train.zero_stage={stage}", f"train.precision={precision}", ema])
    expected = estimate_bytes(tnt.count_params(ours), cfg.train.precision, cfg.train.zero_stage, cfg.train.ema)
    folder = os.path.join(out, "checkpoints", "step00000016")
    real = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
    assert 0.75 * real <= expected <= 1.25 * real, (expected, real)


def test_zero3_with_ema_is_refused(demo_shards, tmp_path):
    proc = subprocess.run(
        command(str(tmp_path / "run"), demo_shards, "train.zero_stage=3", "train.ema=true", nproc=1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "error: train.ema needs the full weights" in proc.stderr


def test_gradient_accumulation_equals_larger_batch(demo_shards, tmp_path):
    """2 micro-batches of 32 accumulated = 1 micro-batch of 64 (fp32, same samples): the
    same gradient (its norm, logged per step; AdamW's weights alone cannot tell a sum
    of the micro-batch gradients from their mean) and the same weights."""
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
    norms = [{m["step"]: m["train/grad_norm"] for m in metrics(run) if "train/grad_norm" in m} for run in (a, b)]
    assert norms[0][1] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-4)


def test_kill_and_resume_matches_uninterrupted_run(demo_shards, tmp_path):
    """A real kill -9 of every rank mid-run, after an evaluation, then the same command:
    the resumed run's losses, final weights and EMA equal those of a run that was never
    interrupted; it goes on in the same MLflow run (checked in the store) and keeps the
    best top-1 of the evaluation before the kill."""
    from mlflow import MlflowClient

    steps = (
        "train.precision=bf16",
        "train.max_steps=40",
        "train.ckpt_every=4",
        "train.keep_last=2",
        "train.eval_every=1",
        "data.eval_batch=500",
    )
    ref = str(tmp_path / "ref")
    train(ref, demo_shards, *steps)

    out = str(tmp_path / "killed")
    proc = start_until_checkpoint(
        out,
        demo_shards,
        steps,
        "step00000032",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = os.path.join(out, "checkpoints", "latest")
    os.killpg(proc.pid, signal.SIGKILL)  # launcher, ranks and their DataLoader workers
    proc.wait()
    killed_at = open(latest).read().strip()
    start = int(killed_at[4:])
    assert start < 40 and not os.path.isdir(os.path.join(out, "export"))

    with open(os.path.join(out, "checkpoints", killed_at, "meta.json")) as f:
        run_id = json.load(f)["mlflow_run_id"]
    resumed = train(out, demo_shards, *steps)
    best_before = next(m["val/top1"] for m in metrics(ref) if "val/top1" in m and m["step"] == 31)
    assert f"resumed from {os.path.join(out, 'checkpoints', killed_at)}: step {start}" in resumed.stderr
    assert f"best top-1 {best_before:.2f}" in resumed.stderr  # restored, not -1
    assert resumed.stdout.strip().endswith(f"MLflow run {run_id}")  # the same MLflow run continues
    ref_loss, got = losses(ref), losses(out)
    for step in range(start + 1, 41):
        assert got[step] == pytest.approx(ref_loss[step], rel=1e-5), (step, got[step], ref_loss[step])
    for name in ("model.safetensors", "model_ema.safetensors"):
        wr = load_file(os.path.join(ref, "export", name))
        wo = load_file(os.path.join(out, "export", name))
        assert max((wr[k] - wo[k]).abs().max().item() for k in wr) < 1e-6, name
    kept = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step"))
    assert len(kept) <= 2 and kept[-1] == "step00000040"
    # the store holds the metrics of both attempts under the one run id
    client = MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
    logged = {m.step for m in client.get_metric_history(run_id, "train/loss")}
    assert {1, start, start + 1, 40} <= logged
    assert client.get_run(run_id).info.status == "FINISHED"


def test_resume_on_fewer_then_more_ranks_keeps_the_batch_and_the_optimizer_state(demo_shards, tmp_path):
    """Elastic resume. 2 ranks (ZeRO-1 bf16, EMA) stop at step 4; 1 rank goes on to step
    6 with train.grad_accum 2: the same global batch, so the same schedule, and the Adam
    state continued (its step count, in the next checkpoint's optimizer state by name;
    the state's equality by name is test_reshard.py's). Its first loss is within 10% of
    an uninterrupted 2-rank run's: same weights and lr, other samples of the same epoch
    (the loader's exactly-once split is test_data.py's), and early losses of the tiny
    model vary by a few percent between batches. 3 ranks cannot make the global batch
    of 128: refused in one line naming the numbers of ranks that can and the override;
    with the override they go on at global batch 192, lr scaled."""
    from pipeline import reshard
    from pipeline.checkpoint import tag_of

    opts = ("train.precision=bf16", "train.ckpt_every=2", "data.val=")
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    train(ref, demo_shards, *opts, "train.max_steps=8")
    train(out, demo_shards, *opts, "train.max_steps=4")
    one = train(out, demo_shards, *opts, "train.max_steps=6", nproc=1)
    assert (
        "on another number of ranks: 2 ranks x accum 1 -> 1 ranks x accum 2, global batch 128 (was 128)" in one.stderr
    )
    assert (
        "epoch 0 goes on with 1 ranks x 1 workers x batch 64 (begun on 2 x 1 x 64, 4 batches per rank done)"
        in one.stderr
    )
    ref_loss, got = losses(ref), losses(out)
    assert all(got[s] == ref_loss[s] for s in range(1, 5))
    assert got[5] == pytest.approx(ref_loss[5], rel=0.1) and got[6] == pytest.approx(ref_loss[6], rel=0.1), (
        got,
        ref_loss,
    )
    _, adam_step = reshard.read(os.path.join(out, "checkpoints", "step00000006", "optim.safetensors"))
    assert adam_step == 6  # 4 steps on 2 ranks, then 2 on 1: not restarted
    proc = subprocess.run(
        command(out, demo_shards, *opts, "train.max_steps=8", nproc=3),
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "global batch of 128; 3 ranks x micro-batch 64 cannot make it" in errors[0]
    assert "resume on 1, 2 ranks, or pass train.allow_batch_change=true (global batch 192" in errors[0]
    three = train(
        out,
        demo_shards,
        *opts,
        "train.max_steps=8",
        "train.allow_batch_change=true",
        "mlflow.register_as=tnt-elastic",
        nproc=3,
    )
    assert "1 ranks x accum 2 -> 3 ranks x accum 1, global batch 192 (was 128), lr scaled to it" in three.stderr
    got = losses(out)
    # a larger batch at a scaled lr, so not equal: within 10% of the 2-rank run at each step.
    # (At step 8 the loss is still near ln 10, so this alone cannot tell a continued model
    # from a reset one; the weights below can.)
    assert all(got[s] == pytest.approx(ref_loss[s], rel=0.1) for s in (7, 8)), (got, ref_loss)
    ckpt = lambda run, step: reshard.read(os.path.join(run, "checkpoints", tag_of(step), "optim.safetensors"))  # noqa: E731
    (o8, adam_step), (r8, _), (r6, _) = ckpt(out, 8), ckpt(ref, 8), ckpt(ref, 6)
    assert adam_step == 8
    # the fp32 weights after 2 steps on 3 ranks are no farther from the uninterrupted run's
    # than that run moved in the same 2 steps, times 1.5 (measured: 0.94x; a model reset to
    # its initialisation and trained 2 steps: 3.5x; a partition lost: far more)
    dist = lambda a, b: sum(((a[k] - b[k]).double() ** 2).sum() for k in a if k.endswith(":fp32")) ** 0.5  # noqa: E731
    assert dist(o8, r8) <= 1.5 * dist(r8, r6), (dist(o8, r8), dist(r8, r6))
    # the registered version's lineage: three attempts trained (the refused one did not), on 2, 1 and 3 ranks
    from mlflow import MlflowClient

    tags = (
        MlflowClient("sqlite:///" + os.path.join(out, "mlflow.db"))
        .get_model_version_by_alias("tnt-elastic", "last")
        .tags
    )
    assert (tags["attempts"], tags["world_sizes"], tags["requeues"], tags["step"]) == ("3", "2,1,3", "0", "8")


# ZeRO-0 runs with the batch finished in the main process (uint8 batches from the
# workers; normalisation, erasing and Mixup/CutMix by DeviceFinish, on CUDA the GPU)
ON_DEVICE = ("data.finish=device", "aug.re_prob=0.5", "aug.mixup=0.8", "aug.cutmix=1.0")


# fp16 (its loss scaler) is trained and exported above, not resumed here: the suite's
# 30-minute budget (it cost 65 s)
@pytest.mark.parametrize(
    "stage,precision,extra",
    [(0, "bf16", ON_DEVICE), (2, "bf16", ()), (3, "bf16", ())],
    ids=["zero0-bf16-finish_on_device", "zero2-bf16", "zero3-bf16"],
)
def test_resume_at_each_zero_stage_matches_uninterrupted_run(stage, precision, extra, demo_shards, tmp_path):
    """Stop after 4 steps, go on to 7 (max_steps is a stopping point, not the schedule):
    the same losses and weights as 7 steps in one go. (ZeRO-1 bf16: the kill test.)"""
    opts = (
        f"train.zero_stage={stage}",
        f"train.precision={precision}",
        "train.ema=false",
        "train.ckpt_every=2",
        "data.val=",
        *extra,
    )
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    train(ref, demo_shards, *opts, "train.max_steps=7")
    train(out, demo_shards, *opts, "train.max_steps=4")
    resumed = train(out, demo_shards, *opts, "train.max_steps=7")
    assert "resumed from " + os.path.join(out, "checkpoints", "step00000004") in resumed.stderr
    ref_loss, got = losses(ref), losses(out)
    assert all(got[s] == pytest.approx(ref_loss[s], rel=1e-5) for s in range(1, 8)), (got, ref_loss)
    wr = load_file(os.path.join(ref, "export", "model.safetensors"))
    wo = load_file(os.path.join(out, "export", "model.safetensors"))
    assert max((wr[k] - wo[k]).abs().max().item() for k in wr) < 1e-6
    # then on 1 rank (elastic resume; ZeRO-1 and the loss check: the test above; ZeRO-2's
    # state by name on 1 and 3 ranks: test_reshard.py; ZeRO-0 keeps no optimizer state by
    # name and is refused: test_checkpoint.py)
    if stage == 3:
        from pipeline import reshard

        one = train(out, demo_shards, *opts, "train.max_steps=9", nproc=1)
        assert "on another number of ranks: 2 ranks x accum 1 -> 1 ranks x accum 2" in one.stderr
        assert reshard.read(os.path.join(out, "checkpoints", "step00000009", "optim.safetensors"))[1] == 9
        # against the reference going on to step 9 on 2 ranks: the same weights and lr,
        # other samples of the epoch, so within 10% (as in the ZeRO-1 elastic test above)
        train(ref, demo_shards, *opts, "train.max_steps=9")
        ref_loss, got = losses(ref), losses(out)
        assert all(got[s] == pytest.approx(ref_loss[s], rel=0.1) for s in (8, 9)), (got, ref_loss)


def test_nonfinite_losses_skip_together_then_stop_without_a_bad_checkpoint(demo_shards, tmp_path):
    """lr 1e30: the first step blows the weights up, every later loss is non-finite.
    All ranks skip together (no hang), the run stops after train.max_nonfinite with
    exit 2 and one line, and no checkpoint comes from a skipped step."""
    out = str(tmp_path / "run")
    proc = subprocess.run(
        command(
            out,
            demo_shards,
            "optim.lr=1e30",
            "optim.warmup_epochs=0",
            "train.ckpt_every=1",
            "train.max_nonfinite=3",
            "train.max_steps=20",
            "data.val=",
        ),
        env=dict(os.environ, MLFLOW_TRACKING_URI=""),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "3 non-finite losses in a row at step 1" in errors[0]
    assert "last good checkpoint: step 1" in errors[0]
    assert proc.stderr.count("batch skipped") == 3  # said once per skip (rank 0), not per rank
    tags = sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step"))
    assert tags == ["step00000001"] and open(os.path.join(out, "checkpoints", "latest")).read() == "step00000001"
    assert not os.path.isdir(os.path.join(out, "export"))
    with open(os.path.join(out, "failures.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]  # one record for the whole run, by rank 0
    assert record["kind"] == "training error" and record["rank"] == 0 and record["step"] == 1
    assert record["resume_from"] == "step00000001" and "non-finite" in record["error"]


def test_a_rank_killed_from_outside_is_recorded_and_the_run_resumes(demo_shards, tmp_path):
    """SIGKILL to rank 1 alone (what the OOM killer does): the launcher stops the other
    rank, says in one line what happened and where the run resumes, and records it."""
    import psutil

    steps = ("train.max_steps=30", "train.ckpt_every=4", "data.val=")
    out = str(tmp_path / "run")
    with open(tmp_path / "launcher.log", "w") as log:  # a file: a pipe nobody reads can fill and block the ranks
        proc = start_until_checkpoint(out, demo_shards, steps, "step00000008", stdout=log, stderr=subprocess.STDOUT)
    try:
        rank1 = next(c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()  # the launcher; its ranks die with it
    stderr = (tmp_path / "launcher.log").read_text()
    assert proc.returncode != 0
    (line,) = [line for line in stderr.splitlines() if line.startswith("launch/local.py: rank 1")]
    assert (
        "was killed by SIGKILL (from outside, or the OOM killer)" in line
        and "the same command resumes from step" in line
    )
    with open(os.path.join(out, "failures.jsonl")) as f:
        records = [json.loads(line) for line in f]
    killed = [r for r in records if r["rank"] == 1]
    assert [r["kind"] for r in killed] == ["killed by SIGKILL (from outside, or the OOM killer)"]
    # rank 0 may have seen its peer vanish before the launcher stopped it: that is recorded as such
    assert all(r["kind"].startswith("lost a peer rank") for r in records if r["rank"] == 0), records
    assert killed[0]["resume_from"] >= "step00000008" and killed[0]["step"] >= 8
    records = killed
    resumed = train(out, demo_shards, *steps)
    assert "resumed from " + os.path.join(out, "checkpoints", records[0]["resume_from"]) in resumed.stderr


@pytest.mark.parametrize("found_by", ["heartbeat", "collective timeout"])
def test_a_stopped_rank_is_found_and_recorded(demo_shards, tmp_path, found_by):
    """SIGSTOP to rank 1 (a hung process: alive, silent, holding no socket error).
    heartbeat: rank 0 is waiting in a collective whose timeout is 10 minutes, but the
    watchdog sees no heartbeat for train.heartbeat_timeout_s, records which rank on which
    host, and exits with 5. collective timeout (the watchdog off; README's "a rank hangs
    inside a collective"): rank 0's collective fails after train.dist_timeout_s, and the
    timeout is recorded. Either way the launcher then ends the stopped rank."""
    import socket

    import psutil

    wait = 6 if found_by == "heartbeat" else 20
    timeouts = (
        (f"train.heartbeat_timeout_s={wait}", "train.dist_timeout_s=600")
        if found_by == "heartbeat"
        else ("train.heartbeat_timeout_s=0", f"train.dist_timeout_s={wait}")
    )
    steps = ("train.max_steps=400", "train.ckpt_every=4", "data.val=", *timeouts)
    out = str(tmp_path / "run")
    with open(tmp_path / "launcher.log", "w") as log:  # a file: a pipe nobody reads can fill and block the ranks
        proc = start_until_checkpoint(out, demo_shards, steps, "step00000004", stdout=log, stderr=subprocess.STDOUT)
    rank1 = None
    try:
        rank1 = next(c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1")
        rank1.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - stopped
    finally:
        if rank1 is not None and rank1.is_running():
            rank1.send_signal(signal.SIGCONT)  # never left stopped for good
        proc.kill()
    stderr = (tmp_path / "launcher.log").read_text()
    assert proc.returncode != 0, stderr[-3000:]
    assert elapsed < wait + 20, f"{elapsed:.0f} s from SIGSTOP to every rank gone"
    with open(os.path.join(out, "failures.jsonl")) as f:
        (record,) = [json.loads(line) for line in f]
    assert record["rank"] == 0 and record["step"] >= 4, record
    if found_by == "heartbeat":
        assert proc.returncode == 5, stderr[-3000:]
        assert record["kind"].startswith("lost a peer rank"), record
        assert f"rank 1 ({socket.gethostname()}) sent no heartbeat" in record["error"]
        assert any(line.startswith("error: rank 0: lost a peer rank: rank 1") for line in stderr.splitlines()), stderr[
            -2000:
        ]
    else:
        assert record["kind"] == "collective timed out (a rank died or hung)", record
        assert elapsed >= wait - 1, f"{elapsed:.0f} s: before train.dist_timeout_s={wait}"
    assert not psutil.pid_exists(rank1.pid) or rank1.status() == psutil.STATUS_ZOMBIE


def test_bad_samples_on_another_rank_reach_the_metrics(demo_shards, tmp_path):
    """Undecodable samples only in a shard that rank 1 reads: the logged counters are
    the sum over ranks (rank 0 alone saw none)."""
    import io
    import shutil
    import tarfile

    from pipeline import config
    from pipeline.data import TrainStream, load_manifest

    cfg = config.load(CONFIG)
    split = str(tmp_path / "shards" / "train")
    shutil.copytree(demo_shards["train"], split)
    manifest = load_manifest(split)
    seen = []
    for rank in (0, 1):
        stream = TrainStream(
            manifest,
            64,
            rank=rank,
            world_size=2,
            seed=cfg.train.seed,
            augment=cfg.aug,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        stream.num_workers = 1
        seen.append({k for b in stream.iter_worker(0, 1) for k in b["key"]})
    only_rank1 = seen[1] - seen[0]
    for url in manifest.urls:
        with tarfile.open(url) as tar:
            members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
        keys = {info.name.rsplit(".", 1)[0] for info, _ in members}
        if keys <= only_rank1:
            break
    else:
        pytest.fail("no shard is read by rank 1 alone")
    broken = sorted(keys)[:5]
    with tarfile.open(url, "w") as tar:
        for info, data in members:
            if info.name.endswith(".jpg") and info.name.rsplit(".", 1)[0] in broken:
                data = b"\xff\xd8garbage"
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "run")
    train(out, {"train": split, "val": ""}, "train.max_steps=31", "train.log_every=31", "data.val=")
    last = metrics(out)[-1]
    assert last["step"] == 31 and last["data/bad_samples"] == 5 and last["data/bad_shards"] == 0


@pytest.mark.parametrize("how", ["sigkill", "usr2"])
def test_the_launchers_ranks_and_workers_do_not_outlive_it(demo_shards, tmp_path, how):
    """sigkill: the launcher SIGKILLed mid-run (as by the OOM killer or a test's timeout)
    left its ranks and their loader workers running; now they die with it.
    usr2: the time-limit signal sent to the launcher reaches every rank once: they
    checkpoint together and the launcher exits with 3 (README: Faults)."""
    import psutil

    out, log = str(tmp_path / "run"), tmp_path / "launcher.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            command(out, demo_shards, "train.max_steps=2000", "data.val=", "train.ckpt_every=0"),
            env=dict(os.environ, MLFLOW_TRACKING_URI=""),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    family = []
    try:
        wait_for("the first training step in the log", lambda: " step 2/" in log.read_text(), 240, proc=launcher)
        family = psutil.Process(launcher.pid).children(recursive=True)
        workers = [p for p in family if p.ppid() != launcher.pid]
        assert len(family) >= 4 and workers, [p.cmdline()[:3] for p in family]  # 2 ranks, a worker each
        if how == "sigkill":
            launcher.kill()
            launcher.wait(timeout=30)
            wait_for(
                "the ranks and workers to die with the launcher",
                lambda: not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                15,
            )
        else:
            # meanwhile a second job on the same train.out is refused (README: Faults), not run alongside
            second = subprocess.run(
                command(
                    out,
                    demo_shards,
                    "train.max_steps=2000",
                    "data.val=",
                    "train.ckpt_every=0",
                    "train.lock_wait_s=0",
                    nproc=1,
                ),
                env=dict(os.environ, MLFLOW_TRACKING_URI=""),
                capture_output=True,
                text=True,
                timeout=300,
            )
            errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
            assert second.returncode == 2 and len(errors) == 1 and "is in use by another live job" in errors[0], (
                second.stderr[-2000:]
            )
            launcher.send_signal(signal.SIGUSR2)
            assert launcher.wait(timeout=180) == 3, log.read_text()[-3000:]
            text = log.read_text()
            assert text.count("stopped: checkpointed at step") == 2 and "Traceback" not in text, text[-3000:]
            step = int(text.split("stopped: checkpointed at step ")[1].split()[0].rstrip(",;"))
            assert os.path.isdir(os.path.join(out, "checkpoints", f"step{step:08d}"))
    finally:
        for p in [psutil.Process(launcher.pid), *family] if launcher.poll() is None else family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        launcher.wait(timeout=30)
