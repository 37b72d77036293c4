"""The failure record of a run: ``<train.out>/failures.jsonl``, one JSON line per fault.

Written by the process that sees the fault: a rank that raises (a training error, a
checkpoint that cannot be written, an out-of-memory error, a data-loader worker that
died), or the launcher when a rank dies from a signal it cannot catch (SIGKILL from
outside or the OOM killer). Each line: time, job id, requeue attempt and resubmission
(launch/slurm.py), rank and host, what happened (``kind`` and ``error``), the last
logged step and the checkpoint the next attempt resumes from. Input and config errors
are not faults and are not recorded (nothing is to be retried for them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from pipeline.errors import first_line

FILE = "failures.jsonl"


def classify(exc: BaseException) -> str:
    """A name for what happened, as a user would look for it."""
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower() or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory"
    if "DataLoader timed out" in text:
        return "data loading stalled (no batch from the DataLoader workers in data.timeout_s)"
    if "DataLoader worker" in text:
        return "data-loader worker failed"
    if type(exc).__name__ == "CheckpointWriteError":
        return "checkpoint write failed"
    if type(exc).__name__ == "TrainingError":
        return "training error"
    lost = ("connection closed by peer", "connection reset", "broken pipe", "remote process exited", "nccl error")
    if any(words in text.lower() for words in lost):
        return "lost a peer rank (it died, or its node or network did)"
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "collective timed out (a rank died or hung)"
    return "exception"


def signal_kind(returncode: int) -> str:
    """A process's negative return code (killed by a signal), in words."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"exited with {returncode}"
    if name == "SIGKILL":
        return "killed by SIGKILL (from outside, or the OOM killer)"
    return f"killed by {name}"


def read(out: str, name: str = FILE) -> list[dict]:
    """Every record so far in ``<out>/<name>`` (a JSON-lines file; none if there is no
    file or it cannot be read)."""
    try:
        with open(os.path.join(out, name)) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []


def resume_point(out: str) -> str | None:
    """The tag ``latest`` names (what the next attempt resumes from), if any."""
    try:
        with open(os.path.join(out, "checkpoints", "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def last_logged_step(out: str) -> int | None:
    try:
        with open(os.path.join(out, "metrics.jsonl"), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 4096))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.startswith("{")]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError):
        return None


def record(
    out: str,
    kind: str,
    error: str,
    rank: int | None,
    step: int | None = None,
    job: str | None = None,
    resubmission: int | None = None,
    host: str | None = None,
) -> dict:
    """Append one fault to ``<out>/failures.jsonl`` (one small O_APPEND write: lines of
    several ranks do not interleave) and return it. ``job``/``resubmission``: of
    another job than this process's (the launcher's companion job says how the
    training job ended)."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "job": job or os.environ.get("SLURM_JOB_ID", "local"),
        "attempt": int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if job is None
        else None,  # requeues of this job (time limit, preemption)
        "resubmission": resubmission
        if resubmission is not None
        else int(os.environ.get("TNTPIPE_RESUBMISSION", "0")),  # jobs resubmitted after faults before it
        "rank": rank,
        "host": host or socket.gethostname(),
        "kind": kind,
        "error": first_line(error, 500) or kind,
        "step": step if step is not None else last_logged_step(out),
        "resume_from": resume_point(out),
    }
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, FILE), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
    finally:
        os.close(fd)
    return entry
