"""An exclusive ``flock`` on a lock file whose descriptor stays open: the store's shard lock.

Why not ``filelock.FileLock`` here (it is used where a lock is taken rarely,
``session/storeplace.py``): filelock 4.x opens, ``fstat``s and closes the lock file, makes
its directory and reads ``/proc/sys/kernel/overflowuid`` on every acquire, 223 us of CPU
per acquire and release against 1 us for a ``flock`` on a descriptor kept open (measured on
this project's machine, 2026-12). Every item takes a shard lock twice (its claim in the
pytest process, its result in the item's process), so at zero latency that was ~5 % of the
CPU of a run.

What is kept from filelock's semantics: re-entrant in one thread (the store's index
compaction runs inside a ``put``), threads of a process exclude each other (they share the
descriptor, and a flock belongs to the open file description), a forked child opens its
own descriptor (it shares its parent's open file description, hence its lock), the kernel
drops the lock when the holder dies, and waiting is bounded by ``timeout``.
Also handled: a lock file removed while open (a cleared directory) is opened again, so
two processes never lock two different files of one name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time

__all__ = ["KeptFlock", "LockTimeout"]


class LockTimeout(TimeoutError):
    """The lock was not acquired within its timeout."""


class KeptFlock:
    """``with lock:`` holds an exclusive flock on ``path`` (created if missing)."""

    def __init__(self, path: str, *, timeout: float, poll: float = 0.002) -> None:
        self.path = path
        self.timeout = timeout
        self.poll = poll
        self._mutex = threading.RLock()
        self._fd = -1
        self._pid = os.getpid()
        self._depth = 0

    def __repr__(self) -> str:
        return f"KeptFlock({self.path!r})"

    def _open(self) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptor shares its lock
            self._pid, self._fd, self._depth = os.getpid(), -1, 0
            self._mutex = threading.RLock()
        if self._fd < 0:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    def acquire(self) -> None:
        """Take the lock (re-entrant); ``LockTimeout`` after ``timeout`` seconds of waiting."""
        if self._pid != os.getpid():
            self._open()
        if not self._mutex.acquire(timeout=self.timeout):
            raise LockTimeout(self.path)
        if self._depth:
            self._depth += 1
            return
        try:
            self._lock_file(time.monotonic() + self.timeout)
        except BaseException:
            self._mutex.release()
            raise
        self._depth = 1

    def _lock_file(self, deadline: float) -> None:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(self.path) from None
                time.sleep(self.poll)
                continue
            try:
                if os.fstat(fd).st_nlink > 0:
                    return
            except OSError:
                pass
            # Locked a file that was removed meanwhile: others will lock the new one.
            self._close()

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._mutex.release()

    def _close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor also drops its flock
        self._fd = -1

    def __enter__(self) -> KeptFlock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
