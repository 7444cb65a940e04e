"""The fork server: a small process that forks the item hosts, so pytest never forks.

Forking costs in proportion to the memory of the process that forks: the page tables are
copied, and every page either side writes afterwards is copied again (copy-on-write). A
pytest process holding a collected suite is 50-100 MB and keeps writing all over its heap,
so a fork per item from it cost ~15 ms of CPU (2700 page faults in the child, 900 in the
parent; bench/run.py, overhead workload). This server is a fresh interpreter holding only
what a child needs (``runner``, ``api``, ``store``; ~25 MB, ~0.1 CPU-s to start): a fork
from it costs ~2 ms, and the pytest process takes no copy-on-write faults at all.

An *item host* is a process forked from this server that runs items for the engine one at a
time (``child.host_main``): the engine writes a job (a pickled ``Spawn``, length-prefixed)
to the host's job pipe and reads its events and result from its result pipe. A host is
killed, with its process group and the item's token holders, when its item passes its task
deadline, and replaced; it also leaves by itself after an item that left a process or
thread behind, and after ``HOST_MAX_ITEMS`` items. Reusing a host saves the fork and the
copy-on-write faults of a fresh process per item (~7 ms of CPU per item here, see
docs/architecture.md).

Protocol, one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair (message boundaries kept):

- parent -> server: ``pickle(seq)`` with the host's job pipe (read end) and result pipe
  (write end) attached (``SCM_RIGHTS``);
- server -> parent: ``("forked", seq, pid)`` once the host exists; ``("exit", pid,
  status)`` when a host is reaped.

The server is the hosts' parent and a child subreaper, so it reaps them and their orphaned
descendants; killing stays the engine's job (process group, token, ``/proc``). When the
pytest process goes away (the socket closes), the server exits; a host then sees the end of
its job pipe after its current item, which finishes and is stored, as after a crash of pytest.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runner import Job
from .store import ClaimHolder, Store

log = logging.getLogger(__name__)

#: A job larger than this is forked by the pytest process itself (it would sit in the
#: host's job pipe, 64 KiB, while the engine waits; such jobs are rare: huge prompts or data).
MAX_MESSAGE = 60 * 1024
#: Set to ``0`` to fork every item from the pytest process (debugging, comparison).
ENV_SWITCH = "LLMBENCH_FORK_SERVER"


@dataclass(frozen=True)
class Spawn:
    """One item to fork: everything ``child_main`` needs, plus where to run it from."""

    job: Job
    token: str
    deadline: float
    """``time.monotonic()`` deadline (the clock is system-wide)."""
    store_root: str
    fsync: bool
    holder: ClaimHolder
    sys_path: tuple[str, ...]
    cwd: str


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


class ForkServer:
    """The pytest process's handle on its fork server (started on first use)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pytest_llmbench.forkserver", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        self.seq = 0
        self.closed = False

    def spawn_host(self, jobs_fd: int, results_fd: int) -> int:
        """Ask for an item host reading jobs from ``jobs_fd``, writing to ``results_fd``;
        returns the request's sequence number (the reply ``forked`` carries it)."""
        self.seq += 1
        socket.send_fds(self.sock, [pickle.dumps(self.seq)], [jobs_fd, results_fd])
        return self.seq

    def fileno(self) -> int:
        return self.sock.fileno()

    def events(self) -> list[tuple[Any, ...]]:
        """Every message waiting (non-blocking); ``[("gone",)]`` once the server is gone."""
        out: list[tuple[Any, ...]] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                data = b""
            if not data:
                out.append(("gone",))
                return out
            out.append(pickle.loads(data))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()  # the server sees EOF and exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def encode(spawn: Spawn) -> bytes | None:
    """``spawn`` pickled, or None when it cannot be sent (unpicklable or too large)."""
    try:
        data = pickle.dumps(spawn, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickle raises many kinds; the parent forks instead
        log.debug("item %s is forked by the pytest process: %s", spawn.job.nodeid, exc)
        return None
    if len(data) > MAX_MESSAGE:
        log.debug("item %s is forked by the pytest process: job of %d bytes",
                  spawn.job.nodeid, len(data))
        return None
    return data


# --- the server process --------------------------------------------------------------------


class _Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.children: set[int] = set()
        self.stores: dict[tuple[str, bool], Store] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def store(self, root: str, fsync: bool) -> Store:
        key = (root, fsync)
        if key not in self.stores:
            self.stores[key] = Store(Path(root), fsync=fsync)
        return self.stores[key]

    def send(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: run() notices the EOF
            self.sock.send(pickle.dumps(message))

    def run(self) -> None:
        from . import proc

        proc.set_child_subreaper()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        gc.freeze()  # what is imported now is never scanned again (fewer copied pages)
        while True:
            for key, _mask in selector.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                elif not self.request():
                    self.wait_for_hosts()
                    return
            self.reap()

    def wait_for_hosts(self, timeout: float = 5.0) -> None:
        """At the end: reap the hosts (each leaves at the end of its job pipe), so their CPU
        time and exit are accounted to this process and, through it, to pytest."""
        deadline = time.monotonic() + timeout
        while self.children and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.005)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self.send(("exit", pid, status))

    def request(self) -> bool:
        """Fork one item host; False when the parent has closed the socket."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 2)
        except InterruptedError:
            return True
        except OSError:
            return False
        if not data:
            return False
        seq = pickle.loads(data)
        if len(fds) != 2:  # not our engine's request: stop serving (the engine falls back)
            for fd in fds:
                os.close(fd)
            return False
        jobs_fd, results_fd = fds
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the item host
            from .child import host_main

            gc.disable()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.sock.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            host_main(jobs_fd, results_fd, self.store)
        os.close(jobs_fd)
        os.close(results_fd)
        self.children.add(pid)
        self.send(("forked", seq, pid))
        return True


def warm_up() -> None:
    """Import and initialise here, once, what every child would otherwise do itself: the
    child's module, the scorers, the IDNA codec ``http.client`` uses for host names (it
    loads ``unicodedata``), libc for ``prctl``."""
    from . import child, proc, scoring  # noqa: F401 - imported once here, not in every host

    "localhost".encode("idna")
    proc._libc()


def main(argv: list[str]) -> int:  # pragma: no cover - runs as the server process
    warm_up()

    sock = socket.socket(fileno=int(argv[0]))
    _Server(sock).run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
