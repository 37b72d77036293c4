"""Waits that fail at their deadline, naming what they waited for (a loop that ran out
and carried on would test what happens next as if the event had happened)."""

from __future__ import annotations

import os
import time

import pytest

# Where a wait must stay short to be a test at all, its timeout is multiplied by this
# (a slow or loaded machine: TEST_SLOWDOWN=2 bash .ci/run).
SLOWDOWN = float(os.environ.get("TEST_SLOWDOWN", "1"))


def wait_for(what: str, predicate, timeout: float, interval: float = 0.2, proc=None):
    """``predicate()``'s first true value; fails at ``timeout`` (times :data:`SLOWDOWN`)
    seconds, or at once when ``proc`` (a Popen) has ended, with ``what`` in the message."""
    deadline = time.monotonic() + timeout * SLOWDOWN
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) while waiting for {what}")
        if time.monotonic() >= deadline:
            pytest.fail(f"waited {timeout * SLOWDOWN:.0f} s for {what}")
        time.sleep(interval)
