"""Named resource pools shared by every process of a run and by concurrent runs.

A pool ``name`` of ``n`` slots lives in ``<root>/leases/<name>/``: slot ``i`` is held by
whoever holds an exclusive ``flock`` on ``<i>.lock``. State is only in the file system and the
kernel, never in memory, so xdist workers, forked item children and a second ``pytest`` on the
same machine all see the same pool, and a holder killed with ``kill -9`` releases its slot at
once (the kernel drops the lock with the holder's last file descriptor).

Next to each lock, ``<i>.json`` (written by temp file + rename, removed before unlocking on a
clean release) says who holds the slot: pid, process start time (guards pid reuse), host,
``acquired_at`` (unix time), ``max_occupation``, label and the item token. So:

* a free lock with a sidecar left behind means the holder never released cleanly (it died):
  the next acquirer or :meth:`LeasePool.monitor_tick` logs ``[ForcedRelease] ... reason=dead``;
* a held lock whose live holder is past its ``max_occupation`` (DESIGN.md's lease layer,
  900 s by default) is reclaimed, in every mode (plain run or xdist), by whichever comes
  first: the holder's own *guard* (a timer thread started with the lease) or a monitor in
  another process (the engine's tick, a waiting acquirer). ``[ResourceTimeout]`` and
  ``[ForcedRelease] ... reason=over_time`` are logged, and a record is left for
  :func:`find_reclaim` so the engine reports the item as ``lease_timeout``, not ``crashed``.
  What is killed is the holding *item*, never a pytest process:

  - held in an item process (suite items: the code judge's ``sandbox`` pool): the item's
    process tree (its guard kills its own process group; a monitor kills the holder's
    tree by pid and token; the item's cgroup goes with its host);
  - held by a plain test (the ``llm_lease`` fixture) in a pytest process or xdist worker:
    the holder is marked ``in_process`` and is never signalled from outside; its guard
    releases the slot and interrupts the test (a signal to the main thread raises
    :class:`LeaseExpired` there, as pytest-timeout's ``signal`` method does). The
    subprocesses such a test started are its own to end (``with Popen(...)`` does).

Limits, by design:

* A holder that is the monitoring process itself or one of its ancestors is never killed
  (that would kill the run, or the monitor's own siblings); it is logged once as over time
  and left holding.
* Holders on another host (a shared file system) are never judged: liveness and signals are
  local. ``flock`` on NFS is unreliable anyway; pools belong on a local disk.
* ``flock`` locks belong to the *open file description*: a process forked while holding a
  lease shares it, and the slot stays held until both have closed the descriptor. The lock
  fd is ``O_CLOEXEC`` (an ``exec``'d program never inherits it), and :meth:`Lease.release`
  in a forked copy only closes its descriptor, leaving the owner's lease intact.
* The slot count is per run: runs that share a pool name should declare the same size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import re
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.coord.atomic import atomic_write
from pytest_llmbench.coord.identity import ProcessIdentity
from pytest_llmbench.errors import LeaseExpired, LeaseTimeout

log = logging.getLogger("pytest_llmbench.coord.lease")

DEFAULT_MAX_OCCUPATION = 900.0
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_POLL = (0.02, 0.05)  # jittered sleep between acquisition rounds (seconds)
_CHECK_INTERVAL = 0.5  # how often a waiting acquirer looks for over-time holders
_RECLAIMED_DIR = ".reclaimed"
#: Seconds past its limit before an item process's own guard kills it (see ``_Guard``).
GUARD_SLACK = 1.0
#: The signal a plain test's lease guard sends its main thread (a real-time signal: not one
#: that pytest-timeout (SIGALRM) or a test is likely to use).
_INTERRUPT = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2


def default_state_dir() -> Path:
    """Where pools that are not the run's own live (the code judge's ``sandbox`` pool):
    ``LLMBENCH_STATE_DIR``, or a directory per user in the temp dir."""
    env = os.environ.get("LLMBENCH_STATE_DIR")
    if env:
        return Path(env)
    import tempfile

    return Path(tempfile.gettempdir()) / f"pytest-llmbench-{os.getuid()}"


@dataclass(frozen=True, kw_only=True)
class Holder(ProcessIdentity):
    """A slot's sidecar: who holds it (``coord.identity``) since when, for how long it may."""

    acquired_at: float
    """Unix time of acquisition (comparable across processes)."""
    max_occupation: float
    label: str = ""
    token: str | None = None
    """The holder's ``LLMBENCH_ITEM_TOKEN``: lets a reclaim kill the whole item."""
    in_process: bool = False
    """Held by a pytest process for a plain test: never signalled by another process (that
    would kill a worker); its own guard interrupts the test at the limit."""

    def held(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.acquired_at)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Holder:
        token = data.get("token")
        return cls(
            **ProcessIdentity.fields_from(data),
            acquired_at=float(data["acquired_at"]),
            max_occupation=float(data["max_occupation"]),
            label=str(data.get("label", "")),
            token=None if token is None else str(token),
            in_process=bool(data.get("in_process", False)),
        )


