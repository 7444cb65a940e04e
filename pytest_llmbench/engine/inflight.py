"""What the engine knows of an item in flight, and what it records for one that ended
without a result of its own (killed at its deadline, crashed, reclaimed).

Pure data and functions, no I/O but the lease-reclaim lookup and the straggler rule's read
of a running item's CPU time (``/proc/PID/stat``): the engine (``scheduler.py``) owns the
processes, pipes and the store.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.engine.runner import Job
from pytest_llmbench.records import ERROR, ItemResult

#: A slow item never holds back the items queued behind it: one running longer than
#: ``STRAGGLER_FACTOR`` times the median duration of the items finished so far (and at least
#: ``STRAGGLER_MIN`` s) stops counting against the concurrency, so another item starts in its
#: place; at most ``concurrency`` such stragglers at once (2 x concurrency processes in all).
#: It still runs, to its own task deadline. Until ``STRAGGLER_SAMPLES`` items have finished
#: there is no median and every running item counts.
#:
#: A straggler must also be *waiting*: its process used no CPU for ``STRAGGLER_IDLE`` s (a
#: call the server does not answer). An item that is slow because the machine is busy is
#: still working; starting more processes beside it would only slow every item down (at zero
#: latency on 2 cores, 64 items starting at once ran past 1 s and doubled the hosts forked).
STRAGGLER_FACTOR = 3.0
STRAGGLER_MIN = 1.0
STRAGGLER_SAMPLES = 16
STRAGGLER_IDLE = 0.25
_PROBE_EVERY = 0.1


@dataclass
class Child:
    """One running item."""

    job: Job
    pid: int
    fd: int
    token: str
    started: float
    deadline: float
    pidfd: int | None = None
    host: Host | None = None
    """The item host running it (its pid, pipes, exit); None: forked by us for this item."""
    buffer: bytearray = field(default_factory=bytearray)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)
    transcript: list[dict[str, Any]] = field(default_factory=list)
    """What the item's conversation did so far (``emit("transcript", ...)``)."""
    turn: int = 0
    result: ItemResult | None = None
    crash: str = ""
    warned_half: bool = False
    """The log line for passing half of the task deadline was written."""
    straggler: bool = False
    """Found waiting past the straggler time (``Stragglers``): stays one until it ends."""
    cpu_probe: tuple[float, float, int] | None = None
    """(since, last read, CPU ticks): its CPU time, unchanged since ``since``."""
    tid: int = 0
    """The thread running it, in a host shared with other items (its own CPU time); 0:
    it has its process to itself."""


@dataclass(eq=False)
class Host:
    """An item host (see ``forkserver.py``): runs our items, one at a time, or several at
    once when they are ``shareable`` (``child._Shared``)."""

    seq: int
    jobs_fd: int
    fd: int
    pid: int = 0
    """0 until the fork server reports it."""
    children: dict[str, Child] = field(default_factory=dict)
    """The items it runs now, by token."""
    shared: bool = False
    """Its items are ``shareable``: it takes more while it has room."""
    served: int = 0
    """Jobs sent to it (it leaves after ``child.HOST_MAX_ITEMS``)."""
    doomed: list[Child] = field(default_factory=list)
    """Its items that passed their deadline while others still ran: it is killed (it takes
    no more items) once those are done."""
    leaving: bool = False
    """It said it leaves (an item left something behind): no more jobs."""
    buffer: bytearray = field(default_factory=bytearray)
    env: dict[str, str] | None = None
    """The environment its last item was sent with."""
    ended: bool = False
    """Its pipe is closed: only its exit status (from the fork server) is awaited."""

    @property
    def sole(self) -> Child | None:
        """Its item when it runs exactly one (the target of an event not tagged with one)."""
        if len(self.children) != 1:
            return None
        return next(iter(self.children.values()))


def _cpu_ticks(pid: int, tid: int = 0) -> int | None:
    info = proc.read_stat(pid, tid)
    return None if info is None else info.cpu_ticks


