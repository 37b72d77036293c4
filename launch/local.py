"""Run the trainer on one machine with N processes (the local launcher).

    python launch/local.py --nproc 2 -- --config configs/tiny_cpu.yaml train.zero_stage=2

Starts N copies of ``python -m pipeline.train`` with RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (what torchrun would set), streams their output
(rank 0 logs; other ranks only warn), and if one fails stops the others and exits
with its status. The config is loaded once before any rank starts, so a bad key or
value is one 'error:' line and nothing is started. Ctrl-C stops all of them; the last
complete checkpoint stays, and running the same command again resumes from it.

The ranks live in a process group of their own, with a parent-death signal: Ctrl-C
and SIGTERM reach each rank once (from the launcher, not also from the terminal);
SIGUSR2 (the time-limit signal) is passed on to every rank, which checkpoints and
exits with 3; and when the launcher dies, even by SIGKILL or the OOM killer, its ranks
and their loader workers die with it instead of holding the GPUs.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pipeline import lifetime  # noqa: E402 - after the checkout is on sys.path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nproc: int, args: list[str], entry: tuple[str, ...] = ("-m", "pipeline.train"), env: dict | None = None
) -> int:
    """Run ``python <entry> args`` as ``nproc`` ranks; the first non-zero exit wins."""
    port = free_port()
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = ROOT + (os.pathsep + base["PYTHONPATH"] if base.get("PYTHONPATH") else "")
    procs, group = [], 0
    for rank in range(nproc):
        e = dict(
            base,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        if nproc > 1 and "OMP_NUM_THREADS" not in base:
            e["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        # rank 0 leads the ranks' own process group; the others join it
        procs.append(
            subprocess.Popen(
                [sys.executable, *entry, *args],
                env=e,
                cwd=os.getcwd(),
                process_group=group,
                preexec_fn=functools.partial(lifetime.die_with, os.getpid()),
            )
        )
        group = group or procs[0].pid

    def signal_all(signum: int) -> None:
        try:
            os.killpg(group, signum)  # the ranks and their loader workers
        except ProcessLookupError:
            pass

    def stop(*_):
        if any(p.poll() is None for p in procs):
            signal_all(signal.SIGTERM)
            signal_all(signal.SIGCONT)  # a stopped rank (SIGSTOP, a debugger) acts on SIGTERM only when continued
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
        signal_all(signal.SIGKILL)  # what is left, workers included

    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGUSR2"):  # the time-limit signal: every rank checkpoints and exits with 3
        signal.signal(signal.SIGUSR2, lambda *_: [p.send_signal(signal.SIGUSR2) for p in procs if p.poll() is None])
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                rank = procs.index(failed[0])
                if not _all_exit_together(procs, status):
                    print(
                        f"launch/local.py: rank {rank} {_fault(status, rank, args)}; stopping the others",
                        file=sys.stderr,
                    )
                    stop()
                break
            time.sleep(0.2)
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        stop()
        for p in procs:
            p.wait()
        return 130
    return status or next((p.returncode for p in procs if p.returncode), 0)


def _all_exit_together(procs: list[subprocess.Popen], status: int) -> bool:
    """Status 2 is an error every rank finds and rank 0 explains (bad input before the
    process group, or a training error decided on agreed values): wait a little for
    the others to exit the same way, so that rank 0 is not stopped before it says why."""
    if status != 2:
        return False  # a fault in one rank: the others would only wait for it in a collective
    deadline = time.monotonic() + EXIT_GRACE_S
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    return all(p.poll() == status for p in procs)


EXIT_GRACE_S = 30.0  # for ranks that all end with status 2 to say so themselves
STOP_GRACE_S = 10.0  # from SIGTERM to SIGKILL for the ranks left when one has failed


def _fault(status: int, rank: int, args: list[str]) -> str:
    """What a rank's exit status means; a death by signal (which the rank could not
    record itself) goes into <train.out>/failures.jsonl."""
    if status == 5:
        return "exited with 5: it lost a peer rank (see failures.jsonl)"
    if status >= 0:
        return f"exited with {status}"
    from pipeline import config, failures

    kind = failures.signal_kind(status)
    try:
        out = config.load_argv(args).out_dir
        entry = failures.record(out, kind, kind, rank)
    except Exception:  # noqa: BLE001 - no config to find train.out by: say what happened anyway
        return f"was {kind}"
    resume = f"the same command resumes from {entry['resume_from']}" if entry["resume_from"] else "no checkpoint yet"
    return f"was {kind} (recorded in {os.path.join(out, failures.FILE)}; {resume})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python launch/local.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--nproc", type=int, default=1, help="processes (ranks) to start on this machine; one per GPU on GPU machines"
    )
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the trainer, after --")
    a = p.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    from pipeline import config
    from pipeline.errors import InputError

    try:
        config.load_argv(args)  # as every rank will: a bad key or value is said once, before any rank starts
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return launch(a.nproc, args)


if __name__ == "__main__":
    sys.exit(main())
