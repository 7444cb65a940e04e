"""Group commit: what a run stores reaches the disk within a second, in one ``syncfs(2)``.

A result is safe from the moment its rename is done against any process dying (``kill -9``
of pytest, an item host, the fork server: the page cache survives them). ``fsync`` only
matters when the machine itself goes down. Two of them per result (the file, then its
directory) cost an item host ~0.5 ms of CPU per item at zero latency (kernel block I/O,
2026-12-02, 1000 items: 3.0 CPU-s of item threads against 2.4 without): a tenth of
everything an item costs. So a run's file store skips them, and the pytest process instead
flushes the store's whole file system once every ``interval`` seconds from a thread of its
own (``Syncer``), and once more, waited for, when the run ends.

What a power cut can then cost: the results of the last ``interval`` seconds. A result
file it leaves torn or empty is moved aside as corrupt when next read, and its item runs
again (``filestore``): a lost result is bought again, a wrong one is never reported.
``--llmbench-sync-interval 0`` brings back the ``fsync`` of every result. Where
``syncfs`` does not exist (not Linux) the store does that too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["Syncer", "available", "syncfs"]

log = logging.getLogger("pytest_llmbench.store.durable")


@cache
def _libc_syncfs() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # The process's own symbols (libc is linked into every CPython on Linux), not
        # ``ctypes.util.find_library``, which runs ``ldconfig -p`` in a subprocess.
        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # a libc without syncfs
        return None


def available() -> bool:
    """Whether this platform has ``syncfs`` (else every result is fsynced as it is stored)."""
    return _libc_syncfs() is not None


def syncfs(path: Path) -> None:
    """Flush every dirty page and inode of the file system holding ``path`` (ctypes
    releases the GIL for the call: the engine's thread goes on meanwhile)."""
    call = _libc_syncfs()
    if call is None:
        raise OSError(f"syncfs is not available on {sys.platform}")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if call(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Syncer:
    """Flushes the store at ``root`` every ``interval`` seconds until ``close()``, which
    flushes once more and waits for it. A failed flush is logged, not raised: the results
    are stored, only not yet on the disk, and the next flush tries again."""

    def __init__(self, root: Path, interval: float) -> None:
        self.root = root
        self.interval = interval
        self.flushes = 0
        """Flushes done so far (the final one included)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="llmbench-store-sync",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def flush(self) -> bool:
        """One flush now; whether it succeeded. (``close`` joins the thread before its own,
        so two never run at once.)"""
        try:
            syncfs(self.root)
        except OSError as exc:
            log.warning("could not flush the result store %s to disk: %s (retried)",
                        self.root, exc)
            return False
        self.flushes += 1
        return True

    def close(self) -> None:
        """Stop the thread, then flush what the run stored last. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()
        if self.flush():
            log.debug("result store %s flushed to disk (%d flushes this run)", self.root,
                      self.flushes)