@dataclass(frozen=True, kw_only=True)
class ReclaimEvent:
    """A slot taken back from a holder that died or held it past its limit."""

    resource: str
    slot: int
    holder: int
    held: float
    reason: str
    """``"dead"`` (lock found free, sidecar left behind) or ``"over_time"`` (holder killed)."""
    limit: float
    label: str = ""
    token: str | None = None
    killed: tuple[int, ...] = ()
    """Pids signalled to free the slot (``over_time`` only)."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["killed"] = list(self.killed)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReclaimEvent:
        fields = dict(data)
        fields["killed"] = tuple(int(p) for p in fields.get("killed", ()))
        return cls(**fields)


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic replace: readers see the old file or the new one, never a torn one."""
    atomic_write(path, json.dumps(data).encode("utf-8"))


def _reclaim_key(token: str | None, pid: int | None, start_time: int | None) -> str | None:
    if token and _NAME.match(token):
        return f"t-{token}"
    if pid is not None:
        return f"p-{pid}-{start_time}"
    return None


def record_reclaim(
    root: Path | str, event: ReclaimEvent, *, pid: int | None = None, start_time: int | None = None
) -> None:
    """Leave ``event`` where :func:`find_reclaim` finds it (by token, else pid + start time),
    so the engine that ran the killed item reports ``lease_timeout``, not ``crashed``."""
    key = _reclaim_key(event.token, pid, start_time)
    if key is None:
        return
    folder = Path(root) / "leases" / _RECLAIMED_DIR
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / f"{key}.json", event.to_dict())
    except OSError as exc:  # the reclaim itself succeeded; only the record is lost
        log.warning("could not record reclaim of %s[%d]: %s", event.resource, event.slot, exc)


def find_reclaim(
    root: Path | str,
    *,
    token: str | None = None,
    pid: int | None = None,
    start_time: int | None = None,
) -> ReclaimEvent | None:
    """The over-time reclaim that killed the holder with this token (or pid + start time).

    The engine asks this when an item's process died by a signal it did not send, to report
    ``lease_timeout`` instead of ``crashed``.
    """
    keys = [_reclaim_key(token, None, None), _reclaim_key(None, pid, start_time)]
    for key in filter(None, keys):
        path = Path(root) / "leases" / _RECLAIMED_DIR / f"{key}.json"
        try:
            return ReclaimEvent.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


