"""The worker template: imports what an xdist worker imports at start-up, then forks one
worker per launcher (``launch.py``) that asks.

Runs by path (``controller.py`` starts it), stdlib only. Its standard input is the
controller's control pipe: the first line is the JSON list of modules to import ahead;
end of file means "no more workers". It exits once every worker it forked has exited.

Protocol, per launcher connection (a unix socket in a private directory, bound and listening
before this process starts: its descriptor is the last argument):

- the launcher sends an 8-byte length with its fds 0, 1 and 2 attached (``SCM_RIGHTS``),
  then that many bytes of JSON: its argv after the interpreter, cwd and environment;
- the template answers ``fallback REASON`` (the launcher then execs a real interpreter),
  or ``forking``, then ``started PID``, and later ``exit CODE`` when that worker ends
  (negative: its signal);
- the connection closing before the worker ends (the launcher was killed, as execnet
  kills a gateway) kills the worker: a worker never outlives its launcher.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import types
from typing import Any, NoReturn

#: execnet's ``popen`` bootstrap, the ``-c`` program a worker is started with.
BOOTSTRAP = "import sys;exec(eval(sys.stdin.readline()))"
_HEADER = struct.Struct("!Q")
#: A request older than this (seconds, ``time.monotonic``: system-wide) is refused: its
#: launcher gives up waiting at twice this (launch.py's ``GIVE_UP``) and starts a fresh
#: interpreter on the same pipes, where a forked worker must never also be.
STALE = 30.0
_MAX_REQUEST = 16 << 20
#: Environment variables that change what an interpreter imports or how it starts: a
#: launcher whose values differ from the template's gets a fresh interpreter instead.
_INTERPRETER_ENV = ("PYTHON", "LC_", "LANG")


def interpreter_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_INTERPRETER_ENV)}


def rewritten_names() -> set[str]:
    """Top-level names pytest marks for assertion rewriting (those of every distribution
    with a ``pytest11`` entry point): importing one here would make each worker's pytest
    warn that it cannot rewrite it, so those are left to the worker."""
    import importlib.metadata as metadata

    files = [str(file) for dist in metadata.distributions()
             if any(ep.group == "pytest11" for ep in dist.entry_points)
             for file in dist.files or []]
    try:
        from _pytest.config import _iter_rewritable_modules
    except ImportError:  # a pytest without it: the same reading, more names rather than fewer
        return {name for name in (_top_level(file) for file in files) if name}
    return set(_iter_rewritable_modules(files))


def _top_level(file: str) -> str:
    head = file.replace("\\", "/").split("/")[0]
    if head.endswith((".dist-info", ".egg-info")) or head in ("..", ""):
        return ""
    return head[:-3] if head.endswith(".py") else head


#: This project's package: a ``pytest11`` distribution, but preloaded all the same (~35 ms
#: of imports per worker otherwise): its ``__init__`` says ``PYTEST_DONT_REWRITE``, so
#: pytest does not warn about it being imported already.
OWN_PACKAGE = "pytest_llmbench"


def preload(names: list[str]) -> int:
    """Import ``names`` (the controller's modules, already filtered to the interpreter's
    own and installed packages, and ours), skipping rewritable ones and any that fail."""
    skip = rewritten_names() - {OWN_PACKAGE}
    done = 0
    for name in names:
        if name.partition(".")[0] in skip or name in sys.modules:
            continue
        try:
            importlib.import_module(name)
            done += 1
        except BaseException:  # noqa: BLE001 - a module that will not import is the worker's business
            continue
    return done


def warm_caches() -> None:
    """Compute once here what every worker computes the same way: xdist's worker reports
    ``platform.platform()``, which reads the interpreter's binary for its libc version and
    runs ``uname -p`` (~20 ms each, a process started per worker); the answer is cached
    in the ``platform`` module, which the forks inherit."""
    import platform

    with contextlib.suppress(Exception):
        platform.platform()


class Template:
    def __init__(self, listener_fd: int) -> None:
        # Bound and listening since before this process started (the controller made it):
        # launchers that arrive during the start-up and the preload wait in the backlog.
        self.listener = socket.socket(fileno=listener_fd)
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.children: dict[int, socket.socket] = {}
        self.open = True
        self.env = interpreter_env(dict(os.environ))

    def serve(self) -> Worker | None:
        """Serve until done (None), or, in a forked child, return the worker it is to become."""
        for sock in (self.wake_r, self.wake_w):
            sock.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "control")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        while self.open or self.children:
            for key, _ in self.sel.select():
                if key.data == "accept":
                    worker = self.accept()
                    if worker is not None:  # in a forked child: leave the loop, and the server
                        return worker
                elif key.data == "control":
                    if not os.read(sys.stdin.fileno(), 4096):
                        self.close_listener()
                elif key.data == "wake":
                    while True:
                        try:
                            if not self.wake_r.recv(4096):
                                break
                        except BlockingIOError:
                            break
                else:
                    self.launcher_gone(key.data)
            self.reap()
        return None

    def close_listener(self) -> None:
        if self.open:
            self.open = False
            self.sel.unregister(sys.stdin.fileno())
            self.sel.unregister(self.listener)
            self.listener.close()

    def accept(self) -> Worker | None:
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            request, fds = self._read(conn)
        except (OSError, ValueError):
            conn.close()
            return None
        reason = self._refusal(request, fds)
        pid = -1
        if not reason:
            try:
                # Said before the fork: a launcher that then sees this connection end without
                # a pid must not start a second interpreter on the same pipes.
                conn.sendall(b"forking\n")
                pid = os.fork()
            except OSError as exc:
                reason = f"fork: {exc}"
        if pid == 0:  # pragma: no cover - the worker-to-be: coverage would not see it anyway
            return Worker(self, conn, fds, request)
        for fd in fds:
            os.close(fd)
        if reason:
            with contextlib.suppress(OSError):
                conn.sendall(f"fallback {reason}\n".encode())
            conn.close()
            return None
        # Watched before the answer: a launcher killed as soon as its worker ran (before
        # this process was scheduled again) must still take its worker with it.
        self.children[pid] = conn
        self.sel.register(conn, selectors.EVENT_READ, pid)
        try:
            conn.sendall(f"started {pid}\n".encode())
        except OSError:
            self.launcher_gone(pid)
        return None

    def _read(self, conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        head, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(head) != _HEADER.size:
            for fd in fds:
                os.close(fd)
            raise ValueError("short header")
        (size,) = _HEADER.unpack(head)
        if size > _MAX_REQUEST:
            for fd in fds:
                os.close(fd)
            raise ValueError("request too large")
        data = bytearray()
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                for fd in fds:
                    os.close(fd)
                raise ValueError("short request")
            data += chunk
        return json.loads(data), fds

    def _refusal(self, request: dict[str, Any], fds: list[int]) -> str:
        """Why this launcher gets a fresh interpreter instead (empty: it does not)."""
        argv = request.get("argv")
        if not isinstance(argv, list) or argv[-2:] != ["-c", BOOTSTRAP]:
            return "argv"
        if any(flag not in ("-u", "-B") for flag in argv[:-2]):
            return "flags"
        if len(fds) != 3:
            return "fds"
        env = request.get("env")
        if not isinstance(env, dict) or interpreter_env(env) != self.env:
            return "environment"
        sent = request.get("sent")
        if not isinstance(sent, (int, float)) or time.monotonic() - sent > STALE:
            return "stale"  # its launcher gives up at 2 x STALE: it may be gone, or about to
        return ""

    def launcher_gone(self, pid: int) -> None:
        """The launcher's end closed (killed, as execnet kills a gateway): so is its worker."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        conn = self.children.get(pid)
        if conn is not None and conn.fileno() >= 0:
            self.sel.unregister(conn)

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            conn.close()

