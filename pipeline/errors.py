"""The project's exceptions that cross modules, and the one way to put an exception in a line.

Exit codes are chosen only in the entry points' ``main`` (``pipeline/train.py``,
``pipeline/shard.py``, ``launch/slurm.py``): an :class:`InputError` is one line and exit 2.
"""

from __future__ import annotations


class InputError(Exception):
    """A problem with the user's input that ends the run with a one-line message."""


class DataError(RuntimeError):
    """The stream cannot go on (for example: no shard of the split can be read)."""


class TrainingError(RuntimeError):
    """Training cannot go on (for example: repeated non-finite losses)."""


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's message (or of a text), at most ``limit``
    characters; ``""`` when it has none. Tracebacks of DeepSpeed, boto3 and MLflow put
    whole pages in one message: a log line or a one-line exit keeps the first."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else ""


def summary(error: BaseException, limit: int = 300) -> str:
    """``Type: first line`` (or the type alone when the message is empty)."""
    line = first_line(error, limit)
    return f"{type(error).__name__}: {line}" if line else type(error).__name__
