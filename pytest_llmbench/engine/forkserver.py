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

Protocol, over ``AF_UNIX``/``SOCK_SEQPACKET`` connections (message boundaries kept):

- client -> server: ``pickle(seq)`` with the host's job pipe (read end) and result pipe
  (write end) attached (``SCM_RIGHTS``);
- server -> client: ``("ready", preflight)`` first, once the server has warmed up
  (``import openai`` takes ~1 CPU-s: a client waits for it when it connects, so that no
  item's task deadline runs while the server is still importing); ``("forked", seq, pid)``
  once the host exists; ``("exit", pid, status)`` when a host is reaped, to the connection
  that asked for that host.
- The preflight (``session/preflight.py``: ``GET /models`` per endpoint, through the SDK)
  runs here, right after the warm-up, when the starting process asks for it: the server
  imports the SDK anyway, and the pytest process then never does (~1 CPU-s, and ~1 s of
  wall time before the first item when it ran in pytest's ``sessionstart``). Its request
  is the primary connection's first message; its answer (problems and log lines, or None
  when it could not run) rides in the primary connection's ``ready`` message. It runs
  before any host is forked, in threads joined before the first fork.

Every end of every connection is non-blocking and keeps what the socket does not take yet
in a queue, sent when the socket is writable: each side reads whatever arrives whatever it
has to send. (With blocking sends, at K = 1000 the pytest process and the server both
blocked sending to each other once ~280 requests and replies filled the socket buffers.)

Two ways to run it. Without xdist, the pytest process starts its own server and talks to it
over a socket pair (``ForkServer()``). Under xdist, the controller starts one server for the
whole run (``SharedForkServer``), listening at a path handed to every worker in its
``workerinput``; each worker connects to it (``ForkServer.connect``) instead of starting its
own (32 workers: one server, ~0.13 CPU-s, instead of 32). Either way the server has one
*primary* connection (the socket pair, or the controller's end): when it closes, the server
exits. Another connection closing is just forgotten: its hosts leave by themselves at the end
of their job pipes, and are reaped as usual.

The server is the hosts' parent and a child subreaper, so it reaps them and their orphaned
descendants. Killing an item at its deadline is the engine's job (process group, token,
``/proc``); the server owns the hosts' *lifetime*: each host runs in a cgroup of its own
(``coord/cgroup.py``, where cgroups are writable) and has a parent-death signal towards the
server; when a host exits, whatever its items left (its cgroup, else its process group) is
killed before the engine hears of the exit. The server runs in a session of its own, so a
signal to pytest's process group does not reach it: when the pytest process that started
it goes away, however it died (the primary socket closes; the parent-death signal), the
server kills every host's tree and exits. A client connection that closes (an xdist worker
that ended or died) has its hosts killed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_llmbench.coord import cgroup, proc
from pytest_llmbench.engine.runner import Job
from pytest_llmbench.store.claims import ClaimHolder
from pytest_llmbench.store.protocol import ResultStore, StoreRef

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
    store: StoreRef
    """The run's result store, opened again (once per host) through ``StoreRef.open``."""
    holder: ClaimHolder
    sys_path: tuple[str, ...]
    cwd: str
    env: dict[str, str] | None
    """The pytest process's environment now, which the host runs the item with (the server
    was started earlier, or by the xdist controller, whose environment differs); None:
    the same as for the host's previous item."""


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


_S = TypeVar("_S")


def started(start: Callable[[], _S], instead: str) -> _S | None:
    """``start()`` (a server, or a connection to one); None, logged with what happens
    ``instead``, when it cannot be had (``OSError``)."""
    try:
        return start()
    except OSError as exc:
        log.warning("could not start the fork server (%s): %s", exc, instead)
        return None


def preflight_request(checks: Sequence[tuple[Any, str | None]], timeout: float) -> bytes:
    """The request for a server's preflight (``_run_preflight`` reads it): each model with
    its key, and the timeout."""
    return pickle.dumps((list(checks), timeout))


_MAIN = "import sys; from pytest_llmbench.engine.forkserver import main; sys.exit(main(sys.argv[1:]))"


