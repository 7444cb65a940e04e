"""The item's side: what an item process runs.

An item runs either in an *item host* (``host_main``: a process forked by the fork server,
see ``forkserver.py``, that runs one item at a time for the engine) or in a child the
pytest process forked for it alone (``child_main``). Either way the process leads its own
process group, carries the item's token (``proc.tag_process``), ships its log records,
attempts and result to the parent as JSON lines on a pipe, writes its result to the store
*before* sending it, and is killed, group and token holders included, at the task deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pytest_llmbench.coord import proc
from pytest_llmbench.coord.cgroup import Cgroup
from pytest_llmbench.engine.runner import Job, execute
from pytest_llmbench.store.claims import ClaimHolder
from pytest_llmbench.store.protocol import ResultStore, StoreRef


class _PipeLogHandler(logging.Handler):
    """In the child: ship the plugin's log records to the parent, which re-emits them."""

    def __init__(self, send: Callable[[str, Any], None]) -> None:
        super().__init__(logging.DEBUG)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        # A log line must never kill the item.
        with contextlib.suppress(Exception):
            self.send(
                "log",
                {
                    "name": record.name,
                    "levelno": record.levelno,
                    "levelname": record.levelname,
                    "msg": record.getMessage(),
                    "created": record.created,
                    "process": record.process,
                },
            )


def _sender(fd: int) -> Callable[..., None]:
    def send(kind: str, data: Any, then: str = "") -> None:
        line = json.dumps([kind, data], default=str) + "\n"
        if then:
            line += json.dumps([then, None]) + "\n"
        payload = line.encode()
        view = memoryview(payload)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno == errno.EPIPE:
                    return
                raise
            view = view[n:]

    return send


def _report_crash(fd: int) -> None:
    """The traceback of what went wrong outside the item's own error handling."""
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(["crash", traceback.format_exc()]) + "\n").encode())


#: Item processes run this much nicer than the pytest process that dispatches them and
#: enforces their deadlines: with 128 items in flight on 2 cores, the engine waited behind
#: the items for the CPU, so results were read and new items started late.
ITEM_NICE = 2


def _become_item_process(send: Callable[..., None]) -> None:
    with contextlib.suppress(OSError):
        os.nice(ITEM_NICE)
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    root = logging.getLogger("pytest_llmbench")
    root.handlers = [_PipeLogHandler(send)]
    root.propagate = False
    root.setLevel(logging.DEBUG)


def _run_item(
    job: Job, send: Callable[..., None], deadline: float, store: ResultStore, holder: ClaimHolder,
    *, then: Callable[[], str] | None = None,
) -> None:
    """Run, store, send the result; ``then()`` names an event to send in the same write
    (the host's ``idle``: the engine then reuses the host the moment the item is done).

    An answer to the same request stored earlier (judged by another scorer, or by an
    earlier version of this one) is re-scored instead of bought again: looked up here,
    after the claim, so the lookahead pays nothing for it."""
    if job.reuse_answers and job.rescore_from is None:
        request_key = job.identity.get("request_key")
        answer = store.answer_for(request_key) if isinstance(request_key, str) else None
        if answer is not None:
            job = dataclasses.replace(job, rescore_from=answer)
    result = execute(job, send, task_deadline=deadline)
    store.put(result, holder=holder)
    after = then() if then is not None else ""
    send("result", result.to_dict(), after)


def child_main(
    job: Job, fd: int, token: str, deadline: float, store: ResultStore, holder: ClaimHolder
) -> NoReturn:  # pragma: no cover - runs in the child, measured by the tests' outcomes
    """Body of an item's forked child: run the item, store its result (dropping ``holder``'s
    claim), send it to the parent through ``fd``. Never returns."""
    code = 0
    try:
        send = _sender(fd)
        _become_item_process(send)
        proc.tag_process(token)
        proc.set_child_subreaper()  # what the item leaves stays our descendant, found below

        def then() -> str:
            _clean_up_after_item(None, token)  # before the result counts (no cgroup here:
            return ""  # the engine kills this child's cgroup, if it has one, at its exit)

        _run_item(job, send, deadline, store, holder, then=then)
    except BaseException:  # noqa: BLE001 - reported to the parent, which records a crash
        code = 1
        _report_crash(fd)
    finally:
        os._exit(code)


#: Items an item host runs before it is replaced by a fresh one (bounds any slow leak).
HOST_MAX_ITEMS = 500


