"""Files that appear whole or not at all: write beside, fsync, rename.

A reader (another rank, a resumed run, the shard builder's next pass) sees either the
old file or the complete new one, never a part; a process killed mid-write leaves only
``<path>.tmp-<pid>-<thread>``, which the owner of the directory sweeps (``shard.py``'s
clean-up, ``store.ShardCache``'s stale downloads).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the
    file written there (fsynced if ``durable``) replaces ``path``, else it is removed."""
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    if durable:
        fsync_dir(os.path.dirname(path) or ".")


def write_atomic(path: str, text: str, durable: bool = True) -> None:
    """Write ``text`` to ``path`` whole or not at all."""
    with replacing(path, durable) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