#: Set in the server's environment when a model of the run is reached over HTTPS.
_TLS_ENV = "LLMBENCH_FORK_SERVER_TLS"
#: Set when the primary connection's first message is a preflight request.
_PREFLIGHT_ENV = "LLMBENCH_FORK_SERVER_PREFLIGHT"
#: The starting pytest process's pid, when its main thread started the server (the kernel's
#: parent-death signal follows the *thread* that forked: another thread's end would fire it).
_PARENT_ENV = "LLMBENCH_FORK_SERVER_PARENT"


def _start(fds: list[int], tls: bool, preflight: bool = False) -> subprocess.Popen[bytes]:
    """The server process, given the primary connection (and the listening socket)."""
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    if tls:
        env[_TLS_ENV] = "1"
    if preflight:
        env[_PREFLIGHT_ENV] = "1"
    env[_PARENT_ENV] = str(os.getpid()) if threading.current_thread() is threading.main_thread() else ""
    return subprocess.Popen(
        # ``-c``, not ``-m``: the module is imported under its own name, once (a host
        # unpickling a ``Spawn`` would otherwise import it again, as a module apart).
        [sys.executable, "-c", _MAIN, *map(str, fds)],
        pass_fds=tuple(fds),
        stdin=subprocess.DEVNULL,
        env=env,
        # A session of its own: a signal to pytest's process group (Ctrl-C, ``kill -9 -PGID``)
        # does not reach the server, which then kills every host's tree before it exits.
        start_new_session=True,
    )


class ForkServer:
    """A pytest process's handle on a fork server: its own (started on first use), or the
    run's shared one (``connect``)."""

    process: subprocess.Popen[bytes] | None

    def __init__(self, *, tls: bool = False, preflight: bytes | None = None) -> None:
        """``preflight``: a request for the server to run the preflight before it says it
        is ready (built by ``session/run.py``'s ``start_preflight``, run by
        ``_run_preflight``); its answer is ``preflight_answer()``."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = ours
        try:
            self.process = _start([theirs.fileno()], tls, preflight is not None)
            if preflight is not None:
                ours.send(preflight)  # an empty socket takes it whole, at once
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._init_channel()

    def _init_channel(self) -> None:
        self.sock.setblocking(False)
        self.seq = 0
        self.closed = False
        self.ready = False
        """The server said it has warmed up. Waited for only when a host is first needed:
        a run whose items are all stored never waits for ``import openai``."""
        self.outbox: deque[tuple[bytes, tuple[int, int]]] = deque()
        """Requests not sent yet, with the descriptors they carry (ours until sent)."""
        self.preflight: PreflightAnswer | None = None
        """What the server's preflight found (None: none asked for, or it could not run)."""

    @classmethod
    def connect(cls, path: str) -> ForkServer:
        """A connection to the shared server listening at ``path`` (raises ``OSError``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(_address(path))
        except BaseException:
            sock.close()
            raise
        self = cls.__new__(cls)
        self.sock, self.process = sock, None
        self._init_channel()
        return self

    def wait_ready(self) -> None:
        """Block until the server has warmed up (see ``_wait_ready``), once."""
        if self.ready or self.closed:
            return
        self.sock.setblocking(True)
        try:
            self.preflight = _wait_ready(self.sock)
        finally:
            self.sock.setblocking(False)
        self.ready = True

    def preflight_answer(self) -> PreflightAnswer | None:
        """Wait for the server's warm-up and preflight; what the preflight found, or None
        (the server could not run it, or is gone: the caller runs it itself)."""
        self.wait_ready()
        return self.preflight

    def spawn_host(self, jobs_fd: int, results_fd: int) -> int:
        """Ask for an item host reading jobs from ``jobs_fd``, writing to ``results_fd``;
        returns the request's sequence number (the reply ``forked`` carries it).

        Never blocks: the request is queued and sent as far as the socket takes it now, the
        rest by ``flush`` once the socket is writable again (``pending``). This process owns
        the two descriptors until then, and closes them once sent. (Before the first one,
        the server's warm-up is waited for: no item's deadline ticks while it imports.)"""
        self.wait_ready()
        self.seq += 1
        self.outbox.append((pickle.dumps(self.seq), (jobs_fd, results_fd)))
        self.flush()
        return self.seq

    @property
    def pending(self) -> bool:
        """Requests wait for the socket to become writable (watch it for ``EVENT_WRITE``)."""
        return bool(self.outbox)

    def flush(self) -> None:
        """Send the queued requests until the socket would block.

        Both ends of this socket send and read: a blocking send here, with the server
        blocked sending its replies to us, deadlocked the run at ~280 hosts (K = 1000).
        On a broken socket the queue is dropped: the read side reports ``gone``."""
        while self.outbox:
            data, fds = self.outbox[0]
            try:
                socket.send_fds(self.sock, [data], list(fds))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("fork server connection broken: %s", exc)
                self._drop_outbox()
                return
            self.outbox.popleft()
            for fd in fds:
                os.close(fd)

    def _drop_outbox(self) -> None:
        while self.outbox:
            for fd in self.outbox.popleft()[1]:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def fileno(self) -> int:
        return self.sock.fileno()

    def events(self) -> list[tuple[Any, ...]]:
        """Every message waiting (non-blocking); ``[("gone",)]`` once the server is gone."""
        out: list[tuple[Any, ...]] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError:
                data = b""
            if not data:
                out.append(("gone",))
                return out
            message = pickle.loads(data)
            if message[0] == "ready":
                self.ready = True
                self.preflight = _preflight_of(message)
                continue
            out.append(message)

    def close(self, *, wait: bool = True) -> None:
        """End the connection: our own server kills what is left of its hosts and exits.
        ``wait=False``: return at once, and ``wait_closed`` later (the server's clean-up
        then runs while the caller finishes its own)."""
        if self.closed:
            if wait:
                self.wait_closed()
            return
        self.closed = True
        self._drop_outbox()
        self.sock.close()  # our own server sees EOF and exits; a shared one forgets us
        if self.process is None:
            return
        if not self.ready:  # still importing, no host forked: nothing to wait for
            self.process.kill()
        if wait:
            self.wait_closed()

    def wait_closed(self) -> None:
        """Wait for the closed server's exit (its hosts are reaped by then)."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SharedForkServer:
    """The xdist controller's fork server, shared by every worker of the run.

    It listens on an *abstract* ``AF_UNIX`` address (Linux: a name, not a file, gone with
    the socket; nothing is left behind however the run ends) with a random name, and serves
    only connections from processes of our own user (``SO_PEERCRED``). ``path`` is that
    name with ``@`` for its leading NUL byte (``connect`` takes it so). The controller holds
    the primary connection; closing it ends the server."""

    def __init__(self, *, tls: bool = False, preflight: bytes | None = None) -> None:
        self.path = "@llmbench-fs-" + secrets.token_hex(12)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(_address(self.path))
            listener.listen(64)
            self.process = _start([theirs.fileno(), listener.fileno()], tls, preflight is not None)
            if preflight is not None:
                ours.send(preflight)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            listener.close()
        self.sock = ours
        self.closed = False

    def preflight_answer(self) -> PreflightAnswer | None:
        """Wait for the server's warm-up and preflight (the controller's connection is
        otherwise never read); what the preflight found, or None (run it yourself)."""
        return _wait_ready(self.sock)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()  # the server sees EOF, waits for its hosts and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


