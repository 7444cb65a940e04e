"""The run-wide count of items in flight, shared by the xdist workers of one run.

Under ``-n W`` with the default concurrency, the run as a whole keeps
``DEFAULT_RUN_CONCURRENCY`` items in flight. Splitting that evenly (64 // 32 = 2 per
worker) wasted it: xdist starts its workers one after another (7-9 s for 32 on 2 cores),
and the first ones up sat at 2 items each while the run-wide budget was free; at ``-n 32``
never more than 44 calls were in flight. Now any worker may use the whole budget while the
others are not using it: each worker publishes how many items it runs in its own slot of a
small shared file (one 8-byte counter per worker, ``mmap``-ed by every worker), and starts
an item only while the sum is below the budget.

No lock: a worker reads the sum, starts an item, then publishes, so two workers starting at
the same instant may both take the last slot. The budget is then exceeded by at most one
item per worker, for the time of one item (endpoint limits, ``max_connections`` and
``rpm``, are enforced apart, by the rate limiter, and are never exceeded this way). A
worker that dies leaves its last count in its slot until a worker with the same index
(modulo ``W``) publishes there: a crashed worker costs the run at most its share.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
from pathlib import Path

_SLOT = struct.Struct("=q")


def create(workers: int) -> Path:
    """The controller: a zeroed slot file for ``workers`` workers (removed by ``remove``)."""
    fd, name = tempfile.mkstemp(prefix="llmbench-slots-")
    try:
        os.ftruncate(fd, _SLOT.size * max(1, workers))
    finally:
        os.close(fd)
    return Path(name)


def remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


class RunSlots:
    """One worker's view of the run-wide count: ``free(mine)`` and ``publish(mine)``."""

    def __init__(self, path: Path, worker: int, budget: int) -> None:
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), 0)
        self.workers = max(1, len(self._map) // _SLOT.size)
        self.offset = (worker % self.workers) * _SLOT.size
        self.budget = budget
        self._format = f"={self.workers}q"
        self._mine = 0
        self.publish(0)

    def publish(self, mine: int) -> None:
        """This worker runs ``mine`` items now (counted against the budget)."""
        if mine != self._mine:
            _SLOT.pack_into(self._map, self.offset, mine)
            self._mine = mine

    def free(self, mine: int) -> int:
        """How many more items this worker may start: the budget less every worker's count,
        with this worker's own as ``mine`` (it may not have published it yet)."""
        counts: tuple[int, ...] = struct.unpack_from(self._format, self._map)
        others = sum(counts) - self._mine
        return self.budget - others - mine

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self.publish(0)
            self._map.close()
