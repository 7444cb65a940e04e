"""One control group per item process: the kernel's own record of every process it started.

A process cannot leave its cgroup without write access to another one, whatever it does to
itself: ``setsid``, a double fork, a cleared environment, a new name, a main thread that
exited while other threads run. So the cgroup of an item host (or of a child forked for one
item) lists everything the item started, and killing the cgroup kills all of it:

* **cgroup v2** (``cgroup2`` mounted, ``cgroup.kill`` since Linux 5.14): one write kills
  every process in the cgroup and its sub-cgroups, atomically (a fork bomb cannot outrun it);
* **cgroup v1**, the ``pids`` hierarchy: no ``cgroup.kill``, so SIGKILL rounds over the
  listed processes, sub-cgroups included, until none is left (a process cannot fork once
  it has been sent SIGKILL, so every round shrinks the set).

Cgroups are created under the caller's own cgroup (read from ``/proc/self/cgroup``), in a
directory named after the creating process (``llmbench-<pid>-<start time>``), so a
directory whose creator died (a ``kill -9`` of the fork server) is recognised by the next
run and emptied (:func:`sweep_stale`). Nested cgroups that a sandbox creates for a program
(under its own cgroup, i.e. below the item's) are killed with it.

Where neither is writable (not root and no delegated subtree), :func:`available` is False
and the engine falls back to what ``proc`` can find (process group, ``/proc`` parent
links, the child subreaper, the item token): see docs/deadlines.md for what that misses.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from pathlib import Path

from pytest_llmbench.coord import proc

log = logging.getLogger("pytest_llmbench.coord.cgroup")

#: Set to ``0`` to never use cgroups (tests of the fallback, debugging).
ENV_SWITCH = "LLMBENCH_CGROUPS"
_PREFIX = "llmbench-"
_KILL_WAIT = 2.0  # seconds to wait for a killed cgroup to empty


@functools.cache
def _mounts() -> tuple[Path | None, Path | None]:
    """The cgroup v2 mount and the v1 ``pids`` mount (either may be None)."""
    v2 = v1 = None
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail:
            continue
        if tail[0] == "cgroup2" and v2 is None:
            v2 = Path(fields[4])
        elif tail[0] == "cgroup" and len(tail) >= 3 and "pids" in tail[2].split(","):
            v1 = v1 or Path(fields[4])
    return v2, v1


def _own_path(v2: bool) -> str | None:
    """This process's cgroup path in the v2 hierarchy (``0::``) or the v1 ``pids`` one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if (v2 and _id == "0" and controllers == "") or (
            not v2 and "pids" in controllers.split(",")
        ):
            return path
    return None


class Cgroup:
    """One cgroup directory (v2, or v1 ``pids``)."""

    def __init__(self, path: Path, *, v2: bool) -> None:
        self.path = path
        self.v2 = v2

    def __repr__(self) -> str:
        return f"Cgroup({str(self.path)!r}, v2={self.v2})"

    def child(self, name: str) -> Cgroup | None:
        """A new (or existing) sub-cgroup ``name``; None if it cannot be made."""
        path = self.path / name
        try:
            path.mkdir(exist_ok=True)
        except OSError as exc:
            log.debug("cannot create cgroup %s: %s", path, exc)
            return None
        return Cgroup(path, v2=self.v2)

    def enter(self, pid: int = 0) -> bool:
        """Move ``pid`` (0: the caller) into this cgroup; its future children follow."""
        try:
            fd = os.open(self.path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            os.write(fd, str(pid).encode())
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def _dirs(self) -> list[Path]:
        """This cgroup and every sub-cgroup, deepest first (the order ``rmdir`` needs)."""
        found: list[Path] = []
        for top, dirs, _files in os.walk(self.path, topdown=False):
            found.extend(Path(top) / d for d in dirs)
        found.append(self.path)
        return found

    def pids(self) -> set[int]:
        """Every process in this cgroup and its sub-cgroups."""
        out: set[int] = set()
        for folder in self._dirs():
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in (folder / "cgroup.procs").read_text().split())
        return out

    def kill(self, *, spare: int | None = None, wait: float = _KILL_WAIT) -> set[int]:
        """SIGKILL every process in the cgroup (but ``spare``) and wait until none is left
        (an exited process leaves the list at once, reaped or not); the pids seen.

        Nothing is reaped here: a caller that is the parent of some (a subreaper) reaps
        them, and keeps the exit status of the ones it waits for itself."""
        seen = self.pids() - {spare}
        if not seen:
            return seen
        if self.v2 and spare is None:
            with contextlib.suppress(OSError):
                (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + wait
        delay = 0.0005
        while True:
            left = self.pids() - {spare}
            if not left:
                return seen
            seen |= left
            if time.monotonic() > deadline:
                log.warning("cgroup %s: still alive after SIGKILL: %s", self.path, sorted(left))
                return seen
            for pid in left:
                if pid > 1 and pid != os.getpid():
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def remove(self) -> bool:
        """Kill what is left and remove the directory (sub-cgroups first)."""
        self.kill()
        ok = True
        for folder in self._dirs():
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("cannot remove cgroup %s: %s", folder, exc)
                ok = False
        return ok


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _parent() -> Cgroup | None:
    """The caller's own cgroup, if we may create cgroups under it (v2 first)."""
    v2_mount, v1_mount = _mounts()
    for mount, v2 in ((v2_mount, True), (v1_mount, False)):
        if mount is None:
            continue
        own = _own_path(v2)
        if own is None:
            continue
        path = mount / own.lstrip("/")
        if v2 and not (path / "cgroup.kill").exists() and own != "/":
            continue  # kernel < 5.14 (the root cgroup has no cgroup.kill, its children do)
        if os.access(path, os.W_OK | os.X_OK):
            return Cgroup(path, v2=v2)
    return None


def available() -> bool:
    """Whether item processes get cgroups of their own here."""
    return enabled() and _parent() is not None


def create_base() -> Cgroup | None:
    """A cgroup directory for the processes this process supervises, named after it (so a
    later run can tell whether its creator is alive); None where cgroups are not usable."""
    if not enabled():
        return None
    parent = _parent()
    if parent is None:
        return None
    sweep_stale(parent)
    pid = os.getpid()
    base = parent.child(f"{_PREFIX}{pid}-{proc.process_start_time(pid) or 0}")
    if base is None:
        return None
    if not base.v2 or (base.path / "cgroup.kill").exists():
        return base
    base.remove()  # no cgroup.kill below the root: kernel < 5.14
    return None


def sweep_stale(parent: Cgroup) -> None:
    """Kill and remove ``llmbench-*`` cgroups whose creating process is gone."""
    try:
        names = os.listdir(parent.path)
    except OSError:
        return
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        try:
            pid, start = (int(x) for x in name[len(_PREFIX):].split("-"))
        except ValueError:
            continue
        if not proc.pid_alive(pid, start or None):
            log.info("removing the cgroup of a run that died: %s", parent.path / name)
            Cgroup(parent.path / name, v2=parent.v2).remove()
