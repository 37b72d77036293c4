"""One job at a time per ``train.out``: a POSIX record lock on ``<train.out>/.lock``.

Two jobs writing the same checkpoints and MLflow run corrupt both (a user who submits
twice, or a resubmission racing a requeue). ``fcntl.lockf`` locks are held by the
process: the kernel drops them when it exits, however it dies, and on NFS the server
drops them when the dead client's lease lapses (about 90 s), so a dead job cannot hold
``train.out`` forever. The file says who holds it, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from pipeline.errors import InputError

FILE = ".lock"


class RunInUse(InputError):
    """Another live process holds ``train.out``: retrying now cannot help."""


class RunLock:
    def __init__(self, out: str):
        self.path = os.path.join(out, FILE)
        self.fd: int | None = None

    def acquire(self, wait_s: float = 120.0) -> None:
        """Take the lock, waiting up to ``wait_s`` (a dead holder's NFS lease to lapse)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise RunInUse(
                        f"{os.path.dirname(self.path)} is in use by another live job ({holder}); "
                        f"two jobs must not write one train.out: stop that one, or use another train.out"
                    ) from None
                time.sleep(1.0)
        me = {
            "job": os.environ.get("SLURM_JOB_ID", "local"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def hold(out: str, rank: int, device, wait_s: float) -> RunLock:
    """One job at a time in ``out``: rank 0 takes the lock and holds it until its process
    ends; every rank learns whether it got it (one all-reduce: synchronizes ranks)."""
    from pipeline import distributed

    lock, in_use = RunLock(out), None
    if rank == 0:
        try:
            lock.acquire(wait_s)
        except RunInUse as exc:
            in_use = exc
    if distributed.agree_any([in_use is not None], device)[0]:
        raise in_use or RunInUse("train.out is in use by another job (rank 0 says which)")
    return lock
