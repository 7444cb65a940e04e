"""Process-tree control for killable items (Linux only).

The engine forks one child per item. The child makes itself a process-group leader and calls
:func:`tag_process` with a random token, so every process the item starts can be found again
on its deadline, by one of three marks:

* **group**: members of the item's process group (``killpg``), the common case;
* **tree**: descendants through ``/proc/*/stat`` parent links, which survive ``setsid``;
* **token**: ``LLMBENCH_ITEM_TOKEN=<token>`` in ``/proc/PID/environ`` (programs the item
  *exec*'d, even after ``setsid`` and a double fork) or the process name ``lb-<token[:12]>``
  set by :func:`tag_process` (processes the item only *forked*: ``/proc/PID/environ`` shows
  the environment a process was exec'd with, so a token put into ``os.environ`` after the
  engine's fork is invisible there until the next ``exec``).

A process that escapes all three (``setsid`` + double fork + ``exec`` with an explicit
environment lacking the token) cannot be found without cgroups; that is the documented limit.

:func:`kill_tree` sends SIGTERM (and SIGCONT, so stopped processes can act on it), waits a
short grace, then SIGKILLs whatever carries a mark, re-scanning until two consecutive scans
find nothing alive (a fork bomb is caught because each round kills every process seen and a
dead process cannot fork). It never signals the caller, its ancestors, pid 1, or the process
groups they belong to, and never passes 0 or a negative number to ``kill``/``killpg``.
Signals go through a pidfd opened *after* checking the process start time, so a recycled pid
(``pid_max`` can be as low as 32768) is never hit by mistake.

The common path (the item exited normally) needs none of this: :func:`group_exists` is one
``killpg(pgid, 0)`` syscall to decide whether anything was left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("pytest_llmbench.coord.proc")

TOKEN_ENV = "LLMBENCH_ITEM_TOKEN"
"""Environment variable carrying an item's token to every exec'd descendant."""

_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_COMM_PREFIX = "lb-"
_COMM_TOKEN_CHARS = 12  # comm holds 15 bytes: "lb-" + 12 token characters
_MIN_COMM_TOKEN = 8  # shorter tokens are matched through the environment only
_KILL_BUDGET = 2.0  # seconds of SIGKILL rounds before giving up on survivors (D state)
_POLL_MAX = 0.02  # longest sleep between liveness polls


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """The fields of ``/proc/PID/stat`` this module needs."""

    pid: int
    ppid: int
    pgrp: int
    sid: int
    state: str
    start_time: int
    """Clock ticks after boot (field 22): with the pid, identifies a process for good."""
    comm: str
    cpu_ticks: int = 0
    """User + system CPU time in clock ticks (fields 14 and 15), its children apart."""

    @property
    def alive(self) -> bool:
        """Running or sleeping: not a zombie (``Z``) or dead (``X``) entry awaiting reaping.

        A thread-group leader whose main thread exited shows ``Z`` while its other threads
        still run: that process is alive (and must be killed with the rest)."""
        if self.state in ("X", "x"):
            return False
        return self.state != "Z" or _has_live_threads(self.pid)


def _has_live_threads(pid: int) -> bool:
    """Whether a zombie-looking leader still has threads running (``/proc/PID/task``)."""
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _parse_stat(pid: int, data: bytes) -> ProcInfo | None:
    # comm may contain spaces and parentheses: it ends at the *last* ')'.
    left, right = data.find(b"("), data.rfind(b")")
    if left < 0 or right < left:
        return None
    rest = data[right + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(rest[1]),
            pgrp=int(rest[2]),
            sid=int(rest[3]),
            state=rest[0].decode("ascii", "replace"),
            start_time=int(rest[19]),
            comm=data[left + 1 : right].decode("utf-8", "replace"),
            cpu_ticks=int(rest[11]) + int(rest[12]),
        )
    except (IndexError, ValueError):
        return None


def read_stat(pid: int, tid: int = 0) -> ProcInfo | None:
    """``/proc/PID/stat`` parsed, or None when the process is gone (or pid is invalid);
    with ``tid``, that thread's own (``/proc/PID/task/TID/stat``: CPU time of the thread)."""
    if pid <= 0:
        return None
    path = f"/proc/{pid}/task/{tid}/stat" if tid > 0 else f"/proc/{pid}/stat"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # one line, well under 1 KiB: a single read suffices
    except OSError:
        return None
    finally:
        os.close(fd)
    return _parse_stat(pid, data)


