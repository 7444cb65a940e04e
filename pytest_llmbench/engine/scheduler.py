"""Runs items: up to K at once per pytest process, each in a killable process.

Why this shape (DESIGN.md section 4): reports cannot be deferred under xdist, so the pytest
protocol for an item *waits* for that item's result while the engine, in the same loop,
keeps up to ``concurrency`` items running with the items that come next. Items are
**claimed** in the store before they start, so xdist workers and concurrent runs never
execute the same item twice; the store is the coordinator.

An item runs in an *item host* (``child.host_main``: a process forked by the fork server,
``forkserver.py``, that runs the engine's items one at a time, or up to ``host_threads``
``shareable`` ones at once, a thread each) or, when its job cannot be sent there, in a
child this process forks for it (``child.child_main``). Either way it runs
``runner.execute`` in a process group of its own (an item alone in it: with a per-item token
in its environment; items sharing a host: killed with it once the others are done). The
engine enforces the task deadline: on expiry it kills the whole tree (``proc.kill_trees``:
group, descendants, token holders, SIGTERM then SIGKILL; a host killed so is replaced) and
records a ``task_timeout`` error with what the item reported so far.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import json
import logging
import os
import secrets
import selectors
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.engine import forkserver
from pytest_llmbench.engine.child import child_main
from pytest_llmbench.engine.hostpool import HostPool
from pytest_llmbench.engine.inflight import (
    Child,
    Host,
    Stragglers,
    crash_result,
    holder_died_result,
    read_lines,
    timeout_result,
)
from pytest_llmbench.engine.runner import Job
from pytest_llmbench.engine.runslots import RunSlots
from pytest_llmbench.engine.supervise import Supervisor
from pytest_llmbench.records import ERROR, ItemResult
from pytest_llmbench.store.claims import ClaimHolder
from pytest_llmbench.store.protocol import ResultStore

log = logging.getLogger("pytest_llmbench.engine.scheduler")

#: Seconds between SIGTERM and SIGKILL when a task deadline fires.
KILL_GRACE = 0.5
#: The item process ends its own API attempt at the task deadline (``api.chat`` caps it) and
#: reports ``task_timeout`` itself; it is killed only if it has not within this much more.
#: An item host that reported keeps running (no kill, no new host).
KILL_SLACK = 0.25
#: Extra seconds past the task deadline before another process may reclaim our claim.
CLAIM_GRACE = 10.0
#: Seconds between lease-monitor ticks.
TICK_INTERVAL = 1.0
#: How often an item running elsewhere is looked up in the store (a ``stat`` of its file).
POLL_ELSEWHERE = 0.05
#: How often its claim is tried again (a dead holder's claim is taken over then).
RECLAIM_ELSEWHERE = 1.0
#: How often a worker held back by the run-wide budget looks at it again.
RUN_SLOTS_POLL = 0.05

JobFactory = Callable[[Any], "Job | ItemResult"]


def _decode(line: bytes) -> tuple[str, Any, str] | None:
    """An item's or a host's event line -> ``(kind, data, token)``; None for a torn or
    foreign line (a hostile item can write anything to its pipe). ``token`` names the item
    of a host shared by several (``child._Shared``), "" otherwise."""
    try:
        event = json.loads(line)
        kind, data, *rest = event
    except (ValueError, TypeError):
        return None
    token = rest[0] if len(rest) == 1 else ""
    return (kind, data, token) if isinstance(kind, str) and isinstance(token, str) else None


class Engine:
    """Per-process item runner. ``wait(item)`` is all the pytest protocol calls."""

    def __init__(
        self,
        *,
        store: ResultStore,
        coord_dir: Path,
        run_id: str,
        concurrency: int,
        make_job: JobFactory,
        key_of: Callable[[Any], str | None],
        fresh: bool = False,
        rescore: bool = False,
        tick: Callable[[], object] | None = None,
        fork_server: str | None = None,
        tls: bool = False,
        run_slots: RunSlots | None = None,
        host_threads: int = 1,
        server: forkserver.ForkServer | None = None,
    ) -> None:
        # ``fresh``: stored results of earlier runs are ignored (they are overwritten).
        # ``rescore``: stored answers are judged again, so a stored verdict never suffices.
        self.store = store
        self.coord_dir = coord_dir
        """Where overdue-claim reclaims are recorded for the killed item's engine to find."""
        self.run_id = run_id
        self.concurrency = max(1, concurrency)
        self.make_job = make_job
        self.key_of = key_of
        self.fresh = fresh
        self.rescore = rescore
        self.tick = tick
        """Called about once a second from the wait loop (the lease monitor)."""
        self._next_tick = 0.0
        self.running: dict[str, Child] = {}
        self.done: dict[str, ItemResult] = {}
        self.elsewhere: set[str] = set()
        """Keys known to be claimed by another process (not retried during lookahead)."""
        self.selector = selectors.DefaultSelector()
        self.holder = ClaimHolder.current(run_id=run_id, deadline=0.0)
        self.scan_pos = 0
        self.started_at = time.time()  # results stored since are (likely) this run's
        self.index: dict[int, int] | None = None
        self.supervisor = Supervisor()
        self.server: forkserver.ForkServer | None = None
        self.use_server = forkserver.enabled()
        self.server_path = fork_server
        """Where the run's shared fork server listens (xdist), or None: start our own."""
        self.tls = tls
        """A model is reached over HTTPS: our own fork server prepares the TLS context."""
        self.run_slots = run_slots
        """xdist with the default concurrency: the run-wide count every worker shares."""
        self.pool = HostPool(host_threads)
        """The live item hosts and where the next job goes (``hostpool.py``)."""
        self._server_writing = False
        """The server's socket is watched for writability (requests wait to be sent)."""
        self._env: dict[str, str] | None = None
        self._env_raw: dict[bytes, bytes] | None = None
        """The environment jobs carry, and the bytes it was decoded from (``_job_env``)."""
        self._deadlines: list[tuple[float, int, Child]] = []
        """A heap of (deadline, tie-breaker, child) of the items started; entries of items
        no longer running are dropped when they reach the top (no scan of every item)."""
        self._pushed = 0
        self._halfway: list[tuple[float, int, Child]] = []
        """Likewise, when each item passes half of its task deadline (a warning)."""
        self._polled: dict[str, Child] = {}
        """Children forked here that have no pidfd: their exit is found with ``waitpid``."""
        self.stragglers = Stragglers()
        self._prefetcher: threading.Thread | None = None
        self._stop_prefetch = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.selector.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        if server is not None:  # started already (it ran the preflight): ours from now on
            self._adopt(server)

    # --- before the first item: xdist workers wait for every other worker ----------------

    def warm(self) -> None:
        """Start the fork server now, while pytest is still collecting: its start-up (a new
        interpreter, ~0.1 CPU-s) then runs beside the collection, not before the first item.
        (Forking the hosts ahead as well was measured: no faster, and wasted when the items
        are stored already.)"""
        if not self.use_server or self.server is not None:
            return
        server = forkserver.started(self._connect_server, "items fork from pytest")
        if server is None:
            self.use_server = False
            return
        self._adopt(server)

    def _adopt(self, server: forkserver.ForkServer) -> None:
        self.server = server
        self.selector.register(server.fileno(), selectors.EVENT_READ, ("server", None))
        self._server_writing = False

    @staticmethod
    def _freeze() -> None:
        # Everything alive now (the session, its collected items) stays alive for the run:
        # keep it out of the cyclic GC's full collections, which otherwise cost a worker of
        # ``-n 32`` a tenth of its CPU walking the same objects again and again (perf).
        gc.freeze()

    def prefetch(self, items: list[Any], order: list[int]) -> None:
        """Start items in ``order`` (positions in ``items``) on a thread, until the first
        ``wait`` (or ``drain``/``shutdown``) takes the engine back.

        An xdist worker gets its first item only once *every* worker has collected; under
        ``-n 32`` on 2 cores that takes seconds, and the workers that are ready would sit
        idle. The engine is used by one thread at a time: this one until the hand-over,
        which stops and joins it (``_take_over``), then the pytest protocol's."""
        if self._prefetcher is not None or not order:
            return
        self._freeze()
        self._prefetcher = threading.Thread(
            target=self._prefetch_loop, args=(items, order), name="llmbench-prefetch", daemon=True
        )
        self._prefetcher.start()

    def _prefetch_loop(self, items: list[Any], order: list[int]) -> None:
        cursor = 0
        try:
            while not self._stop_prefetch.is_set():
                free = self.free_slots()
                while free > 0 and cursor < len(order) and not self._stop_prefetch.is_set():
                    # An item stored by an earlier run is skipped: its owner reads it (or
                    # retries an error); every worker reading every stored result is waste.
                    free = self._less(free, self._look_ahead(items[order[cursor]],
                                                             skip_stored=not self.fresh))
                    cursor += 1
                if cursor >= len(order) and not self.running:
                    return
                self._service(self._next_timeout())
        except Exception:  # noqa: BLE001 - the protocol runs every item anyway
            log.debug("prefetch stopped on an error; items run in the protocol", exc_info=True)

    def _take_over(self) -> None:
        """Stop the prefetch thread (if any) so this thread owns the engine."""
        thread = self._prefetcher
        if thread is None:
            return
        self._stop_prefetch.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        thread.join()
        self._prefetcher = None

    # --- the protocol side ---------------------------------------------------------------

    def wait(self, item: Any, items: list[Any]) -> ItemResult:
        """Block until ``item``'s result is known; keep the lookahead window busy meanwhile."""
        key = self.key_of(item)
        assert key is not None
        self._take_over()
        if self.index is None:
            self._freeze()
            self.index = {id(it): i for i, it in enumerate(items)}
        position = self.index.get(id(item), 0)
        self.scan_pos = max(self.scan_pos, position + 1)
        next_check = next_claim = 0.0
        while True:
            if key in self.done:
                return self.done.pop(key)
            if key not in self.running:
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + POLL_ELSEWHERE
                    if key not in self.elsewhere:
                        self._try_start(item, key, priority=True)
                    elif self.store.has_result(key) and self._check_elsewhere(key):
                        continue
                    elif now >= next_claim and self.free_slots() > 0:
                        # Cheap polls above; a claim attempt (lock, read, holder check) only
                        # now and then, to take over from a holder that died.
                        next_claim = now + RECLAIM_ELSEWHERE
                        self._try_start(item, key, priority=True)
                    if key in self.done:
                        continue
            self._fill(items)
            timeout = POLL_ELSEWHERE if key not in self.running else self._next_timeout()
            self._service(timeout)

    def _fill(self, items: list[Any]) -> None:
        """Start lookahead items until ``concurrency`` children run."""
        free = self.free_slots()
        while free > 0 and self.scan_pos < len(items):
            free = self._less(free, self._look_ahead(items[self.scan_pos]))
            self.scan_pos += 1

    def _less(self, free: int, started: int) -> int:
        """``free`` slots after ``started`` more items. Under a run-wide budget the count is
        published and the others' read again at once, not after the batch: workers filling
        at the same time each took the whole budget (measured under -n 32: 322 items in
        flight for a budget of 64)."""
        if started and self.run_slots is not None:
            return self.free_slots()
        return free - started

    def _look_ahead(self, item: Any, *, skip_stored: bool = False) -> int:
        """Start ``item`` ahead of its turn unless it is running, done or taken (here or
        elsewhere); how many items that started (0 or 1)."""
        key = self.key_of(item)
        if key is None or key in self.running or key in self.done or key in self.elsewhere:
            return 0
        if self._seen_elsewhere(key):
            self.elsewhere.add(key)
            return 0
        # Stored by an earlier run: its owner reads it when its turn comes (see ``_stored``);
        # keeping every result read ahead would hold the whole store in memory on a cached
        # re-run of 100,000 items. A stored error runs again, ahead.
        if (not self.fresh and self.store.has_result(key)
                and (skip_stored or self._stored(key) is not None)):
            return 0
        before = len(self.running)
        self._try_start(item, key, priority=False)
        return len(self.running) - before

    def free_slots(self) -> int:
        """How many more items may start now (``inflight.Stragglers``; under xdist with
        the default concurrency, also what the run-wide budget has left: ``runslots.py``)."""
        local = self.stragglers.free_slots(self.running, self.concurrency)
        if self.run_slots is None:
            return local
        busy = self.concurrency - local
        self.run_slots.publish(busy)
        return min(local, self.run_slots.free(busy))

    def _seen_elsewhere(self, key: str) -> bool:
        """Two ``stat`` calls (``seen_since`` of the file store) instead of a claim: another
        process runs the item, or stored it during this run. Under ``-n 32`` every worker
        looks ahead over every item, and most of them are taken by the time it gets there; a
        claim attempt (job, lock, reads) for each cost more CPU than the items themselves."""
        return self.store.seen_since(key, self.started_at)

    def _try_start(self, item: Any, key: str, *, priority: bool) -> None:
        """Claim ``key`` and fork its child, or learn that it is done / busy elsewhere."""
        if priority and self.free_slots() <= 0:
            # The item being reported waits for a free slot, no claim yet, unless it is
            # done already (another xdist worker's lookahead ran it: a ``stat`` tells).
            if key in self.elsewhere or self.store.has_result(key):
                self._check_elsewhere(key)
            return
        if not self.rescore and (stored := self._stored(key)) is not None:
            # Stored: no job to build (scorer, deadlines, provider: most of the CPU of
            # reporting a cached item).
            self.elsewhere.discard(key)
            self.done[key] = stored
            return
        job_or_result = self.make_job(item)
        if isinstance(job_or_result, ItemResult):
            self.done[key] = job_or_result
            return
        self._claim_and_fork(key, job_or_result)

    def _claim_and_fork(self, key: str, job: Job) -> None:
        """Claim ``key`` for ``job`` and fork it; or learn that it is done or busy elsewhere,
        or take over an overdue holder's claim."""
        # --llmbench-fresh / --llmbench-rescore: results of earlier runs do not count.
        ignore_before = self.run_id if (self.fresh or job.rescore_from is not None) else None
        if self.rescore and ignore_before is None and (stored := self._stored(key)) is not None:
            self.elsewhere.discard(key)
            self.done[key] = stored
            return
        now = time.time()
        token = secrets.token_hex(8)  # the item process's tag, named in its claim
        holder = self._holder(now, job.deadlines.task_timeout, token)
        claim = self.store.claim(key, holder=holder, fresh_run_id=ignore_before, run_id=self.run_id)
        if claim.kind == "done" and claim.result is not None:
            self.elsewhere.discard(key)
            self.done[key] = claim.result
            return
        if claim.kind == "busy":
            self.elsewhere.add(key)
            return
        if claim.kind == "overdue" and claim.holder is not None:
            self._reclaim_overdue(key, claim.holder)
            claim = self.store.claim(key, holder=holder, force=True, fresh_run_id=ignore_before,
                                     run_id=self.run_id)
            if claim.kind != "claimed":
                self.elsewhere.add(key)
                return
        if claim.kind != "claimed":
            self.elsewhere.add(key)
            return
        self.elsewhere.discard(key)
        gone = claim.took_over
        if gone is not None and gone.run_id == self.run_id and not gone.is_alive():
            self.done[key] = result = holder_died_result(job, gone.pid)
            self._put(result)
            return
        self._fork(job, token)

    def _stored(self, key: str) -> ItemResult | None:
        """A stored result that makes running ``key`` needless, read without the shard lock
        (results are written whole, by rename): what ``Store.claim`` would answer ``done``
        (unless ``fresh``). A cached re-run so skips a lock and a claim per item: the lock
        was most of the cost of reporting a stored result (profile of 10,000 cached items)."""
        if self.fresh:
            return None
        result = self.store.get(key)
        if result is not None and (
            result.status != ERROR or result.identity.get("run_id") == self.run_id
        ):
            return result
        return None

    def _check_elsewhere(self, key: str) -> bool:
        """Take the stored result of an item another process ran: a finished one, or an
        error from this very run (another worker's attempt: not run a second time)."""
        result = self.store.get(key)
        if result is not None and (
            result.identity.get("run_id") == self.run_id
            or (result.status != ERROR and not self.fresh)
        ):
            self.done[key] = result
            self.elsewhere.discard(key)
            return True
        return False

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
        from pytest_llmbench.coord.lease import ReclaimEvent, record_reclaim

        held = time.time() - holder.claimed_at
        killed: list[int] = []
        if holder.is_local() and holder.token:
            killed = proc.kill_tree(0, token=holder.token, grace=KILL_GRACE)
            record_reclaim(self.coord_dir, ReclaimEvent(
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
        """Start ``job``: in an idle item host, a new one, or a child forked for it alone."""
        if self.use_server and not self.pool.has_idle:
            self.warm()
            if self.server is not None:
                # The server's warm-up (``import openai``) before the task deadline starts:
                # waited for here, on the first item that runs, not at collection, so that
                # a run of stored results never waits for it.
                self.server.wait_ready()
        started = time.monotonic()
        deadline = started + job.deadlines.task_timeout
        if self.use_server and self._run_in_host(job, token, started, deadline):
            return
        self._fork_local(job, token, started, deadline)

    def _run_in_host(self, job: Job, token: str, started: float, deadline: float) -> bool:
        env = self._job_env()
        host = self.pool.pick(job, env, can_start=self.server is not None) or self._new_host()
        if host is None:
            return False
        payload = forkserver.encode(forkserver.Spawn(
            job=job, token=token, deadline=deadline, store=self.store.ref(),
            holder=self.holder, sys_path=tuple(sys.path), cwd=os.getcwd(),
            env=None if env == host.env else env,
        ))
        if payload is None:
            self.pool.place(host)  # free for the next job; this one forks from pytest
            return False
        host.env = env
        try:
            os.write(host.jobs_fd, len(payload).to_bytes(4, "big") + payload)
        except OSError as exc:  # the host is gone; its exit is on its way
            log.debug("item host %d did not take a job: %s", host.pid, exc)
            self._drop_host(host)
            return False
        child = Child(job=job, pid=host.pid, fd=host.fd, token=token, started=started,
                      deadline=deadline, host=host)
        self.pool.sent(host, child)
        self._add_running(child)
        return True

    def _job_env(self) -> dict[str, str]:
        """The environment a job carries: ``os.environ`` less pytest's marker of the test it
        is on (never this item, which runs ahead; it would make every job's differ). Decoded
        again only when the environment changed (compared as bytes, in C): decoding ~40
        variables for every item cost ~0.3 ms of the pytest process's CPU."""
        raw: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)
        if raw is not None:
            snapshot = raw.copy()
            snapshot.pop(b"PYTEST_CURRENT_TEST", None)
            if snapshot == self._env_raw and self._env is not None:
                return self._env
            self._env_raw = snapshot
        env = dict(os.environ)
        env.pop("PYTEST_CURRENT_TEST", None)
        self._env = env
        return env

    def _new_host(self) -> Host | None:
        self.warm()
        if self.server is None:
            return None
        jobs_r, jobs_w = os.pipe2(os.O_CLOEXEC)
        results_r, results_w = os.pipe2(os.O_CLOEXEC)
        # The server's ends go with the request (closed here once sent); a request the
        # socket cannot take now is sent when it is writable (``_watch_server``).
        seq = self.server.spawn_host(jobs_r, results_w)
        self._watch_server()
        os.set_blocking(results_r, False)
        host = Host(seq=seq, jobs_fd=jobs_w, fd=results_r)
        self.pool.add(host)
        self.selector.register(results_r, selectors.EVENT_READ, ("host", host))
        return host

    def _connect_server(self) -> forkserver.ForkServer:
        """The run's shared fork server if there is one and it answers, else our own."""
        if self.server_path:
            try:
                return forkserver.ForkServer.connect(self.server_path)
            except OSError as exc:
                log.warning("could not connect to the shared fork server at %s (%s): "
                            "starting one for this process", self.server_path, exc)
                self.server_path = None
        return forkserver.ForkServer(tls=self.tls)

    def _drop_host(self, host: Host) -> None:
        """Forget ``host`` (dead, killed or leaving); its item, if any, is handled apart."""
        if not self.pool.forget(host):
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(host.fd)
        for fd in (host.fd, host.jobs_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _fork_local(self, job: Job, token: str, started: float, deadline: float) -> None:
        from pytest_llmbench.providers.openai_compat import prepare_fork

        prepare_fork(job.provider)  # the SDK imported once here, not in every child

        def body(write_fd: int) -> None:  # pragma: no cover - runs in the child
            gc.disable()
            child_main(job, write_fd, token, deadline, self.store, self.holder)

        # The child must not run the cyclic GC over the parent's heap: a collection touches
        # every tracked object and copies nearly every page (copy-on-write). Freezing moves
        # the heap out of the collector's reach for the instant of the fork (O(1) both ways).
        gc.freeze()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns when forking a process that has threads (xdist's IO
                # thread): the child only touches its own pipe and sockets, then _exit()s.
                warnings.simplefilter("ignore", DeprecationWarning)
                forked = self.supervisor.fork(body, token)
        finally:
            gc.unfreeze()
        pid, read_fd = forked.pid, forked.fd
        child = Child(job=job, pid=pid, fd=read_fd, token=token, started=started, deadline=deadline)
        try:
            child.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            child.pidfd = None
        self._track(child)

    def _track(self, child: Child) -> None:
        os.set_blocking(child.fd, False)
        self._add_running(child)
        self.selector.register(child.fd, selectors.EVENT_READ, ("pipe", child))
        if child.pidfd is not None:
            self.selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
        else:
            self._polled[child.job.key] = child

    def _add_running(self, child: Child) -> None:
        self.running[child.job.key] = child
        self._pushed += 1
        heapq.heappush(self._deadlines, (child.deadline, self._pushed, child))
        halfway = child.started + child.job.deadlines.task_timeout / 2
        heapq.heappush(self._halfway, (halfway, self._pushed, child))

    def _soonest(self) -> tuple[float, Child] | None:
        """The running item whose deadline comes first (finished items are dropped)."""
        heap = self._deadlines
        while heap:
            deadline, _, child = heap[0]
            if self.running.get(child.job.key) is child:
                return deadline, child
            heapq.heappop(heap)
        return None

    def _overdue(self, now: float) -> list[Child]:
        """The running items past their deadline (and ``KILL_SLACK``)."""
        due = []
        while (soonest := self._soonest()) is not None and now >= soonest[0] + KILL_SLACK:
            heapq.heappop(self._deadlines)
            due.append(soonest[1])
        return due

    def _watch_server(self) -> None:
        """Watch the server's socket for writability exactly while requests wait to go."""
        server = self.server
        if server is None or server.pending == self._server_writing:
            return
        self._server_writing = server.pending
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if server.pending else 0)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(server.fileno(), events, ("server", None))

    def _server_events(self) -> None:
        server = self.server
        assert server is not None
        for event in server.events():
            if event[0] == "forked":
                _, seq, pid = event
                host = self.pool.hosts.get(seq)
                if host is not None:
                    host.pid = pid
                    for child in host.children.values():
                        child.pid = pid
            elif event[0] == "exit":
                _, pid, status = event
                host = next((h for h in self.pool.hosts.values() if h.pid == pid), None)
                if host is not None:
                    self._host_exited(host, status)
            elif event[0] == "gone":  # the server died: from now on items fork from pytest
                log.warning("the fork server exited: items fork from pytest from now on")
                self.selector.unregister(server.fileno())
                server.close()
                self.server, self.use_server = None, False
                for host in list(self.pool.hosts.values()):
                    # Hosts re-parent to us (subreaper); each leaves at the end of its job
                    # pipe, after its current item, whose result still arrives on its pipe.
                    # A host whose pipe closed already (it died with the server: parent-death
                    # signal) was waiting for the exit status the server will never send.
                    if host.ended:
                        self._host_exited(host, None)
                    elif not host.children or not host.pid:
                        self._drop_host(host)
                        proc.reap([host.pid])  # idle: it died with the server, or leaves now
                        for child in host.children.values():
                            if self.running.get(child.job.key) is child:
                                del self.running[child.job.key]
                                self._fork_local(child.job, child.token, child.started,
                                                 child.deadline)
                    else:
                        self.pool.retire(host)

    def _host_output(self, host: Host) -> None:
        """Read what ``host`` sent: its item's events, ``result``, ``idle``; or its end."""
        lines, eof = read_lines(host.fd, host.buffer)
        for line in lines:
            self._host_event(host, line)
        if not eof:
            return
        if self.server is not None and host.pid:
            # Its exit status follows from the fork server: finish the item then.
            host.ended = True
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(host.fd)
        else:
            self._host_exited(host, None)

    def _host_event(self, host: Host, line: bytes) -> None:
        message = _decode(line)
        if message is None:
            return
        kind, data, token = message
        if kind in ("idle", "leave"):
            self._host_ready(host, leave=kind == "leave")
            return
        child = host.children.get(token) if token else host.sole
        if child is None:
            return
        if kind == "refused":  # the host cannot load this job: we fork it ourselves
            log.debug("an item host refused %s (%s): forking it from pytest", child.job.nodeid, data)
            del host.children[child.token]
            if self.running.get(child.job.key) is child:
                del self.running[child.job.key]
                self._fork_local(child.job, child.token, child.started, child.deadline)
            return
        if kind == "thread":
            child.tid = data if isinstance(data, int) else 0
            return
        self._message(child, kind, data)  # decoded once: a result line is the whole record
        if kind == "result" and child.result is not None:
            self._host_item_done(host, child, child.result)
        elif kind == "crash" and token:
            # An item sharing the host failed outside its own code (its thread); the others
            # run on.
            result = crash_result(child, None, self.coord_dir)
            self._put(result)
            self._host_item_done(host, child, result)

    def _host_ready(self, host: Host, *, leave: bool) -> None:
        """``host`` said ``idle`` (room for a job) or ``leave`` (it takes no more)."""
        if leave:
            host.leaving = True
            self.pool.retire(host)
        elif not host.children and self._all_started():
            # No job will come: the host leaves now, beside the run's last items, instead
            # of being killed and reaped in the run's clean-up. (One is forked again if an
            # item needs it after all: a holder elsewhere died.)
            self.pool.retire(host)
        if host.jobs_fd < 0 and not host.children and not host.doomed:
            self._drop_host(host)  # it leaves now (end of its job pipe)
        else:
            self.pool.place(host)

    def _all_started(self) -> bool:
        """The protocol's lookahead has passed the last item: every item is started, done,
        stored or another process's."""
        return self.index is not None and self.scan_pos >= len(self.index)

    def _host_item_done(self, host: Host, child: Child, result: ItemResult) -> None:
        host.children.pop(child.token, None)
        if self.running.get(child.job.key) is child:
            del self.running[child.job.key]
            self.done[child.job.key] = result
            self.stragglers.finished(child, result)  # (errors teach it nothing)
        if host.doomed and not host.children:
            self._kill_doomed(host)

    def _kill_doomed(self, host: Host) -> None:
        """The last item of a host whose other item passed its deadline is done: kill it."""
        self.supervisor.kill(host.doomed, grace=KILL_GRACE)
        host.doomed = []
        self._drop_host(host)

    def _host_exited(self, host: Host, status: int | None) -> None:
        """The host is gone (its pipe closed, or the server reaped it)."""
        if host.seq not in self.pool.hosts:
            return
        for line in read_lines(host.fd, host.buffer)[0]:
            self._host_event(host, line)
        self._drop_host(host)
        if self.server is None and host.pid:  # re-parented to us when the server died
            status = proc.reap([host.pid]).get(host.pid, status)
        for child in list(host.children.values()):
            if self.running.get(child.job.key) is child:
                del self.running[child.job.key]
                self.supervisor.ended(child)
                result = crash_result(child, status, self.coord_dir)
                self._put(result)
                self.done[child.job.key] = result
        host.children.clear()

    def _next_timeout(self) -> float:
        first = self._soonest()
        if first is None:
            return POLL_ELSEWHERE
        soonest = first[0] + KILL_SLACK
        # The next item to turn straggler frees a slot then: wake up to fill it.
        soonest = min(soonest, self.stragglers.next_change(self.running, self.concurrency))
        timeout = max(0.0, soonest - time.monotonic())
        if self._polled:
            timeout = min(timeout, 0.02)
        if self.run_slots is not None and self.free_slots() <= 0:
            # Slots other workers free wake nobody here: look again soon.
            timeout = min(timeout, RUN_SLOTS_POLL)
        return min(timeout, 1.0)

    def _service(self, timeout: float) -> None:
        """Wait for child output/exit or the next deadline, then handle what happened."""
        if self.running:
            events = self.selector.select(timeout)
        else:
            events = []
            time.sleep(timeout)
        for skey, mask in events:
            kind, child = skey.data
            if kind == "pipe":
                self._read(child)
            elif kind == "host":
                self._host_output(child)
            elif kind == "server":
                if mask & selectors.EVENT_WRITE and self.server is not None:
                    self.server.flush()
                    self._watch_server()
                if mask & selectors.EVENT_READ and self.server is not None:
                    self._server_events()
            elif kind == "wake":
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 64)
            else:
                self._finish(child)
        now = time.monotonic()
        if self.tick is not None and now >= self._next_tick:
            self._next_tick = now + TICK_INTERVAL
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a monitor failure must not stop the run
                log.exception("lease monitor tick failed")
        self._warn_half_deadline(now)
        for child in list(self._polled.values()):
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                self._finish(child, status)
        overdue = self._overdue(now)
        if overdue:
            self._kill(overdue)
        if self.run_slots is not None:
            self.free_slots()  # publish what finished, for the other workers

    def _warn_half_deadline(self, now: float) -> None:
        """One WARNING per item that passes half of its task deadline: the log names a
        stuck item long before its kill (the wait loop wakes at least once a second). A
        heap, not a scan: at 1000 in flight the scan was 0.2 s of the run's CPU."""
        heap = self._halfway
        while heap:
            when, _, child = heap[0]
            if self.running.get(child.job.key) is not child or child.warned_half:
                # Done: dropped as soon as it surfaces, not at its halfway time. Kept until
                # then (300 s with the default deadline), each entry held its item's job,
                # result and decoded events: a fresh run of 100,000 items peaked at 1.95 GB.
                heapq.heappop(heap)
                continue
            if when > now:
                break
            heapq.heappop(heap)
            child.warned_half = True
            log.warning("%s: still running after %.1f s, half of its task deadline of %g s",
                        child.job.nodeid, now - child.started, child.job.deadlines.task_timeout)

    def in_flight(self) -> list[tuple[str, float]]:
        """``(nodeid, unix start time)`` of every item running now (for live progress; safe
        to call from another thread: a snapshot, and a change while it is taken gives [])."""
        offset = time.time() - time.monotonic()
        try:
            return [(c.job.nodeid, c.started + offset) for c in list(self.running.values())]
        except RuntimeError:  # the dict changed size while copied
            return []

    def _read(self, child: Child) -> None:
        lines, eof = read_lines(child.fd, child.buffer)
        for line in lines:
            self._event(child, line)
        if eof:  # stop watching the pipe; the exit event finishes the item
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.fd)

    def _event(self, child: Child, line: bytes) -> None:
        message = _decode(line)
        if message is not None:
            self._message(child, message[0], message[1])

    def _message(self, child: Child, kind: str, data: Any) -> None:
        """One decoded event of ``child``'s item (see ``child.py``'s ``send``)."""
        if kind == "attempt":
            child.attempts.append(data)
        elif kind == "completion":
            child.completions.append(data)
        elif kind == "turn":
            child.turn = int(data["turn"])
        elif kind == "transcript":
            child.transcript.append(data)
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
        self.supervisor.ended(child)  # anything the item left behind goes with it
        result = child.result
        if result is None:
            result = crash_result(child, status, self.coord_dir)
            self._put(result)
        else:
            self.stragglers.finished(child, result)
        self.done[child.job.key] = result

    def _kill(self, children: list[Child]) -> None:
        """Task deadline: kill these items' whole process trees (in one pass: items that
        started together often time out together) and record what each had done."""
        due = []
        for child in children:
            if child.host is not None:
                self._host_output(child.host)
                if self.running.get(child.job.key) is not child:  # finished in the last moment
                    continue
            else:
                self._read(child)
                if child.result is not None:  # it finished in the very last moment
                    self._finish(child)
                    continue
            log.warning(
                "[TaskTimeout] %s: killed after %.1f s (task_timeout %.1f s, turn %d, %d attempts)",
                child.job.nodeid, time.monotonic() - child.started, child.job.deadlines.task_timeout,
                child.turn, len(child.attempts),
            )
            due.append(child)
        if not due:
            return
        now = []
        for child in due:
            host = child.host
            if host is not None:
                host.children.pop(child.token, None)
                if host.children:
                    # Items share the host and run on: it dies once they are done, and
                    # meanwhile takes no more.
                    host.doomed.append(child)
                    self.pool.place(host)
                    continue
                now.extend(host.doomed)
                host.doomed = []
            now.append(child)
        if now:
            self.supervisor.kill(now, grace=KILL_GRACE)
        for child in now:
            if child.host is not None:
                self._drop_host(child.host)  # the fork server reaps it and kills its cgroup
        for child in due:
            self._close(child)  # whatever it sent after the deadline does not count
            self._timed_out(child)

    def _timed_out(self, child: Child) -> None:
        result = timeout_result(child)
        self._put(result)
        self.done[child.job.key] = result

    def _put(self, result: ItemResult) -> None:
        try:
            self.store.put(result)
        except OSError as exc:
            log.error("could not store the result of %s: %s", result.identity.get("nodeid"), exc)

    def _close(self, child: Child) -> None:
        self.running.pop(child.job.key, None)
        if self._polled.get(child.job.key) is child:
            del self._polled[child.job.key]
        if child.host is not None:  # the host's pipes are the host's
            return
        for fd in (child.fd, child.pidfd):
            if fd is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
            os.close(fd)

    def drain(self) -> None:
        """Let every running child finish (each is bounded by its task deadline).

        Lookahead claims items of other xdist workers; one still running when this worker's
        session ends belongs to a worker waiting for its stored result. Killing it would throw
        away its API call and release the claim, and the owner would run the item again."""
        while self.running:
            self._service(self._next_timeout())

    def shutdown(self, *, wait: bool = True) -> forkserver.ForkServer | None:
        """Kill every running child (interrupted run); their claims die with this process.
        ``wait=False``: the fork server is told to end but not waited for; it is returned,
        for its ``wait_closed`` later (its hosts' exit then overlaps the caller's last
        writes)."""
        closing = None
        self._take_over()
        running = list(self.running.values())
        self.supervisor.kill(running, grace=0.2)
        for child in running:
            self._close(child)
            with contextlib.suppress(OSError):
                self.store.release(child.job.key, self.holder)
        for host in list(self.pool.hosts.values()):
            self._drop_host(host)  # an idle host leaves at the end of its job pipe
        if self.server is not None:
            self.server.close(wait=wait)
            closing = None if wait else self.server
            self.server = None
        if self.run_slots is not None:
            self.run_slots.close()
            self.run_slots = None
        self.supervisor.close()
        self.selector.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1  # a second shutdown closes nothing reused since
        return closing