class Stragglers:
    """The straggler rule (see ``STRAGGLER_FACTOR``): how many items may start now.

    ``cpu_ticks(pid[, tid])``: a process's (or its thread's) CPU time so far, None once it
    is gone (a test's fake)."""

    def __init__(self, cpu_ticks: Callable[..., int | None] = _cpu_ticks) -> None:
        self._cpu_ticks = cpu_ticks
        self.durations: deque[float] = deque(maxlen=256)
        """Seconds taken by recent items that finished with a result (not an error)."""
        self.after = math.inf
        """An item running longer than this no longer counts against the concurrency."""

    def finished(self, child: Child, result: ItemResult) -> None:
        """Learn how long items take from one that finished."""
        if result.status == ERROR:
            return
        self.durations.append(time.monotonic() - child.started)
        if len(self.durations) >= STRAGGLER_SAMPLES and len(self.durations) % 4 == 0:
            self.after = max(STRAGGLER_MIN, STRAGGLER_FACTOR * statistics.median(self.durations))

    def free_slots(self, running: dict[str, Child], concurrency: int) -> int:
        """``concurrency`` less the running items that are not stragglers.

        ``running`` is in the order the items started (a dict keeps insertion order), so
        the stragglers are at its head: counting them stops at the first that is not one,
        and costs nothing while none is (no scan of a thousand items per loop)."""
        busy = len(running)
        if busy >= concurrency and self.after < math.inf:
            now = time.monotonic()
            cutoff = now - self.after
            stragglers = 0
            for child in running.values():
                if child.started >= cutoff or stragglers >= concurrency:
                    break
                if child.straggler or self._waiting(child, now):
                    stragglers += 1
            busy -= stragglers
        return concurrency - busy

    def _waiting(self, child: Child, now: float) -> bool:
        """Whether ``child``'s process has used no CPU for ``STRAGGLER_IDLE`` s (then it is a
        straggler for good). Its ``/proc`` entry is read at most every ``_PROBE_EVERY`` s."""
        probe = child.cpu_probe
        if probe is not None and now - probe[1] < _PROBE_EVERY:
            return False
        if not child.pid:
            ticks = None
        else:  # an item sharing its host: its thread's time (the host's is its neighbours')
            ticks = self._cpu_ticks(child.pid, child.tid) if child.tid else self._cpu_ticks(child.pid)
        if ticks is None:  # not started yet (its host is being forked) or ending
            child.cpu_probe = None
            return False
        if probe is None or probe[2] != ticks:
            child.cpu_probe = (now, now, ticks)
            return False
        child.cpu_probe = (probe[0], now, ticks)
        child.straggler = now - probe[0] >= STRAGGLER_IDLE
        return child.straggler

    def next_change(self, running: dict[str, Child], concurrency: int) -> float:
        """When the next running item turns straggler (``time.monotonic()``), if that frees
        a slot now needed; ``inf`` otherwise. (The oldest item that is not a straggler yet:
        ``running`` is in start order.)"""
        if len(running) < concurrency or self.after == math.inf:
            return math.inf
        now = time.monotonic()
        cutoff = now - self.after
        for child in running.values():
            if child.started >= cutoff:
                return child.started + self.after
            if not child.straggler:  # past the time, not yet seen waiting: look again soon
                return now + _PROBE_EVERY
        return math.inf


def error_result(child: Child, error_class: str, message: str) -> ItemResult:
    """The error record of an item that ended without a result of its own."""
    job = child.job
    return ItemResult(
        key=job.key,
        identity=dict(job.identity),
        status=ERROR,
        error_class=error_class,
        error=message,
        expected=job.case.expected,
        threshold=job.case.scorer.threshold,
        attempts=list(child.attempts),
        completions=list(child.completions),
        started_at=time.time() - (time.monotonic() - child.started),
        elapsed=time.monotonic() - child.started,
        turn=child.turn,
        transcript=list(child.transcript),
    )