def scan() -> dict[int, ProcInfo]:
    """One pass over ``/proc``: every visible process (thread-group leaders only)."""
    procs: dict[int, ProcInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return procs
    for name in names:
        if name.isdigit():
            info = read_stat(int(name))
            if info is not None:
                procs[info.pid] = info
    return procs


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks after boot (stat field 22); None if gone."""
    info = read_stat(pid)
    return None if info is None else info.start_time


def pid_alive(pid: int, start_time: int | None = None) -> bool:
    """True if ``pid`` exists, is not a zombie, and (if given) started at ``start_time``.

    The start time guards against pid reuse: a holder recorded as ``(pid, start_time)`` that
    died is never confused with a new process that got the same pid.
    """
    info = read_stat(pid)
    if info is None or not info.alive:
        return False
    return start_time is None or info.start_time == start_time


def ancestors(pid: int | None = None) -> list[int]:
    """Parent chain of ``pid`` (default: the caller), nearest first, ending before pid 0."""
    chain: list[int] = []
    info = read_stat(os.getpid() if pid is None else pid)
    while info is not None and info.ppid > 0 and info.ppid not in chain:
        chain.append(info.ppid)
        info = read_stat(info.ppid)
    return chain


def _children_map(procs: Mapping[int, ProcInfo]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    return children


def _subtree(roots: Iterable[int], children: Mapping[int, list[int]]) -> set[int]:
    """``roots`` and all their descendants."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(children.get(pid, ()))
    return seen


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` in the parent tree (one ``/proc`` scan), ``pid`` excluded.

    Processes whose parent died were re-parented (to init or a subreaper) and are no longer
    found here; :func:`pids_with_token` finds those.
    """
    procs = scan()
    found = _subtree([pid], _children_map(procs))
    found.discard(pid)
    return sorted(found)


def comm_tag(token: str) -> str:
    """The process name :func:`tag_process` gives an item process (15 bytes at most)."""
    return _COMM_PREFIX + token[:_COMM_TOKEN_CHARS]


def _token_matcher(token: str) -> tuple[bytes, str | None]:
    needle = b"\0" + f"{TOKEN_ENV}={token}".encode() + b"\0"
    comm = comm_tag(token) if len(token) >= _MIN_COMM_TOKEN else None
    return needle, comm


def _has_token(info: ProcInfo, needle: bytes, comm: str | None) -> bool:
    if comm is not None and info.comm == comm:
        return True
    chunks = [b"\0"]
    try:
        fd = os.open(f"/proc/{info.pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # permission denied, vanished (ENOENT/ESRCH): not ours to judge
        return False
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError:
        return False
    finally:
        os.close(fd)
    return needle in b"".join(chunks)


def pids_with_token(token: str) -> list[int]:
    """Live processes carrying ``token``: in their environment or as :func:`comm_tag` name."""
    if not token:
        return []
    needle, comm = _token_matcher(token)
    return sorted(p for p, i in scan().items() if i.alive and _has_token(i, needle, comm))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init.

    With it, an item's double-forked daemon stays our (grand)child: visible, killable and
    reapable (:func:`reap`). Returns False where the kernel or libc lacks ``prctl``.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return False
    return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to the caller when its parent *thread* exits.

    Call it in a child right after ``fork``, then compare ``os.getppid()`` with the parent's
    pid: a parent that died before the call is not noticed by the kernel. The parent must be
    single-threaded or fork from a thread that lives as long as it does."""
    libc = _libc()
    if libc is None or not hasattr(libc, "prctl"):
        return False
    return int(libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0


def tag_process(token: str) -> None:
    """Mark the calling process (an item's forked child) and all it starts with ``token``.

    Sets ``LLMBENCH_ITEM_TOKEN`` (inherited through ``exec``) and the process name
    :func:`comm_tag` (inherited through ``fork``, visible to other processes at once).
    """
    os.environ[TOKEN_ENV] = token
    libc = _libc()
    if libc is not None and hasattr(libc, "prctl") and len(token) >= _MIN_COMM_TOKEN:
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(comm_tag(token).encode()), 0, 0, 0)


def group_exists(pgid: int) -> bool:
    """True if process group ``pgid`` has any member (zombies included): one syscall.

    After reaping its item child, the engine asks this to learn whether the item left
    processes behind, without scanning ``/proc``.
    """
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(pids: Iterable[int]) -> dict[int, int]:
    """``waitpid(pid, WNOHANG)`` each of ``pids`` that is our child; returns reaped statuses.

    Orphans re-parented to us as subreaper stay zombies until reaped. Leave out a child whose
    status you want from your own ``waitpid`` (or read it from the returned mapping).
    """
    reaped: dict[int, int] = {}
    for pid in pids:
        if pid <= 0:
            continue
        with contextlib.suppress(ChildProcessError):
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                reaped[pid] = status
    return reaped


def _protected(procs: Mapping[int, ProcInfo]) -> tuple[set[int], set[int]]:
    """Pids and process groups never to signal: ours, our ancestors', pid 0 and 1."""
    pids = {0, 1, os.getpid(), os.getppid()}
    groups = {0, 1, os.getpgrp()}
    pid, seen = os.getppid(), set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        info = procs.get(pid)
        if info is None:
            break
        pids.add(pid)
        groups.add(info.pgrp)
        pid = info.ppid
    return pids, groups


def _signal(pid: int, start_time: int, sig: int, protected: set[int]) -> bool:
    """Send ``sig`` to exactly the process ``(pid, start_time)``; False if it is gone."""
    if pid <= 1 or pid in protected:
        return False
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (OSError, AttributeError):  # kernel < 5.3: a plain kill after the same check
        if process_start_time(pid) != start_time:
            return False
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    try:
        # The pidfd pins one process; if the pid was recycled before pidfd_open, its start
        # time read now differs and we leave the stranger alone.
        if process_start_time(pid) != start_time:
            return False
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process carrying the token: not ours to kill
        log.debug("kill_tree: no permission to signal %d", pid)
        return False
    finally:
        os.close(fd)
    return True


def _killpg(pgid: int | None, sig: int) -> bool:
    if pgid is None or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class _Targets:
    """What belongs to the item being killed, re-evaluated on every ``/proc`` scan."""

    def __init__(self, pid: int, start_time: int | None, pgid: int | None, token: str | None):
        self.pid, self.pid_start, self.pgid, self.token = pid, start_time, pgid, token
        self.needle, self.comm = _token_matcher(token) if token else (b"", None)
        self.known: dict[int, int] = {}  # pid -> start time of every process ever selected

    def select(self, procs: Mapping[int, ProcInfo], protected: set[int]) -> dict[int, int]:
        """Live marked processes in ``procs``: ``{pid: start_time}``."""
        roots: set[int] = set()
        root = procs.get(self.pid)
        if root is not None and self.pid_start in (None, root.start_time):
            roots.add(self.pid)
        for pid, info in procs.items():
            if (
                self.known.get(pid) == info.start_time
                or (self.pgid is not None and info.pgrp == self.pgid)
                or (self.token and info.alive and _has_token(info, self.needle, self.comm))
            ):
                roots.add(pid)
        found = _subtree(roots - protected, _children_map(procs))
        targets = {
            p: procs[p].start_time
            for p in found
            if p in procs and procs[p].alive and p not in protected and p > 1
        }
        self.known.update(targets)
        return targets

    def any_alive(self) -> bool:
        return any(pid_alive(p, st) for p, st in self.known.items())

    def check_group(self) -> int | None:
        """The group to ``killpg``, while it is still the one we saw.

        A group id is a pid: once the group has no member at all, its number can be recycled
        for a stranger's group, so from then on it is never signalled again.
        """
        if self.pgid is not None and not group_exists(self.pgid):
            self.pgid = None
        return self.pgid


def kill_tree(
    pid: int,
    *,
    pgid: int | None = None,
    token: str | None = None,
    grace: float = 0.5,
    start_time: int | None = None,
) -> list[int]:
    """Terminate everything an item started; return the pids signalled (sorted).

    Targets: ``pid`` (if ``start_time`` is given, only while it still matches), its process
    group (``pgid``, or ``pid``'s own group if it leads one), all descendants, and every
    process carrying ``token``. SIGTERM + SIGCONT first; after at most ``grace`` seconds,
    SIGKILL rounds until nothing marked is alive (bounded by ~2 s; survivors, e.g. processes
    stuck in uninterruptible sleep, are logged). Call it *before* reaping ``pid``: an unreaped
    child's pid cannot be recycled. Nothing is reaped here (see :func:`reap`).
    """
    return kill_trees([KillSpec(pid, pgid=pgid, token=token, start_time=start_time)], grace=grace)


@dataclass(frozen=True)
class KillSpec:
    """One item's process tree for :func:`kill_trees` (the arguments of :func:`kill_tree`)."""

    pid: int
    pgid: int | None = None
    token: str | None = None
    start_time: int | None = None


def kill_trees(specs: Sequence[KillSpec], *, grace: float = 0.5) -> list[int]:
    """:func:`kill_tree` for several items at once, sharing every ``/proc`` scan and the
    grace period: items that reach their deadline together (a batch of hung calls) are
    killed in about the time of one."""
    specs = [s for s in specs if s.pid > 1 or s.pgid is not None or s.token]
    if not specs:
        return []
    procs = scan()
    protected, protected_groups = _protected(procs)
    all_targets = [_targets_of(spec, procs, protected_groups) for spec in specs]
    signalled = _terminate(all_targets, procs, protected)
    _wait_gone(all_targets, grace)
    signalled |= _kill_rounds(all_targets, protected, specs)
    log.debug("kill_trees(%s): signalled %d processes",
              ", ".join(str(s.pid) for s in specs), len(signalled))
    return sorted(signalled)


def _targets_of(spec: KillSpec, procs: Mapping[int, ProcInfo], protected_groups: set[int],
                ) -> _Targets:
    pgid = spec.pgid
    root = procs.get(spec.pid)
    if root is not None and spec.start_time is not None and root.start_time != spec.start_time:
        root = None  # pid recycled: only the group/token marks still apply
    if pgid is None and root is not None and root.pgrp == spec.pid:
        pgid = spec.pid
    if pgid is not None and (pgid <= 1 or pgid in protected_groups):
        log.warning("kill_tree: refusing to signal process group %d (ours or invalid)", pgid)
        pgid = None
    return _Targets(spec.pid, spec.start_time, pgid, spec.token)


def _terminate(all_targets: list[_Targets], procs: Mapping[int, ProcInfo],
               protected: set[int]) -> set[int]:
    """SIGTERM (and SIGCONT) to every marked process: the group at once, the rest one by one."""
    signalled: set[int] = set()
    for targets in all_targets:
        first = targets.select(procs, protected)
        pgid = targets.pgid
        if _killpg(pgid, signal.SIGTERM):
            # One SIGTERM each: a second one could land after a Python handler began a clean
            # exit and the interpreter restored SIG_DFL, turning that exit into a kill.
            signalled.update(p for p in first if procs[p].pgrp == pgid)
            first = {p: st for p, st in first.items() if procs[p].pgrp != pgid}
            _killpg(pgid, signal.SIGCONT)
        for p, st in first.items():
            if _signal(p, st, signal.SIGTERM, protected):
                signalled.add(p)
                _signal(p, st, signal.SIGCONT, protected)
    return signalled


def _wait_gone(all_targets: list[_Targets], grace: float) -> None:
    """Up to ``grace`` seconds for the signalled processes to exit by themselves."""
    deadline = time.monotonic() + grace
    delay = 0.001
    while any(t.any_alive() for t in all_targets):
        for targets in all_targets:
            targets.check_group()  # notice an emptied group before its number can be recycled
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, _POLL_MAX)


def _kill_rounds(all_targets: list[_Targets], protected: set[int],
                 specs: Sequence[KillSpec]) -> set[int]:
    """SIGKILL rounds: a dead process cannot fork, so every round shrinks the set; stop after
    two clean scans (a child forked just before its parent died is listed by the second)."""
    signalled: set[int] = set()
    budget_end = time.monotonic() + _KILL_BUDGET
    clean, delay = 0, 0.0
    while clean < 2:
        current = scan()
        alive: dict[int, int] = {}
        for targets in all_targets:
            alive.update(targets.select(current, protected))
        if not alive:
            clean += 1
            continue
        clean = 0
        if time.monotonic() > budget_end:
            log.warning("kill_tree(%s): still alive after SIGKILL: %s",
                        ", ".join(str(s.pid) for s in specs), sorted(alive))
            break
        for targets in all_targets:
            _killpg(targets.check_group(), signal.SIGKILL)
        for p, st in alive.items():
            if _signal(p, st, signal.SIGKILL, protected):
                signalled.add(p)
        time.sleep(delay)
        delay = min(max(delay * 2, 0.001), _POLL_MAX)
    return signalled


def kill_leftovers(token: str | None = None) -> list[int]:
    """In an item host after an item: SIGKILL what the item left, sparing the caller.

    Without cgroups this is what can be found: the caller's descendants, the members of its
    process group, and the holders of ``token``; a ``setsid`` daemon that also cleared its
    environment and renamed itself is re-parented to the fork server (a subreaper) and
    killed only when the server kills its hosts' trees (docs/deadlines.md).
    """
    procs = scan()
    me = os.getpid()
    group = os.getpgrp()
    roots = {p for p, i in procs.items() if i.ppid == me or (i.pgrp == group and p != me)}
    if token:
        needle, comm = _token_matcher(token)
        roots |= {p for p, i in procs.items() if i.alive and _has_token(i, needle, comm)}
    roots.discard(me)
    found = _subtree(roots, _children_map(procs)) - {me}
    specs = [KillSpec(p, start_time=procs[p].start_time) for p in found if p in procs]
    return kill_trees(specs, grace=0.0) if specs else []
