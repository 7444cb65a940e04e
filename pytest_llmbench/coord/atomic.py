"""The one atomic file writer: readers see the old file or the new one, never a torn one.

A file is written whole to a temp file in its final directory (``.NAME.PID.RAND.tmp``: the
store's sweep of dead writers' temp files knows the pattern), optionally fsynced, then
``os.replace``-d over the final name. The store, whose writers must do work under a lock
between the write and the rename, uses the two halves (``temp_name``, ``write_new``) itself.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["atomic_write", "temp_name", "write_new"]


def temp_name(final: str | os.PathLike[str]) -> str:
    """A temp file name beside ``final``, unique to this process and call."""
    head, name = os.path.split(os.fspath(final))
    # 4 random bytes straight from the kernel: ``uuid4()`` built a UUID object for 8 hex
    # digits, on every claim and every result.
    return os.path.join(head, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")


def write_new(path: str | os.PathLike[str], data: bytes, *, fsync: bool) -> os.stat_result:
    """Create ``path`` (it must not exist) holding ``data``; its ``stat`` after the write
    (a rename keeps inode, size and mtime: the store's index checks them)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
        return os.fstat(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *,
                 fsync: bool = False) -> os.stat_result:
    """Replace ``path`` with ``data`` atomically; the temp file is removed on any failure."""
    tmp = temp_name(path)
    try:
        st = write_new(tmp, data, fsync=fsync)
        os.replace(tmp, path)
        return st
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