#: Seconds a client waits for the server's warm-up (``import openai``, ~1 CPU-s) at most.
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class PreflightAnswer:
    """What the server's preflight found: one line per problem (empty: every endpoint
    answered), and what it logged, for the pytest process to log again."""

    problems: list[str]
    notes: list[tuple[int, str]]
    """``(level, message)`` of each record the preflight logged."""


def _say_ready(conn: socket.socket, preflight: PreflightAnswer | None = None) -> None:
    """First message on every connection, once the warm-up (and preflight) is done."""
    with contextlib.suppress(OSError):
        conn.send(pickle.dumps(("ready", preflight)))


def _preflight_of(message: tuple[Any, ...]) -> PreflightAnswer | None:
    answer = message[1] if len(message) > 1 else None
    return answer if isinstance(answer, PreflightAnswer) else None


def _wait_ready(sock: socket.socket) -> PreflightAnswer | None:
    """Block until the server has warmed up (its first message), so that no item's task
    deadline starts ticking while the server is still importing the SDK; its preflight's
    answer, if it ran one. A server that never says so is left to the engine's usual
    handling of a dead one."""
    sock.settimeout(READY_TIMEOUT)
    try:
        data = sock.recv(65536)
    except OSError as exc:
        log.warning("the fork server did not become ready: %s", exc)
        return None
    finally:
        sock.settimeout(None)
    try:
        message = pickle.loads(data) if data else None
    except Exception:  # noqa: BLE001 - a server that broke mid-message: no answer
        return None
    return _preflight_of(message) if isinstance(message, tuple) and message else None


