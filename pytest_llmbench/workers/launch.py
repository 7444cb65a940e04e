"""What xdist's ``popen`` gateway runs instead of Python: ``PYTHON -S -I launch.py SOCKET
-u -c BOOTSTRAP``. Asks the worker template (``template.py``) to fork a worker on this
process's standard streams, then waits for it and exits as it did.

Stdlib only, run by path with ``-S -I`` (no site, no environment): it starts in ~10 ms.
Whenever the template cannot serve (not there, refused, gone before it forked), this
process becomes the interpreter execnet asked for (``exec``), so a worker always starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

#: Seconds to wait for the template's first answer (its ``STALE`` is half of it).
GIVE_UP = 60.0


def fresh(argv: list[str], sigint: signal.Handlers) -> NoReturn:
    """Become the interpreter execnet asked for, with ``sigint``, the SIGINT disposition
    this process started with (``main`` ignores SIGINT while it waits; an exec would pass
    that on)."""
    signal.signal(signal.SIGINT, sigint)
    os.execv(sys.executable, [sys.executable, *argv])


def wait_gone(pid: int) -> None:
    """The template died after forking our worker: it is not our child, so poll it."""
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        time.sleep(0.1)


def exit_as(code: int) -> NoReturn:
    if code < 0:  # the worker died of a signal: so do we, as a real interpreter would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if 0 <= code < 256 else 1)


def main() -> NoReturn:
    path, argv = sys.argv[1], sys.argv[2:]
    # Signals ignored when this process started (``nohup``, a shell's background job): a
    # fresh interpreter would have inherited that, so the worker is told.
    ignored = [int(sig) for sig in signal.valid_signals()
               if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) == signal.SIG_IGN]
    sigint = signal.SIG_IGN if signal.SIGINT in ignored else signal.SIG_DFL
    # A Ctrl-C reaches the worker (same process group) and is its to handle; this process
    # only relays how the worker ended.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                          "ignored": ignored, "sent": time.monotonic()}).encode()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
        sock.sendall(payload)
        # A template stuck in its start-up must not hold the worker back for ever. It
        # refuses a request older than STALE (template.py), well before this gives up, so
        # it never forks for a launcher that has become an interpreter itself.
        sock.settimeout(GIVE_UP)
        answers = sock.makefile("rb")
        first = answers.readline().split()
        sock.settimeout(None)
    except OSError:
        fresh(argv, sigint)
    if first != [b"forking"]:
        fresh(argv, sigint)  # refused (``fallback REASON``), or the template went away first
    try:
        second = answers.readline().split()
    except OSError:
        second = []
    if second[:1] == [b"fallback"]:
        fresh(argv, sigint)  # the fork failed
    if len(second) != 2 or second[0] != b"started":
        os._exit(1)  # a worker may hold our pipes: a second interpreter must not read them
    pid = int(second[1])
    try:
        last = answers.readline().split()
    except OSError:
        last = []
    if len(last) == 2 and last[0] == b"exit":
        exit_as(int(last[1]))
    wait_gone(pid)
    os._exit(1)


if __name__ == "__main__":
    main()