class Worker:
    """A forked child of the template, about to become an xdist worker."""

    def __init__(self, template: Template, conn: socket.socket, fds: list[int],
                 request: dict[str, Any]) -> None:
        self.template, self.conn, self.fds, self.request = template, conn, fds, request

    def run(self) -> NoReturn:
        """Drop the template's state, take the launcher's pipes, cwd and environment, and run
        execnet's bootstrap as ``python -c`` would. Called at the top of the stack: an
        uncaught error (traceback, status 1) or a Ctrl-C is the interpreter's normal exit;
        the usual end, the bootstrap's return or a ``SystemExit``, is ``leave``'s."""
        template = self.template
        signal.set_wakeup_fd(-1)
        _signals_as_launched(self.request.get("ignored") or [])
        template.sel.close()
        for sock in (self.conn, template.listener, template.wake_r, template.wake_w,
                     *template.children.values()):
            sock.close()
        for target, fd in enumerate(self.fds):
            os.dup2(fd, target)
        for fd in self.fds:
            if fd > 2:
                os.close(fd)
        os.chdir(self.request["cwd"])
        os.environ.clear()
        os.environ.update(self.request["env"])
        argv: list[str] = self.request["argv"]
        sys.dont_write_bytecode = "-B" in argv
        _fresh_stdio()
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        sys.argv = ["-c"]
        try:
            exec(compile(argv[-1], "<string>", "exec"), main.__dict__)
        except SystemExit as exc:
            leave(exc.code)
        leave(0)


