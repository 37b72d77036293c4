"""Child processes that die with their parent: the launcher's ranks and the ranks'
loader workers, so that a launcher killed by SIGKILL, the OOM killer or a test's
timeout leaves nothing running (and holding GPUs).

Linux's ``PR_SET_PDEATHSIG``: the kernel sends the child a signal when the thread that
started it exits; elsewhere nothing is armed.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with(parent: int, signum: int = signal.SIGKILL) -> None:
    """Arm ``signum`` for when ``parent`` dies; exits now when it already has."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)


def die_with_parent(_worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: this worker dies with the process that started it."""
    die_with(os.getppid())
