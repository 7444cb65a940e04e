"""Whole-tree limits for one sandbox run: a memory and a pids cgroup (cgroup v1).

Rlimits count per process (``RLIMIT_AS``) or per uid (``RLIMIT_NPROC``); twelve children of a
program may each map ``memory_mb``. A cgroup counts the whole tree: every process the program
starts is born into it and cannot leave it without privileges, so

* ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes`` where swap accounting
  exists) caps the resident memory of all of them together, page cache and the files the
  program writes to its tmpfs included; past it the kernel's OOM killer kills one of them,
  and ``memory.oom_control``'s ``oom_kill`` counter says so (the judge's ``MLE``);
* ``pids.max`` caps processes + threads of the tree together;
* ``cgroup.procs`` lists every live member, however it detached itself (``setsid``, double
  fork, a cleared environment, a new name): the sweep after the run kills exactly those.

Each run gets ``llmbench-<pid>-<token>`` below the caller's own cgroup in the ``memory``
and ``pids`` hierarchies (so the caller's own limits still apply above it, and a kill of the
caller's cgroup *tree* reaches the run: cgroup v1's ``cgroup.procs`` lists direct members
only, so such a kill must walk the child directories). The forked child
joins both before it execs (``join_paths``); the directories are removed after the run, and
stale ones whose creator died are removed by the next run.

Only cgroup v1 controllers are used, mounted at ``/sys/fs/cgroup/{memory,pids}`` and
writable (root, as in CI). On a cgroup v2-only machine, or without the rights, ``probe``
returns None and the sandbox falls back to rlimits (see ``docs/code-execution.md``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pytest_llmbench.scoring.codeexec")

_ROOT = Path("/sys/fs/cgroup")
_CONTROLLERS = ("memory", "pids")
_PREFIX = "llmbench-"


def _own_path(controller: str) -> str | None:
    """Our cgroup path in the v1 hierarchy holding ``controller`` (``/proc/self/cgroup``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return None


def parents() -> dict[str, Path] | None:
    """Per controller, the caller's own cgroup directory (read anew each time: an item
    process may have been moved to a cgroup of its own after it was forked)."""
    found: dict[str, Path] = {}
    for controller in _CONTROLLERS:
        own = _own_path(controller)
        if own is None:
            return None
        found[controller] = _ROOT / controller / own.lstrip("/")
    return found


@functools.cache
def probe() -> dict[str, Path] | None:
    """``parents()`` if run cgroups can be created there, else None (tested once)."""
    found = parents()
    if found is None:
        return None
    for controller, parent in found.items():
        trial = parent / f"{_PREFIX}probe-{os.getpid()}"
        try:
            trial.mkdir()
            trial.rmdir()
        except OSError as exc:
            log.debug("no %s cgroup for sandbox runs: %s", controller, exc)
            return None
    return found


def _remove_stale(parent: Path) -> None:
    """Kill what is left in run cgroups whose runner died (its item process was killed at
    its deadline: the program died with it through ``PR_SET_PDEATHSIG``, but its children
    may not have), and remove those cgroups."""
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if not entry.name.startswith(_PREFIX):
                continue
            pid = entry.name[len(_PREFIX):].split("-", 1)[0]
            if not pid.isdigit() or Path(f"/proc/{pid}").exists():
                continue
            try:
                members = [int(p) for p in (entry / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                members = []
            for member in members:
                with contextlib.suppress(OSError):
                    os.kill(member, signal.SIGKILL)
            if members:
                log.warning("killed %d leftover process(es) of a dead sandbox runner in %s",
                            len(members), entry)
            with contextlib.suppress(OSError):
                entry.rmdir()  # fails (EBUSY) until the killed processes are gone: next time


@dataclass
class RunCgroup:
    """The cgroups of one run (see the module docstring)."""

    dirs: dict[str, Path]

    @classmethod
    def create(cls, token: str, *, memory_bytes: int, pids: int) -> RunCgroup | None:
        where = parents() if probe() is not None else None
        if where is None:
            return None
        dirs: dict[str, Path] = {}
        name = f"{_PREFIX}{os.getpid()}-{token}"
        try:
            for controller, parent in where.items():
                _remove_stale(parent)
                path = parent / name
                path.mkdir()
                dirs[controller] = path
            mem = dirs["memory"]
            if memory_bytes > 0:
                (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
                memsw = mem / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # must not be below the memory limit: set second
                    memsw.write_text(str(memory_bytes))
            (dirs["pids"] / "pids.max").write_text(str(max(1, pids)))
        except OSError as exc:
            log.warning("cannot set up the cgroups of a sandbox run: %s", exc)
            cls(dirs).remove()
            return None
        return cls(dirs)

    @property
    def join_paths(self) -> list[bytes]:
        """``cgroup.procs`` files the child writes its pid to, before it execs."""
        return [str(d / "cgroup.procs").encode() for d in self.dirs.values()]

    def members(self) -> list[int]:
        """Every process in the run's cgroups (zombies included until reaped)."""
        pids: set[int] = set()
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
        return sorted(pids)

    def oom_kills(self) -> int:
        """Processes of the run the kernel killed for exceeding the memory limit."""
        mem = self.dirs.get("memory")
        if mem is None:
            return 0
        try:
            for line in (mem / "memory.oom_control").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            return int((mem / "memory.failcnt").read_text()) and 1  # older kernels
        except (OSError, ValueError):
            return 0

    def peak_memory(self) -> int:
        """Highest memory use of the whole tree together, in bytes."""
        mem = self.dirs.get("memory")
        try:
            return int((mem / "memory.max_usage_in_bytes").read_text()) if mem else 0
        except (OSError, ValueError):
            return 0

    def remove(self) -> None:
        """Remove the directories (the sweep has emptied them; retry briefly while the
        kernel finishes tearing the last processes down)."""
        for d in self.dirs.values():
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)
            else:
                log.warning("cannot remove the sandbox cgroup %s", d)