def leave(code: object) -> NoReturn:
    """End a worker as the interpreter's exit would, up to its last step: non-daemon threads
    are waited for, atexit handlers run (pytest's and logging's among them), the standard
    streams are flushed, and ``code`` is the status (``SystemExit``'s rules). Left out is
    the teardown of every module and object, which the process's end frees anyway: a
    forked worker touching all it inherited from the template copied its pages back, and
    32 workers doing it at once held the run's end up by 0.1-0.35 s (measured under -n 32;
    docs/architecture.md). The same for the template once its last worker is gone."""
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and not thread.daemon:
            thread.join()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code & 0xFF
    else:
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{code}\n")
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    os._exit(status)


#: The signals whose handling the template changes, or a launcher may have found ignored.
_RESET = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGCHLD", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _signals_as_launched(ignored: list[int]) -> None:
    """The dispositions a fresh interpreter started by the launcher would have: what the
    launcher found ignored stays ignored (``nohup``, a shell's background job), the rest
    default, and SIGINT raises ``KeyboardInterrupt`` unless ignored."""
    for name in _RESET:
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        if int(sig) in ignored:
            signal.signal(sig, signal.SIG_IGN)
        elif sig == signal.SIGINT:
            signal.signal(sig, signal.default_int_handler)
        else:
            signal.signal(sig, signal.SIG_DFL)


def _fresh_stdio() -> None:
    """Standard streams on fds 0-2 as ``python -u`` creates them (stdout and stderr
    unbuffered, write-through)."""
    encoding = sys.__stdout__.encoding if sys.__stdout__ is not None else "utf-8"
    errors = sys.__stdout__.errors if sys.__stdout__ is not None else "strict"
    streams = {
        "stdin": io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                  encoding=encoding, errors=errors),
        "stdout": io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=encoding,
                                   errors=errors, write_through=True),
        "stderr": io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=encoding,
                                   errors="backslashreplace", write_through=True),
    }
    for name, stream in streams.items():
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)  # what pytest's capture and faulthandler use


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def main(argv: list[str]) -> int:
    template = Template(int(argv[0]))
    names = json.loads(sys.stdin.readline() or "[]")
    preload(names)
    warm_caches()
    if _threads() > 1:
        # A module started a thread (a native one counts too): forking would copy its locks,
        # not the thread. Refuse, and every launcher starts a fresh interpreter.
        return 3
    # The preloaded objects live as long as any worker: keep the collector off their pages
    # (each worker's full collections would otherwise walk, and copy, all of them).
    gc.collect()
    gc.freeze()
    worker = template.serve()
    if worker is not None:
        worker.run()
    leave(0)


if __name__ == "__main__":  # pragma: no cover - runs as the template process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the workers, not for this
    raise SystemExit(main(sys.argv[-1:]))  # ``python -c RUNPY template.py LISTENER_FD``
