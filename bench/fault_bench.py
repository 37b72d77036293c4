"""Fault to recovery, measured: a rank that stops (SIGSTOP: alive, silent, no socket
error, the hard case) in a 2-rank run of the tiny TNT on the demo digits.

    .venv/bin/python bench/fault_bench.py          # heartbeat (default 30 s) vs the collective timeout alone
    .venv/bin/python bench/fault_bench.py --baseline-timeout 600   # the true default baseline (10 minutes)

For each setting: seconds from the fault to every rank gone, seconds from the
relaunch to the first optimizer step of the next attempt (restart cost: start-up,
DeepSpeed, resume), and optimizer steps of work lost (the step reached at the fault
minus the checkpoint resumed from). The baseline is the same run with the watchdog off
(``train.heartbeat_timeout_s=0``), where only the collective timeout
(``train.dist_timeout_s``, default 600 s) ends the survivors. The local launcher stands
in for Slurm here: under Slurm the restart also waits for the companion job and the
scheduler (see tests/test_slurm.py, which prints its figure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def command(out: str, shards: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "launch", "local.py"),
        "--nproc",
        "2",
        "--",
        "--config",
        os.path.join(ROOT, "configs", "tiny_cpu.yaml"),
        f"train.out={out}",
        f"data.train={shards}/train",
        "data.val=",
        "data.workers=1",
        "mlflow.register_as=",
        "mlflow.system_metrics=false",
        "train.log_every=1",
        "train.ckpt_every=10",
        "train.max_steps=2000",
        *overrides,
    ]


def logged(out: str) -> list[int]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.startswith("{")]


def last_step(out: str) -> int:
    return max(logged(out))


def one(shards: str, label: str, overrides: list[str], cap_s: float) -> dict:
    import psutil

    out = tempfile.mkdtemp(prefix="fault_bench_")
    env = dict(os.environ, MLFLOW_TRACKING_URI="")
    proc = subprocess.Popen(
        command(out, shards, *overrides), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    latest = os.path.join(out, "checkpoints", "latest")
    # the fault half-way between two checkpoints (every 10 steps): at step 35 or just after
    while not (os.path.isfile(latest) and open(latest).read().strip() >= "step00000030" and last_step(out) >= 35):
        if proc.poll() is not None:
            raise SystemExit(f"{label}: the run ended before the fault: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    rank1 = next(c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGSTOP)
    fault, at_step = time.monotonic(), last_step(out)
    try:
        proc.wait(timeout=cap_s)
        gone = time.monotonic() - fault
    except subprocess.TimeoutExpired:
        gone = None
        for p in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
            p.kill()
        proc.wait()
    resume_from = int(open(latest).read().strip().removeprefix("step"))
    before = len(logged(out))
    restart = time.monotonic()
    again = subprocess.Popen(
        command(out, shards, *overrides, f"train.max_steps={resume_from + 1}"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while again.poll() is None and len(logged(out)) <= before:  # the first step of the new attempt
        time.sleep(0.05)
    first_step = time.monotonic() - restart
    again.wait()
    return {
        "setting": label,
        "gone_s": gone,
        "cap_s": cap_s,
        "restart_s": first_step,
        "lost_steps": at_step - resume_from,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shards",
        default=os.path.join(ROOT, "shards", "mnist"),
        help="demo shards (python -m pipeline.demo --shard-only)",
    )
    p.add_argument("--heartbeat", type=float, default=30.0, help="train.heartbeat_timeout_s of the measured run")
    p.add_argument(
        "--baseline-timeout",
        type=float,
        default=120.0,
        help="train.dist_timeout_s of the baseline (the default is 600; lower only to save time)",
    )
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.shards, "train", "manifest.json")):
        subprocess.run([sys.executable, "-m", "pipeline.demo", "--shard-only"], cwd=ROOT, check=True)
    rows = [
        one(
            a.shards,
            f"watchdog: heartbeat {a.heartbeat:.0f} s, collective timeout {a.baseline_timeout:.0f} s",
            [f"train.heartbeat_timeout_s={a.heartbeat}", f"train.dist_timeout_s={a.baseline_timeout}"],
            a.baseline_timeout + 120,
        ),
        one(
            a.shards,
            f"baseline: no watchdog, collective timeout {a.baseline_timeout:.0f} s",
            ["train.heartbeat_timeout_s=0", f"train.dist_timeout_s={a.baseline_timeout}"],
            a.baseline_timeout + 120,
        ),
    ]
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} CPUs; "
        f"fault: SIGSTOP to rank 1 of 2 (tiny TNT, gloo, ckpt every 10 steps)"
    )
    print("| setting | fault -> all ranks gone (s) | relaunch -> first step (s) | steps lost |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        gone = f"{r['gone_s']:.1f}" if r["gone_s"] is not None else f"> {r['cap_s']:.0f} (still waiting)"
        print(f"| {r['setting']} | {gone} | {r['restart_s']:.1f} | {r['lost_steps']} |")
    if rows[0]["gone_s"] and rows[1]["gone_s"]:
        print(f"detection: {rows[1]['gone_s'] / rows[0]['gone_s']:.1f}x faster with the watchdog")


if __name__ == "__main__":
    main()
