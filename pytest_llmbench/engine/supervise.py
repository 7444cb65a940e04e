"""Process supervision: which item processes exist, and how they die.

The scheduler (``scheduler.py``) decides *what* runs and *when*; this module owns the
lifetime of the processes that run it, for the items the pytest process forks itself
(``LLMBENCH_FORK_SERVER=0``, or a job an item host cannot load). Item hosts get the same
treatment from the fork server (``forkserver.py``), their parent.

* **Every process an item starts is known**: the item's child enters a cgroup of its own
  (``coord/cgroup.py``) before it runs anything, so a daemon that calls ``setsid``, clears
  its environment and renames itself, or a process whose main thread exited, is still
  listed. Without cgroups, the pytest process is a child subreaper: orphans of an item
  re-parent to it and stay in reach of ``proc.kill_tree`` (process group, descendants,
  token).
* **Nothing survives the item**: at its deadline the tree is killed; when it ends by itself
  (passed, failed or crashed) whatever it left is killed before the result counts.
* **Nothing survives pytest**: a *watchdog* process (a session of its own, so a signal to
  pytest's process group does not reach it) reads a pipe only pytest holds; at its end
  (pytest exited or died, by any signal, ``SIGKILL`` included) it kills every item tree
  still registered and removes their cgroups, then exits. The child closes the pipes and
  sockets it inherited (the watchdog's, the fork server's, xdist's channel to its
  controller): an item left running by a dead xdist worker must not keep the controller
  waiting for the end of that channel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pytest_llmbench.coord import cgroup, proc
from pytest_llmbench.engine.inflight import Child, kill_spec

log = logging.getLogger("pytest_llmbench.engine.supervise")

_WATCHDOG = (
    "import sys; from pytest_llmbench.engine.supervise import watchdog_main; "
    "sys.exit(watchdog_main())"
)


@dataclass(frozen=True)
class Forked:
    """A child forked for one item: its pid and the read end of its result pipe."""

    pid: int
    fd: int


class Supervisor:
    """The item processes this pytest process forks itself, from birth to reaping."""

    def __init__(self) -> None:
        # Orphans of our items re-parent to us instead of init: visible, killable, reapable.
        proc.set_child_subreaper()
        self._base: cgroup.Cgroup | None = None
        self._base_tried = False
        self._groups: dict[int, cgroup.Cgroup] = {}
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watch_fd = -1

    # --- birth -------------------------------------------------------------------------

    def _cgroup_for(self, token: str) -> cgroup.Cgroup | None:
        if not self._base_tried:
            self._base_tried = True
            self._base = cgroup.create_base()
        return self._base.child(f"c-{token}") if self._base is not None else None

    def fork(self, body: Callable[[int], object], token: str) -> Forked:
        """Fork a child that runs ``body(write_fd)`` (it must not return) in its own process
        group and cgroup, with no inherited pipe or socket but its result pipe."""
        self._ensure_watchdog()
        group = self._cgroup_for(token)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, measured by the tests' outcomes
            if group is not None:
                group.enter()
            os.close(read_fd)
            _close_inherited(keep={write_fd})
            body(write_fd)
            os._exit(1)
        os.close(write_fd)
        # Also from the parent: a deadline may fire before the child runs.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        if group is not None:
            group.enter(pid)
            self._groups[pid] = group
        self._tell(f"add {pid} {proc.process_start_time(pid) or 0} "
                   f"{group.path if group is not None else '-'} {int(bool(group and group.v2))}")
        return Forked(pid, read_fd)

    # --- death -------------------------------------------------------------------------

    def kill(self, children: Iterable[Child], grace: float) -> list[int]:
        """Kill these items' whole trees (one pass for all) and reap what is ours."""
        children = list(children)
        killed = proc.kill_trees([kill_spec(c) for c in children], grace=grace)
        for child in children:
            if child.host is None:
                self._kill_group(child.pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(child.pid, 0)
                self.forget(child.pid)
        proc.reap(p for p in killed if p not in {c.pid for c in children})
        return killed

    def ended(self, child: Child) -> None:
        """``child`` (reaped, or its host finished the item) ended by itself: kill what it
        left behind, if anything (one syscall or one small read to know)."""
        group = self._groups.get(child.pid) if child.host is None else None
        if group is not None:
            if group.pids():
                proc.reap(group.kill())  # orphans re-parented to us (a subreaper)
        elif child.pid and proc.group_exists(child.pid):
            proc.reap(proc.kill_trees([kill_spec(child)], grace=0.2))
        if child.host is None:
            self.forget(child.pid)

    def _kill_group(self, pid: int) -> None:
        group = self._groups.get(pid)
        if group is not None:
            proc.reap(group.kill() - {pid})  # ``pid`` itself: the caller waits for it

    def forget(self, pid: int) -> None:
        group = self._groups.pop(pid, None)
        if group is not None:
            group.remove()
            self._tell(f"del {pid}")

    def close(self) -> None:
        """At the end of the session: every item tree is dead by now; the watchdog exits."""
        for pid in list(self._groups):
            self.forget(pid)
        if self._watch_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._watch_fd)
            self._watch_fd = -1
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(timeout=5)
            self._watchdog = None
        if self._base is not None:
            self._base.remove()
            self._base, self._base_tried = None, False

    # --- the watchdog ------------------------------------------------------------------

    def _ensure_watchdog(self) -> None:
        if self._watchdog is not None:
            return
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG], stdin=read_fd, env=env,
                start_new_session=True,
            )
        except OSError as exc:
            log.warning("could not start the item watchdog (%s): items forked by pytest do"
                        " not die with it if it is killed", exc)
            os.close(write_fd)
            return
        finally:
            os.close(read_fd)
        self._watch_fd = write_fd

    def _tell(self, line: str) -> None:
        if self._watch_fd < 0:
            return
        try:
            os.write(self._watch_fd, (line + "\n").encode())
        except OSError:
            self._watch_fd = -1


def _close_inherited(keep: set[int]) -> None:
    """In a forked child: close every inherited pipe and socket but ``keep`` and 0-2.

    Regular files stay open (pytest's capture files back ``sys.stdout``)."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd <= 2 or fd in keep:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            with contextlib.suppress(OSError):
                os.close(fd)


def watchdog_main() -> int:  # pragma: no cover - runs as the watchdog process
    """Read ``add``/``del`` lines on stdin; at its end, kill every tree still registered."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    live: dict[int, tuple[int, str, bool]] = {}
    with os.fdopen(0, "rb", buffering=0) as stdin:
        for raw in iter(stdin.readline, b""):
            parts = raw.decode().split()
            if len(parts) == 5 and parts[0] == "add":
                live[int(parts[1])] = (int(parts[2]), parts[3], parts[4] == "1")
            elif len(parts) == 2 and parts[0] == "del":
                live.pop(int(parts[1]), None)
    for pid, (start, path, v2) in live.items():
        if path != "-":
            group = cgroup.Cgroup(Path(path), v2=v2)
            group.remove()
            with contextlib.suppress(OSError):
                group.path.parent.rmdir()  # the base, once its last child is gone
        else:
            proc.kill_tree(pid, pgid=pid, start_time=start or None, grace=0.0)
    return 0