class Lease:
    """One held slot. Release it (or leave the ``with`` block) when done with the resource."""

    def __init__(self, pool: LeasePool, slot: int, fd: int, holder: Holder) -> None:
        self.pool = pool
        self.slot = slot
        self.holder = holder
        self._fd: int | None = fd
        self._owner = os.getpid()
        self._t0 = time.monotonic()
        self.expired: ReclaimEvent | None = None
        """Set when the guard reclaimed this lease."""
        self._guard: _Guard | None = None
        self._swap = threading.Lock()
        self._guard = _Guard.start(self)

    @property
    def acquired_at(self) -> float:
        """Unix time of acquisition."""
        return self.holder.acquired_at

    @property
    def label(self) -> str:
        return self.holder.label

    @property
    def released(self) -> bool:
        return self._fd is None

    def held_for(self) -> float:
        """Seconds since acquisition (monotonic clock)."""
        return time.monotonic() - self._t0

    def release(self) -> None:
        """Free the slot (idempotent). Sidecar first, lock second: see the module docstring."""
        with self._swap:  # the guard's thread may be reclaiming it at this very moment
            fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if os.getpid() == self._owner:
                if self._guard is not None:
                    self._guard.stop()
                self.pool._remove_sidecar(self.slot, self.holder)
                fcntl.flock(fd, fcntl.LOCK_UN)
            # in a forked copy, unlocking would free the owner's lease: only close ours
        finally:
            os.close(fd)

    def _expire(self) -> None:
        """The guard's timer fired: reclaim this lease from its own holder."""
        with self._swap:
            fd, self._fd = self._fd, None
        if fd is None:  # released meanwhile
            return
        holder, held = self.holder, self.held_for()
        log.warning(
            "[ResourceTimeout] resource=%s slot=%d holder=%d held=%.1fs limit=%gs%s",
            self.pool.name, self.slot, holder.pid, held, holder.max_occupation,
            f" label={holder.label}" if holder.label else "",
        )
        self.expired = ReclaimEvent(
            resource=self.pool.name, slot=self.slot, holder=holder.pid, held=held,
            reason="over_time", limit=holder.max_occupation, label=holder.label,
            token=holder.token, killed=() if holder.in_process else (os.getpid(),),
        )
        record_reclaim(self.pool.root, self.expired, pid=holder.pid, start_time=holder.start_time)
        self.pool._remove_sidecar(self.slot, holder)
        self.pool._unlock(fd)
        log.warning(
            "[ForcedRelease] resource=%s slot=%d holder=%d held=%.1fs reason=over_time",
            self.pool.name, self.slot, holder.pid, held,
        )
        if not holder.in_process:
            # An item process: the item goes, its whole group with it; the engine finds the
            # record above and reports ``lease_timeout`` (its host's cgroup is killed too).
            with contextlib.suppress(OSError):
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        if self._guard is not None:
            self._guard.interrupt()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # A forgotten lease must not pin the slot until the process exits.
        # (The guard's timer holds only a weak reference: a forgotten lease is collected.)
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"held {self.held_for():.1f}s"
        return f"<Lease {self.pool.name}[{self.slot}] {state}>"


class _Guard:
    """A lease's own enforcement of its maximum: a timer thread in the holding process.

    For a plain test (``in_process``), acquired on the main thread, a signal handler is
    installed for the lease's lifetime: at the limit the timer releases the slot and sends
    the main thread a signal whose handler raises :class:`LeaseExpired`, which ends the
    test (also out of a blocking ``sleep`` or ``read``). In an item process (it carries the
    item token and leads its process group) the timer fires ``GUARD_SLACK`` later, leaving
    the first move to monitors in other processes (a thread cannot run while the item holds
    the GIL in C code; a monitor's signal always lands), and then kills the item."""

    @classmethod
    def start(cls, lease: Lease) -> _Guard | None:
        holder = lease.holder
        if holder.in_process:
            return cls(lease, 0.0)
        if (holder.token and holder.token == os.environ.get(proc.TOKEN_ENV)
                and os.getpgrp() == os.getpid()):
            return cls(lease, GUARD_SLACK)
        return None  # a process of no item (a script, a test of this module): monitors only

    def __init__(self, lease: Lease, slack: float) -> None:
        import weakref

        self.handler_installed = False
        self.previous: Any = None
        self.target = threading.get_ident()
        holder = lease.holder
        if holder.in_process and threading.current_thread() is threading.main_thread():
            ref = weakref.ref(lease)

            def raise_expired(_signum: int, _frame: object) -> None:
                __tracebackhide__ = True  # noqa: F841 - read by pytest
                found = ref()
                event = found.expired if found is not None else None
                if event is not None:
                    raise LeaseExpired(event.resource, event.slot, event.held, event.limit)

            self.previous = signal.signal(_INTERRUPT, raise_expired)
            self.handler_installed = True
        delay = max(0.0, holder.max_occupation - holder.held()) + slack
        lease_ref = weakref.ref(lease)

        def fire() -> None:
            found = lease_ref()
            if found is not None:
                found._expire()

        self.timer = threading.Timer(delay, fire)
        self.timer.daemon = True
        self.timer.name = f"llmbench-lease-guard-{lease.pool.name}-{lease.slot}"
        self.timer.start()

    def interrupt(self) -> None:
        if self.handler_installed:
            signal.pthread_kill(self.target, _INTERRUPT)
        else:
            log.warning("lease reclaimed from a thread that is not the main thread: the test"
                        " holding it is not interrupted")

    def stop(self) -> None:
        """The lease is released: no timer left behind (an item host counts its threads)."""
        self.timer.cancel()
        if self.timer is not threading.current_thread():
            self.timer.join()
        if self.handler_installed and threading.current_thread() is threading.main_thread():
            signal.signal(_INTERRUPT, self.previous)
            self.handler_installed = False