def _address(path: str) -> str:
    """``@name`` -> the abstract address ``\\0name``; a filesystem path as it is."""
    return "\0" + path[1:] if path.startswith("@") else path


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


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
    def __init__(self, sock: socket.socket, listener: socket.socket | None = None) -> None:
        self.sock = sock
        """The primary connection: the server exits when it closes."""
        self.listener = listener
        self.conns: set[socket.socket] = {sock}
        self.outbox: dict[socket.socket, deque[bytes]] = {}
        """Messages a client's socket did not take yet (sent when it is writable)."""
        self.writing: set[socket.socket] = set()
        """Connections watched for writability (their queue is not empty)."""
        self.children: dict[int, socket.socket | None] = {}
        """Live hosts, each with the connection that asked for it (None once it closed)."""
        self.cgroup_base: cgroup.Cgroup | None = None
        self.cgroups: dict[int, cgroup.Cgroup] = {}
        """Each live host's cgroup: everything its items started, whatever they did."""
        self.made = 0
        self.stores: dict[StoreRef, ResultStore] = {}
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector = selectors.DefaultSelector()

    def store(self, ref: StoreRef) -> ResultStore:
        if ref not in self.stores:
            self.stores[ref] = ref.open()
        return self.stores[ref]

    def send(self, conn: socket.socket | None, message: tuple[Any, ...]) -> None:
        """Queue ``message`` for ``conn`` and send what its socket takes now (never blocks)."""
        if conn is None or conn not in self.conns:
            return
        self.outbox.setdefault(conn, deque()).append(pickle.dumps(message))
        self.flush(conn)

    def flush(self, conn: socket.socket) -> None:
        """Send what ``conn``'s socket takes; watch it for writability while more waits."""
        queue = self.outbox.get(conn)
        while queue:
            try:
                conn.send(queue[0])
            except (BlockingIOError, InterruptedError):
                if conn not in self.writing:
                    self.writing.add(conn)
                    self.selector.modify(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, "conn")
                return
            except OSError:  # the client is gone: run() notices the EOF
                queue.clear()
                break
            queue.popleft()
        self.outbox.pop(conn, None)
        if conn in self.writing:
            self.writing.discard(conn)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.modify(conn, selectors.EVENT_READ, "conn")

    def run(self) -> None:
        proc.set_child_subreaper()
        self.cgroup_base = cgroup.create_base()
        try:
            self.serve()
        finally:
            self.kill_all()

    def serve(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
        signal.signal(signal.SIGTERM, _exit_on_signal)  # the parent-death signal: clean up
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        selector = self.selector
        selector.register(self.sock, selectors.EVENT_READ, "conn")
        selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        if self.listener is not None:
            self.listener.setblocking(False)
            selector.register(self.listener, selectors.EVENT_READ, "listen")
        gc.freeze()  # what is imported now is never scanned again (fewer copied pages)
        self.sock.setblocking(False)
        while True:
            for key, mask in selector.select():
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 4096):
                            pass
                elif key.data == "listen":
                    self.accept()
                else:
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)
                    if mask & selectors.EVENT_WRITE:
                        self.flush(conn)
                    if not mask & selectors.EVENT_READ or self.requests(conn):
                        continue
                    if conn is self.sock:  # pytest ended (or died): its hosts go with it
                        self.shut()
                        return
                    self.forget(conn)
            self.reap()

    def accept(self) -> None:
        while True:
            try:
                conn, _addr = self.listener.accept()  # type: ignore[union-attr]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("fork server: accept failed: %s", exc)
                return
            if not _same_user(conn):  # a job pipe carries pickles: only our own user
                log.warning("fork server: refused a connection from another user")
                conn.close()
                continue
            conn.setblocking(True)
            _say_ready(conn)
            conn.setblocking(False)
            self.conns.add(conn)
            self.selector.register(conn, selectors.EVENT_READ, "conn")

    def forget(self, conn: socket.socket) -> None:
        """A client went away (ended, or died: an item may kill its xdist worker): nothing
        is left to report its hosts' items to, so they are killed."""
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        self.conns.discard(conn)
        self.outbox.pop(conn, None)
        self.writing.discard(conn)
        conn.close()
        for pid, owner in list(self.children.items()):
            if owner is conn:
                self.children[pid] = None
                self.kill_host(pid)

    def kill_host(self, pid: int) -> None:
        """Kill host ``pid`` and all its items started (its cgroup, else its marks)."""
        group = self.cgroups.get(pid)
        if group is not None:
            group.kill()
        else:
            proc.kill_tree(pid, pgid=pid, grace=0.0)

    def kill_all(self) -> None:
        """At the end, however it comes: no host and nothing a host started survives."""
        # The parent-death signal often lands just after the socket's end: it must not cut
        # this short (its handler raises SystemExit).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for pid in list(self.children):
            self.kill_host(pid)
        for group in list(self.cgroups.values()):
            group.remove()
        self.cgroups.clear()
        if self.cgroup_base is None:
            # No cgroups: every orphan of an item was re-parented to us (subreaper).
            me = os.getpid()
            orphans = [p for p, i in proc.scan().items() if i.ppid == me]
            proc.kill_trees([proc.KillSpec(p) for p in orphans], grace=0.0)
        self.wait_for_hosts(timeout=1.0)
        if self.cgroup_base is not None:
            self.cgroup_base.remove()

    def shut(self) -> None:
        """The primary connection closed: take no more clients."""
        for conn in list(self.conns):
            if conn is not self.sock:
                self.forget(conn)
        if self.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def wait_for_hosts(self, timeout: float = 5.0) -> None:
        """At the end: reap the killed hosts, so their CPU time and exit are accounted to
        this process and, through it, to pytest."""
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
                self.host_gone(pid)
                self.send(self.children.pop(pid), ("exit", pid, status))

    def host_gone(self, pid: int) -> None:
        """A host exited: what its items left behind (a daemon that called ``setsid``, a
        process whose main thread exited) goes too, before the engine hears of the exit."""
        group = self.cgroups.pop(pid, None)
        if group is not None:
            group.remove()
        elif proc.group_exists(pid):
            proc.kill_tree(pid, pgid=pid, grace=0.0)

    def requests(self, conn: socket.socket) -> bool:
        """Fork an item host for every request waiting on ``conn``; False when the client
        has closed the socket."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, 4096, 2)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            if not self.request(conn, data, fds):
                return False

    def request(self, conn: socket.socket, data: bytes, fds: list[int]) -> bool:
        """Fork one item host for ``conn``; False when the client has closed the socket."""
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        seq = pickle.loads(data)
        if len(fds) != 2:  # not our engine's request: stop serving (the engine falls back)
            for fd in fds:
                os.close(fd)
            return False
        jobs_fd, results_fd = fds
        self.made += 1
        group = self.cgroup_base.child(f"h{self.made}") if self.cgroup_base else None
        server = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the item host
            from pytest_llmbench.engine.child import host_main

            if group is not None and not group.enter():
                group = None
            # A host dies with the server (a server killed by itself cannot kill it).
            proc.set_parent_death_signal(signal.SIGKILL)
            if os.getppid() != server:
                os._exit(1)
            gc.disable()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # No client may wait on a socket a host still holds: close every one.
            for other in self.conns:
                other.close()
            if self.listener is not None:
                self.listener.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            host_main(jobs_fd, results_fd, self.store, group)
        os.close(jobs_fd)
        os.close(results_fd)
        self.children[pid] = conn
        if group is not None:
            self.cgroups[pid] = group
        self.send(conn, ("forked", seq, pid))
        return True


#: Packages ``import openai`` loads when they happen to be installed and that no item host
#: uses: ``aiohttp``, the SDK's optional async transport (~0.3 CPU-s, ~30 % of the SDK's
#: import, paid before the first item can start). It is common in ML environments (it comes
#: with ``datasets``/``fsspec`` and ``inspect_ai``). Hidden during the SDK's import only.
SKIPPED_AT_WARM_UP = ("aiohttp",)


@contextlib.contextmanager
def hidden_modules(names: tuple[str, ...]) -> Iterator[None]:
    """Make ``import name`` fail (``ImportError``) inside the block for each of ``names``
    not imported yet, so an optional dependency's ``try: import ...`` takes its fallback;
    importable again afterwards. (In the hosts this leaves the SDK's optional
    ``DefaultAioHttpClient`` unusable: items use the sync client; a tool that wants an
    async aiohttp client builds its own ``aiohttp`` session.)"""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # None: "import halted"
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def warm_up() -> None:
    """Import and initialise here, once, what every child would otherwise do itself: the
    child's module, the scorers, the IDNA codec (host names; it loads ``unicodedata``), libc
    for ``prctl``, the ``openai`` SDK (model access goes through it: no HTTP is spoken
    here), and the TLS context when a model needs it."""
    # Imported once here, not in every host: everything an item touches.
    from pytest_llmbench.coord import (
        proc,  # noqa: F401
        ratelimit,  # noqa: F401
    )
    from pytest_llmbench.engine import (
        child,  # noqa: F401
        runner,  # noqa: F401
    )
    from pytest_llmbench.providers import api, openai_compat  # noqa: F401
    from pytest_llmbench.scoring import resolve as scoring  # noqa: F401

    # The default store before the hosts fork: importing it in each host on
    # its first job (to unpickle its ``FileStoreRef``) cost ~0.4-0.9 s of the first item's
    # task deadline on a loaded machine.
    from pytest_llmbench.store import filestore  # noqa: F401

    "localhost".encode("idna")
    proc._libc()
    # ``import openai`` (~0.8 s of CPU) and one request path through the SDK (its lazy
    # imports), once here: the hosts forked after this inherit them.
    with hidden_modules(SKIPPED_AT_WARM_UP):
        openai_compat.warm_up()
    if os.environ.pop(_TLS_ENV, "") == "1":
        # A model is reached over HTTPS: build the verifying TLS context (the CA bundle,
        # ~45 ms) once here instead of in every host on its first request.
        openai_compat.default_ssl_context()


def _read_preflight_request(sock: socket.socket) -> bytes | None:
    """The preflight request, when the starting process sent one (the primary connection's
    first message, sent before this process started)."""
    if os.environ.pop(_PREFLIGHT_ENV, "") != "1":
        return None
    sock.settimeout(READY_TIMEOUT)
    try:
        return sock.recv(1 << 20) or None
    except OSError:
        return None
    finally:
        sock.settimeout(None)


def _run_preflight(request: bytes) -> PreflightAnswer | None:
    """Run the preflight ``request`` (``preflight_request``) describes, here, before any
    host is forked: its threads are joined and its clients closed when it returns. None
    when it cannot run (the pytest process then runs it itself)."""
    from pytest_llmbench.session import preflight

    notes: list[tuple[int, str]] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append((record.levelno, record.getMessage()))

    keep = _Keep(logging.INFO)
    preflight.log.addHandler(keep)
    preflight.log.setLevel(logging.INFO)
    preflight.log.propagate = False  # the pytest process logs them again
    try:
        pairs, timeout = pickle.loads(request)
        keys = {id(model): key for model, key in pairs}
        problems = preflight.check_models([m for m, _ in pairs], lambda m: keys[id(m)],
                                          timeout=timeout)
        return PreflightAnswer(problems, notes)
    except Exception as exc:  # noqa: BLE001 - the pytest process runs it itself
        log.debug("preflight in the fork server failed: %r", exc)
        return None
    finally:
        preflight.log.removeHandler(keep)
        preflight.log.setLevel(logging.NOTSET)
        preflight.log.propagate = True


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _watch_parent() -> None:
    """Die (cleaning up) when the pytest process does, by any signal: the primary socket's
    end is one watchdog; the kernel's parent-death signal is the other, when it applies."""
    parent = os.environ.pop(_PARENT_ENV, "")
    if parent:
        proc.set_parent_death_signal(signal.SIGTERM)
        if os.getppid() != int(parent):
            raise SystemExit(1)


def main(argv: list[str]) -> int:  # pragma: no cover - runs as the server process
    _watch_parent()
    sock = socket.socket(fileno=int(argv[0]))
    request = _read_preflight_request(sock)
    warm_up()
    listener = socket.socket(fileno=int(argv[1])) if len(argv) > 1 else None
    _say_ready(sock, _run_preflight(request) if request is not None else None)
    _Server(sock, listener).run()
    # Every host is reaped and every cgroup removed: all the interpreter's own exit would
    # still do is tear down the SDK's modules, on the critical path of the run's end (the
    # pytest process waits for this exit).
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