def timeout_result(child: Child) -> ItemResult:
    """``task_timeout``: killed at its deadline, with what it had reported so far."""
    elapsed = time.monotonic() - child.started
    limit = child.job.deadlines.task_timeout
    partial = child.completions[-1]["text"] if child.completions else None
    result = error_result(
        child,
        "task_timeout",
        f"task deadline of {limit:g} s exceeded after {elapsed:.1f} s at turn {child.turn}"
        f" ({len(child.attempts)} API attempts); its process tree was killed",
    )
    result.deadline_layer = "task"
    result.answer = partial
    result.details = {"limit": limit, "elapsed": elapsed, "turn": child.turn}
    return result


def crash_result(child: Child, status: int | None, coord_dir: Path) -> ItemResult:
    """The item process died without a result: a lease reclaim killed it, or it crashed."""
    from pytest_llmbench.coord.lease import default_state_dir, find_reclaim

    # The run's pools live in the store; the pools items use on their own (the judge's
    # ``sandbox``) in the state directory.
    reclaim = find_reclaim(coord_dir, token=child.token) or find_reclaim(
        default_state_dir(), token=child.token)
    if reclaim is not None:
        what = (
            "its claim on the item" if reclaim.resource == "claim"
            else f"resource {reclaim.resource!r}"
        )
        result = error_result(
            child,
            "lease_timeout",
            f"held {what} for {reclaim.held:.1f} s, over its limit of {reclaim.limit:g} s;"
            " its process tree was killed",
        )
        result.deadline_layer = "lease"
        return result
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    how = f"signal {-code}" if code is not None and code < 0 else f"code {code}"
    last = child.crash.strip().splitlines()[-1] if child.crash.strip() else ""
    return error_result(
        child, "crashed", f"item process exited with {how} without a result"
        + (f": {last}" if last else ""),
    )


def holder_died_result(job: Job, pid: int) -> ItemResult:
    """``crashed``: the process of this run that held the item's claim died while it ran
    the item. Not run again in this run: the item may well have killed it (an item that
    kills its xdist worker would otherwise kill one worker after another)."""
    return ItemResult(
        key=job.key,
        identity=dict(job.identity),
        status=ERROR,
        error_class="crashed",
        error=f"the process running it (pid {pid}) died while it ran; not run again in"
        " this run (the item may have killed it)",
        expected=job.case.expected,
        threshold=job.case.scorer.threshold,
        started_at=time.time(),
    )


def kill_spec(child: Child) -> proc.KillSpec:
    """Everything ``child`` started (before the fork server reported its pid: by token)."""
    if not child.pid:
        return proc.KillSpec(0, token=child.token)
    return proc.KillSpec(child.pid, pgid=child.pid, token=child.token)


def prefetch_order(positions: list[int], worker: int, workers: int) -> list[int]:
    """The order in which xdist worker ``worker`` of ``workers`` prefetches ``positions``.

    xdist's load scheduler deals its first batch round-robin over the collection, so worker
    ``w`` first gets items ``w, w+W, w+2W...``: those first, then the others, starting at
    a different point for each worker so that workers do not all race for the same ones.
    """
    if workers <= 1:
        return list(positions)
    mine = positions[worker % workers::workers]
    taken = set(mine)
    rest = [p for p in positions if p not in taken]
    if rest:
        shift = (worker * len(rest)) // workers
        rest = rest[shift:] + rest[:shift]
    return mine + rest


def read_lines(fd: int, buffer: bytearray) -> tuple[list[bytes], bool]:
    """Every complete line readable now from the non-blocking ``fd`` (the rest stays in
    ``buffer``), and whether the pipe reached its end."""
    eof = False
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        except OSError:
            chunk = b""
        if not chunk:
            eof = True
            break
        buffer.extend(chunk)
    lines = []
    while (nl := buffer.find(b"\n")) >= 0:
        lines.append(bytes(buffer[:nl]))
        del buffer[: nl + 1]
    return lines, eof