class LeasePool:
    """``slots`` interchangeable units of the resource ``name``, shared through ``root``."""

    def __init__(
        self,
        root: Path | str,
        name: str,
        slots: int,
        *,
        max_occupation: float = DEFAULT_MAX_OCCUPATION,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"resource pool name {name!r} must match [A-Za-z0-9_.-]+")
        if slots < 1:
            raise ValueError(f"resource pool {name!r} needs at least 1 slot, got {slots}")
        if not max_occupation > 0:
            raise ValueError(f"max_occupation of {name!r} must be > 0, got {max_occupation}")
        self.root = Path(root)
        self.name = name
        self.slots = slots
        self.max_occupation = float(max_occupation)
        self.dir = self.root / "leases" / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._noted_self: set[tuple[int, float]] = set()

    def __repr__(self) -> str:
        return (
            f"LeasePool({self.name!r}, slots={self.slots}, max_occupation={self.max_occupation:g})"
        )

    # --- files -------------------------------------------------------------------------

    def lock_path(self, slot: int) -> Path:
        return self.dir / f"{slot}.lock"

    def sidecar_path(self, slot: int) -> Path:
        return self.dir / f"{slot}.json"

    def _try_lock(self, slot: int) -> int | None:
        """An fd holding slot's exclusive flock, or None if someone else holds it."""
        fd = os.open(self.lock_path(slot), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def read_holder(self, slot: int) -> Holder | None:
        """The slot's sidecar, or None if absent or unreadable (mid-rename counts as absent)."""
        try:
            return Holder.from_dict(json.loads(self.sidecar_path(slot).read_text("utf-8")))
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def _remove_sidecar(self, slot: int, holder: Holder) -> None:
        current = self.read_holder(slot)
        if current is None or (current.pid, current.acquired_at) == (
            holder.pid,
            holder.acquired_at,
        ):
            with contextlib.suppress(FileNotFoundError):
                self.sidecar_path(slot).unlink()

    # --- acquisition -------------------------------------------------------------------

    def acquire(
        self, timeout: float | None = None, *, label: str = "", in_process: bool = False
    ) -> Lease:
        """Take a free slot, waiting up to ``timeout`` seconds (None: forever).

        ``in_process``: the caller is a pytest process holding the lease for a plain test
        (never to be killed from outside; see the module docstring).

        Every slot is tried without blocking, then again every 20-50 ms (jittered so that
        waiters in many processes do not poll in step). While waiting, over-time holders are
        reclaimed every 0.5 s. Raises :class:`LeaseTimeout` after logging the holders.
        """
        start = time.monotonic()
        deadline = None if timeout is None else start + max(0.0, timeout)
        next_check = start
        while True:
            for slot in range(self.slots):
                fd = self._try_lock(slot)
                if fd is not None:
                    return self._take(slot, fd, label, in_process)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + _CHECK_INTERVAL
                if self._reclaim_over_time():
                    continue
            if deadline is not None and now >= deadline:
                break
            pause = random.uniform(*_POLL)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - now)))
        holders = " ".join(f"{h.pid}:{h.held():.1f}s" for _, h in self.holders() if h)
        log.warning(
            "[ResourceTimeout] resource=%s waited=%.1fs holders=[%s]",
            self.name,
            time.monotonic() - start,
            holders,
        )
        raise LeaseTimeout(self.name, float(timeout if timeout is not None else 0.0))

    def _take(self, slot: int, fd: int, label: str, in_process: bool = False) -> Lease:
        try:
            stale = self.read_holder(slot)
            if stale is not None:
                self._report_stale(slot, stale)
            me = ProcessIdentity.of()
            holder = Holder(
                pid=me.pid,
                start_time=me.start_time,
                host=me.host,
                acquired_at=time.time(),
                max_occupation=self.max_occupation,
                label=label,
                token=os.environ.get(proc.TOKEN_ENV) or None,
                in_process=in_process,
            )
            _write_json(self.sidecar_path(slot), asdict(holder))
        except BaseException:
            self._unlock(fd)
            raise
        return Lease(self, slot, fd, holder)

    def holders(self) -> list[tuple[int, Holder | None]]:
        """``(slot, sidecar)`` for every slot whose lock is held right now."""
        out: list[tuple[int, Holder | None]] = []
        for slot in range(self.slots):
            fd = self._try_lock(slot)
            if fd is None:
                out.append((slot, self.read_holder(slot)))
            else:
                self._unlock(fd)
        return out

    # --- reclaim -----------------------------------------------------------------------

    def monitor_tick(self) -> list[ReclaimEvent]:
        """Reclaim slots of dead holders and of live holders past their ``max_occupation``.

        Cheap when all is well: one sidecar read per slot, and a lock attempt only for
        slots that have a sidecar. May block for the kill grace (~0.5 s) per killed holder.
        """
        events: list[ReclaimEvent] = []
        for slot in range(self.slots):
            holder = self.read_holder(slot)
            if holder is None and not self.sidecar_path(slot).exists():
                continue
            fd = self._try_lock(slot)
            if fd is not None:  # free, yet a sidecar remains: its holder never released
                try:
                    stale = self.read_holder(slot)
                    if stale is not None:
                        events.append(self._report_stale(slot, stale))
                    with contextlib.suppress(FileNotFoundError):
                        self.sidecar_path(slot).unlink()
                finally:
                    self._unlock(fd)
            elif holder is not None:
                event = self._check_over_time(slot, holder)
                if event is not None:
                    events.append(event)
        return events

    def _reclaim_over_time(self) -> bool:
        reclaimed = False
        for slot in range(self.slots):
            holder = self.read_holder(slot)
            if holder is not None and self._check_over_time(slot, holder) is not None:
                reclaimed = True
        return reclaimed

    def _report_stale(self, slot: int, holder: Holder) -> ReclaimEvent:
        local = holder.is_local()
        dead = not local or not holder.is_alive()
        # alive but not holding: it closed the lock fd without release() (or lost it)
        reason = "dead" if dead else "abandoned"
        held = holder.held()
        log.warning(
            "[ForcedRelease] resource=%s slot=%d holder=%d held=%.1fs reason=%s%s",
            self.name,
            slot,
            holder.pid,
            held,
            reason,
            f" label={holder.label}" if holder.label else "",
        )
        return ReclaimEvent(
            resource=self.name,
            slot=slot,
            holder=holder.pid,
            held=held,
            reason=reason,
            limit=holder.max_occupation,
            label=holder.label,
            token=holder.token,
        )

    def _check_over_time(self, slot: int, holder: Holder) -> ReclaimEvent | None:
        held = holder.held()
        if held <= holder.max_occupation or not holder.is_local():
            return None
        if not holder.is_alive():
            return None  # just died (or the sidecar is being replaced): a later pass cleans it
        fd = self._try_lock(slot)
        if fd is not None:  # released meanwhile: nothing over time here
            self._unlock(fd)
            return None
        if self.read_holder(slot) != holder:
            return None  # the slot changed hands since ``holder`` was read
        if holder.in_process or holder.pid == os.getpid() or holder.pid in proc.ancestors():
            key = (slot, holder.acquired_at)
            if key not in self._noted_self:
                self._noted_self.add(key)
                log.warning(
                    "[ResourceTimeout] resource=%s slot=%d holder=%d held=%.1fs limit=%gs "
                    "(a pytest process, this one or its ancestor: not killed; the holder's"
                    " own guard reclaims it)",
                    self.name,
                    slot,
                    holder.pid,
                    held,
                    holder.max_occupation,
                )
            return None
        log.warning(
            "[ResourceTimeout] resource=%s slot=%d holder=%d held=%.1fs limit=%gs%s",
            self.name,
            slot,
            holder.pid,
            held,
            holder.max_occupation,
            f" label={holder.label}" if holder.label else "",
        )
        event = ReclaimEvent(
            resource=self.name,
            slot=slot,
            holder=holder.pid,
            held=held,
            reason="over_time",
            limit=holder.max_occupation,
            label=holder.label,
            token=holder.token,
        )
        # Recorded before the kill: the engine that sees its item die looks for this record at
        # once, and would report ``crashed`` instead of ``lease_timeout`` if it came later.
        self._record_reclaim(event, holder)
        # Our own token would make kill_tree take our whole item down with the holder.
        token = holder.token if holder.token != os.environ.get(proc.TOKEN_ENV) else None
        killed = proc.kill_tree(holder.pid, start_time=holder.start_time, token=token)
        fd = self._try_lock(slot)
        if fd is None:
            # A survivor shares the lock's file description (forked while holding).
            log.warning(
                "[ResourceTimeout] resource=%s slot=%d still locked after killing holder %d",
                self.name,
                slot,
                holder.pid,
            )
        else:
            try:
                self._remove_sidecar(slot, holder)
            finally:
                self._unlock(fd)
        log.warning(
            "[ForcedRelease] resource=%s slot=%d holder=%d held=%.1fs reason=over_time",
            self.name,
            slot,
            holder.pid,
            held,
        )
        event = replace(event, killed=tuple(killed))
        self._record_reclaim(event, holder)
        return event

    def _record_reclaim(self, event: ReclaimEvent, holder: Holder) -> None:
        record_reclaim(self.root, event, pid=holder.pid, start_time=holder.start_time)


