"""Runs items: up to K at once per pytest process, each in its own killable child process.

Why this shape (DESIGN.md section 4): reports cannot be deferred under xdist, so the pytest
protocol for an item *waits* for that item's result while the engine, in the same loop,
keeps up to ``concurrency`` forked children busy with the items that come next. Items are
**claimed** in the store before they start, so xdist workers and concurrent runs never
execute the same item twice; the store is the coordinator.

Each child runs ``runner.execute`` in its own process group with a per-item token in its
environment. The parent enforces the task deadline: on expiry it kills the whole tree
(``proc.kill_tree``: group, descendants, token holders, SIGTERM then SIGKILL), reaps it and
records a ``task_timeout`` error with what the child reported so far.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import selectors
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import proc
from .records import ERROR, ItemResult
from .runner import Job, execute
from .store import ClaimHolder, Store

log = logging.getLogger("pytest_llmbench.engine")

#: Seconds between SIGTERM and SIGKILL when a task deadline fires.
KILL_GRACE = 0.5
#: Extra seconds past the task deadline before another process may reclaim our claim.
CLAIM_GRACE = 10.0
#: Seconds between lease-monitor ticks.
TICK_INTERVAL = 1.0
#: How often an item running elsewhere is looked up in the store.
POLL_ELSEWHERE = 0.05

JobFactory = Callable[[Any], "Job | ItemResult"]


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
    buffer: bytearray = field(default_factory=bytearray)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    completions: list[dict[str, Any]] = field(default_factory=list)
    turn: int = 0
    result: ItemResult | None = None
    crash: str = ""


class Engine:
    """Per-process item runner. ``wait(item)`` is all the pytest protocol calls."""

    def __init__(
        self,
        *,
        store: Store,
        run_id: str,
        concurrency: int,
        make_job: JobFactory,
        key_of: Callable[[Any], str | None],
        fresh: bool = False,
        tick: Callable[[], object] | None = None,
    ) -> None:
        # ``fresh``: stored results of earlier runs are ignored (they are overwritten).
        self.store = store
        self.run_id = run_id
        self.concurrency = max(1, concurrency)
        self.make_job = make_job
        self.key_of = key_of
        self.fresh = fresh
        self.tick = tick
        """Called about once a second from the wait loop (the lease monitor)."""
        self._next_tick = 0.0
        self.running: dict[str, Child] = {}
        self.by_fd: dict[int, Child] = {}
        self.done: dict[str, ItemResult] = {}
        self.elsewhere: set[str] = set()
        """Keys known to be claimed by another process (not retried during lookahead)."""
        self.selector = selectors.DefaultSelector()
        self.holder = ClaimHolder(
            pid=os.getpid(),
            start_time=proc.process_start_time(os.getpid()) or 0,
            host=socket.gethostname(),
            run_id=run_id,
            claimed_at=0.0,
            deadline=0.0,
        )
        self.scan_pos = 0
        self.index: dict[int, int] | None = None
        self.subreaper = proc.set_child_subreaper()

    # --- the protocol side ---------------------------------------------------------------

    def wait(self, item: Any, items: list[Any]) -> ItemResult:
        """Block until ``item``'s result is known; keep the lookahead window busy meanwhile."""
        key = self.key_of(item)
        assert key is not None
        if self.index is None:
            self.index = {id(it): i for i, it in enumerate(items)}
        position = self.index.get(id(item), 0)
        self.scan_pos = max(self.scan_pos, position + 1)
        next_check = 0.0
        while True:
            if key in self.done:
                return self.done.pop(key)
            if key not in self.running:
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + POLL_ELSEWHERE
                    if len(self.running) < self.concurrency or key not in self.elsewhere:
                        self._try_start(item, key, priority=True)
                    if key in self.done:
                        continue
            self._fill(items)
            timeout = POLL_ELSEWHERE if key not in self.running else self._next_timeout()
            self._service(timeout)

    def _fill(self, items: list[Any]) -> None:
        """Start lookahead items until ``concurrency`` children run."""
        while len(self.running) < self.concurrency and self.scan_pos < len(items):
            item = items[self.scan_pos]
            self.scan_pos += 1
            key = self.key_of(item)
            if key is None or key in self.running or key in self.done or key in self.elsewhere:
                continue
            self._try_start(item, key, priority=False)

    def _try_start(self, item: Any, key: str, *, priority: bool) -> None:
        """Claim ``key`` and fork its child, or learn that it is done / busy elsewhere."""
        if priority and len(self.running) >= self.concurrency:
            # The item being reported waits for a free slot; no claim yet.
            if key in self.elsewhere:
                self._check_elsewhere(key)
            return
        job_or_result = self.make_job(item)
        if isinstance(job_or_result, ItemResult):
            self.done[key] = job_or_result
            return
        job = job_or_result
        now = time.time()
        token = secrets.token_hex(8)  # the item process's tag, named in its claim
        holder = self._holder(now, job.deadlines.task_timeout, token)
        # --llmbench-fresh / --llmbench-rescore: results of earlier runs do not count.
        ignore_before = self.run_id if (self.fresh or job.rescore_from is not None) else None
        claim = self.store.claim(key, holder=holder, fresh_run_id=ignore_before)
        if claim.kind == "done" and claim.result is not None:
            self.elsewhere.discard(key)
            self.done[key] = claim.result
            return
        if claim.kind == "busy":
            self.elsewhere.add(key)
            return
        if claim.kind == "overdue" and claim.holder is not None:
            self._reclaim_overdue(key, claim.holder)
            claim = self.store.claim(key, holder=holder, force=True, fresh_run_id=ignore_before)
            if claim.kind != "claimed":
                self.elsewhere.add(key)
                return
        if claim.kind != "claimed":
            self.elsewhere.add(key)
            return
        self.elsewhere.discard(key)
        self._fork(job, token)

    def _check_elsewhere(self, key: str) -> None:
        result = self.store.get(key)
        if result is not None and result.status != ERROR:
            self.done[key] = result
            self.elsewhere.discard(key)

    def _holder(self, now: float, task_timeout: float, token: str) -> ClaimHolder:
        return ClaimHolder(
            pid=self.holder.pid,
            start_time=self.holder.start_time,
            host=self.holder.host,
            run_id=self.run_id,
            claimed_at=now,
            deadline=now + task_timeout + CLAIM_GRACE,
            token=token,
        )

    def _reclaim_overdue(self, key: str, holder: ClaimHolder) -> None:
        """A live holder kept a claim past task deadline + grace: kill its item, take it over.

        The holder is a whole pytest process (another run's worker) whose own engine should
        have killed the item at its task deadline but did not (frozen, stopped, overloaded).
        Killing that process would end every other item it runs, so only the item's own
        process tree, found by the token named in the claim, is killed; a record left like a
        lease reclaim's lets the holder report the item as ``lease_timeout``.
        """
        from .lease import ReclaimEvent, record_reclaim

        held = time.time() - holder.claimed_at
        killed: list[int] = []
        if holder.is_local() and holder.token:
            killed = proc.kill_tree(0, token=holder.token, grace=KILL_GRACE)
            record_reclaim(self.store.root, ReclaimEvent(
                resource="claim", slot=0, holder=holder.pid, held=held, reason="over_time",
                limit=holder.deadline - holder.claimed_at, label=key[:12], token=holder.token,
                killed=tuple(killed),
            ))
        log.warning(
            "[ForcedRelease] resource=claim item=%s holder=%d on %s held=%.1fs past its"
            " deadline: killed %d item process(es), taking the claim over",
            key[:12], holder.pid, holder.host, held, len(killed),
        )

    # --- children ------------------------------------------------------------------------

    def _fork(self, job: Job, token: str) -> None:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        started = time.monotonic()
        deadline = started + job.deadlines.task_timeout
        with warnings.catch_warnings():
            # Python 3.12+ warns when forking a process that has threads (xdist's IO
            # thread): the child only touches its own pipe and sockets, then _exit()s.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests' outcomes
            os.close(read_fd)
            _child_main(job, write_fd, token, deadline, self.store)
        os.close(write_fd)
        # Also set the group from the parent: a deadline may fire before the child runs.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        os.set_blocking(read_fd, False)
        child = Child(job=job, pid=pid, fd=read_fd, token=token, started=started, deadline=deadline)
        try:
            child.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            child.pidfd = None
        self.running[job.key] = child
        self.by_fd[read_fd] = child
        self.selector.register(read_fd, selectors.EVENT_READ, ("pipe", child))
        if child.pidfd is not None:
            self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))

    def _next_timeout(self) -> float:
        if not self.running:
            return POLL_ELSEWHERE
        soonest = min(c.deadline for c in self.running.values())
        timeout = max(0.0, soonest - time.monotonic())
        if not self.running or any(c.pidfd is None for c in self.running.values()):
            timeout = min(timeout, 0.02)
        return min(timeout, 1.0)

    def _service(self, timeout: float) -> None:
        """Wait for child output/exit or the next deadline, then handle what happened."""
        if self.running:
            events = self.selector.select(timeout)
        else:
            events = []
            time.sleep(timeout)
        for skey, _mask in events:
            kind, child = skey.data
            if kind == "pipe":
                self._read(child)
            else:
                self._finish(child)
        now = time.monotonic()
        if self.tick is not None and now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a monitor failure must not stop the run
                log.exception("lease monitor tick failed")
        for child in list(self.running.values()):
            if child.pidfd is None:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    self._finish(child, status)
                    continue
            if now >= child.deadline and child.job.key in self.running:
                self._kill(child)

    def _read(self, child: Child) -> None:
        while True:
            try:
                chunk = os.read(child.fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                return
            child.buffer.extend(chunk)
            while True:
                nl = child.buffer.find(b"\n")
                if nl < 0:
                    break
                line = bytes(child.buffer[:nl])
                del child.buffer[: nl + 1]
                self._event(child, line)

    def _event(self, child: Child, line: bytes) -> None:
        try:
            kind, data = json.loads(line)
        except (ValueError, TypeError):
            return
        if kind == "attempt":
            child.attempts.append(data)
        elif kind == "completion":
            child.completions.append(data)
        elif kind == "turn":
            child.turn = int(data["turn"])
        elif kind == "log":
            record = logging.makeLogRecord(data)
            logging.getLogger(record.name).handle(record)
        elif kind == "result":
            child.result = ItemResult.from_dict(data)
        elif kind == "crash":
            child.crash = str(data)

    def _finish(self, child: Child, status: int | None = None) -> None:
        """The child exited by itself: collect its result (or record the crash)."""
        if child.job.key not in self.running:
            return
        if status is None:
            try:
                _pid, status = os.waitpid(child.pid, 0)
            except ChildProcessError:
                status = 0
        self._read(child)
        self._close(child)
        # Anything the item left behind in its group goes with it (one syscall to know).
        if proc.group_exists(child.pid):
            proc.reap(proc.kill_tree(child.pid, pgid=child.pid, token=child.token, grace=0.2))
        result = child.result
        if result is None:
            result = self._crash_result(child, status)
            self._put(result)
        self.done[child.job.key] = result

    def _kill(self, child: Child) -> None:
        """Task deadline: kill the item's whole process tree and record what it did."""
        self._read(child)
        if child.result is not None:  # it finished in the very last moment
            self._finish(child)
            return
        elapsed = time.monotonic() - child.started
        limit = child.job.deadlines.task_timeout
        log.warning(
            "[TaskTimeout] %s: killed after %.1f s (task_timeout %.1f s, turn %d, %d attempts)",
            child.job.nodeid, elapsed, limit, child.turn, len(child.attempts),
        )
        killed = proc.kill_tree(child.pid, pgid=child.pid, token=child.token, grace=KILL_GRACE)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(child.pid, 0)
        proc.reap(p for p in killed if p != child.pid)
        self._close(child)  # whatever it sent after the deadline does not count
        partial = child.completions[-1]["text"] if child.completions else None
        result = self._error_result(
            child,
            "task_timeout",
            f"task deadline of {limit:g} s exceeded after {elapsed:.1f} s at turn {child.turn}"
            f" ({len(child.attempts)} API attempts); its process tree was killed",
        )
        result.deadline_layer = "task"
        result.answer = partial
        result.details = {"limit": limit, "elapsed": elapsed, "turn": child.turn}
        self._put(result)
        self.done[child.job.key] = result

    def _crash_result(self, child: Child, status: int | None) -> ItemResult:
        """The child died without a result: a lease reclaim killed it, or it crashed."""
        from .lease import find_reclaim

        reclaim = find_reclaim(self.store.root, token=child.token)
        if reclaim is not None:
            what = (
                "its claim on the item" if reclaim.resource == "claim"
                else f"resource {reclaim.resource!r}"
            )
            result = self._error_result(
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
        return self._error_result(
            child, "crashed", f"item process exited with {how} without a result"
            + (f": {last}" if last else ""),
        )

    def _error_result(self, child: Child, error_class: str, message: str) -> ItemResult:
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
        )

    def _put(self, result: ItemResult) -> None:
        try:
            self.store.put(result)
        except OSError as exc:
            log.error("could not store the result of %s: %s", result.identity.get("nodeid"), exc)

    def _close(self, child: Child) -> None:
        self.running.pop(child.job.key, None)
        self.by_fd.pop(child.fd, None)
        for fd in (child.fd, child.pidfd):
            if fd is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
            os.close(fd)

    def shutdown(self) -> None:
        """Kill every running child (interrupted run); their claims die with this process."""
        for child in list(self.running.values()):
            proc.reap(proc.kill_tree(child.pid, pgid=child.pid, token=child.token, grace=0.2))
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child.pid, 0)
            self._close(child)
            with contextlib.suppress(OSError):
                self.store.release(child.job.key, self.holder)
        self.selector.close()

    def pending(self) -> Iterable[str]:
        return list(self.running)