def read_message(fd: int) -> bytes | None:
    """One length-prefixed message from ``fd`` (blocking); None at end of file."""
    head = _read_exact(fd, 4)
    if head is None:
        return None
    return _read_exact(fd, int.from_bytes(head, "big"))


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        try:
            chunk = os.read(fd, left)
        except InterruptedError:
            continue
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _clean_up_after_item(group: Cgroup | None, token: str) -> bool:
    """Kill whatever the item left running; whether it left anything (a process or a
    thread: the host is then replaced, so no item inherits another's leftovers)."""
    me = os.getpid()
    if group is not None:
        # The cgroup lists every process the item started, whatever it did to hide.
        left = bool(group.pids() - {me})
        if left:
            group.kill(spare=me)
    else:
        # The host is a subreaper: whatever the item started and did not wait for is still
        # our descendant (a live child: one ``waitpid`` tells), and is found from here.
        left = _reap_children() is not None and bool(proc.kill_leftovers(token))
    return _reap_children() is not None or left or threading.active_count() > 1


def _encoded(env: dict[str, str] | None) -> dict[bytes, bytes] | None:
    """``env`` as ``os.environ`` holds it (bytes), to compare the two as dicts in C."""
    if env is None:
        return None
    encode = os.fsencode
    return {encode(k): encode(v) for k, v in env.items()}


def _environ_bytes() -> Mapping[bytes, bytes]:
    """The process environment without decoding every entry (``os.environ == dict`` decodes
    each key and value in Python, ~0.1 ms per item); ``os.environb`` is its bytes view."""
    return getattr(os.environ, "_data", None) or os.environb


def _reap_children() -> int | None:
    """Reap exited children; how many live ones remain unreaped (0 or 1: "some"), or None
    when there are no children at all."""
    try:
        while True:
            pid, _status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                return 1
    except ChildProcessError:
        return None


def host_main(
    jobs_fd: int, fd: int, stores: Callable[[StoreRef], ResultStore],
    group: Cgroup | None = None,
) -> NoReturn:  # pragma: no cover - runs in the host, measured by the tests' outcomes
    """Body of an item host: run the items the engine sends through ``jobs_fd``, one at a
    time, each as ``child_main`` would; say ``idle`` after each. Leaves (so that the engine
    starts a fresh host) at end of input, after ``HOST_MAX_ITEMS`` items, after an item that
    left a process or a thread behind (killed before its result is sent), and after any
    failure outside the item's own code. ``group``: the host's own cgroup, if it has one."""
    import pickle

    code = 0
    send = _sender(fd)
    base_env: dict[str, str] | None = None
    wanted: dict[bytes, bytes] | None = None
    try:
        _become_item_process(send)
        proc.set_child_subreaper()
        for served in range(1, HOST_MAX_ITEMS + 1):
            message = read_message(jobs_fd)
            if message is None:
                break
            try:
                spawn = pickle.loads(message)
                if list(spawn.sys_path) != sys.path:
                    sys.path[:] = spawn.sys_path
                if spawn.cwd != os.getcwd():
                    os.chdir(spawn.cwd)
                # Each item starts from the pytest process's environment (sent when it
                # changed), whatever the item before changed in this host's.
                base_env = spawn.env if spawn.env is not None else base_env
                # The token the last item was tagged with is no change of its own (it is set
                # again below); counting it made every item rebuild the environment.
                os.environ.pop(proc.TOKEN_ENV, None)
                if spawn.env is not None:
                    wanted = _encoded(base_env)
                if base_env is not None and _environ_bytes() != wanted:
                    os.environ.clear()
                    os.environ.update(base_env)
                store = stores(spawn.store)
            except Exception as exc:  # noqa: BLE001 - the engine forks this item itself
                send("refused", f"{type(exc).__name__}: {exc}",
                     "" if served == HOST_MAX_ITEMS else "idle")
                continue
            proc.tag_process(spawn.token)
            last = served == HOST_MAX_ITEMS
            leaving = False

            def then(last: bool = last, token: str = spawn.token) -> str:
                nonlocal leaving
                leaving = _clean_up_after_item(group, token) or last
                return "" if leaving else "idle"

            _run_item(spawn.job, send, spawn.deadline, store, spawn.holder, then=then)
            if leaving:
                break
    except BaseException:  # noqa: BLE001 - reported to the parent, which records a crash
        code = 1
        _report_crash(fd)
    finally:
        os._exit(code)