class LeaseManager:
    """The run's pools by name (``[tool.llmbench.resources] sandbox = 4``)."""

    def __init__(
        self,
        root: Path | str,
        pools: Mapping[str, int],
        max_occupation: float = DEFAULT_MAX_OCCUPATION,
    ) -> None:
        self.root = Path(root)
        self.max_occupation = float(max_occupation)
        self._pools = {
            name: LeasePool(root, name, slots, max_occupation=max_occupation)
            for name, slots in pools.items()
        }

    @property
    def names(self) -> list[str]:
        return sorted(self._pools)

    def pool(self, name: str) -> LeasePool:
        try:
            return self._pools[name]
        except KeyError:
            known = ", ".join(self.names) or "none declared"
            raise KeyError(f"unknown resource pool {name!r} (known: {known})") from None

    def acquire(
        self, name: str, timeout: float | None = None, *, label: str = "", in_process: bool = False
    ) -> Lease:
        return self.pool(name).acquire(timeout, label=label, in_process=in_process)

    def monitor_tick(self) -> list[ReclaimEvent]:
        """Reclaim over-time and dead holders of the run's pools and of the pools items use
        on their own (the code judge's ``sandbox`` pool in :func:`default_state_dir`)."""
        events: list[ReclaimEvent] = []
        for pool in [*self._pools.values(), *self._found_pools()]:
            events.extend(pool.monitor_tick())
        return events

    def _found_pools(self) -> list[LeasePool]:
        """Pools under :func:`default_state_dir`, sized by their lock files (a few ``stat``
        calls a second; re-read so that a pool made after the run started is seen)."""
        root = default_state_dir()
        if root == self.root:
            return []
        found: list[LeasePool] = []
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / "leases"):
                if not entry.is_dir() or not _NAME.match(entry.name):
                    continue
                slots = sum(1 for f in os.scandir(entry.path) if f.name.endswith(".lock"))
                if slots:
                    found.append(LeasePool(root, entry.name, slots,
                                           max_occupation=self.max_occupation))
        return found