class _PipeLogHandler(logging.Handler):
    """In the child: ship the plugin's log records to the parent, which re-emits them."""

    def __init__(self, send: Callable[[str, Any], None]) -> None:
        super().__init__(logging.DEBUG)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        # A log line must never kill the item.
        with contextlib.suppress(Exception):
            self.send(
                "log",
                {
                    "name": record.name,
                    "levelno": record.levelno,
                    "levelname": record.levelname,
                    "msg": record.getMessage(),
                    "created": record.created,
                    "process": record.process,
                },
            )


def _child_main(job: Job, fd: int, token: str, deadline: float, store: Store) -> None:  # pragma: no cover
    """Body of the forked child. Never returns."""
    code = 0
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.tag_process(token)

        def send(kind: str, data: Any) -> None:
            payload = (json.dumps([kind, data], default=str) + "\n").encode()
            view = memoryview(payload)
            while view:
                try:
                    n = os.write(fd, view)
                except InterruptedError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EPIPE:
                        return
                    raise
                view = view[n:]

        root = logging.getLogger("pytest_llmbench")
        root.handlers = [_PipeLogHandler(send)]
        root.propagate = False
        root.setLevel(logging.DEBUG)
        result = execute(job, send, task_deadline=deadline)
        store.put(result)
        send("result", result.to_dict())
    except BaseException:  # noqa: BLE001 - reported to the parent, which records a crash
        code = 1
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps(["crash", traceback.format_exc()]) + "\n").encode())
    finally:
        os._exit(code)
