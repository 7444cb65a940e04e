"""The item's side: what an item process runs.

An item runs either in an *item host* (``host_main``: a process forked by the fork server,
see ``forkserver.py``, that runs the engine's items one at a time, or, for items that run
only this package's code, several at once, a thread each: ``_Shared``) or in a child the
pytest process forked for it alone (``child_main``). Either way the process leads its own
process group, ships its log records, attempts and result to the parent as JSON lines on a
pipe, writes its result to the store *before* sending it, and is killed, group and token
holders included, at the task deadline (a host shared by several items: once its other
items are done). An item that has its process to itself carries its token
(``proc.tag_process``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
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


def _sender(fd: int, lock: threading.Lock | None = None) -> Callable[..., None]:
    """``send(kind, data, then="", token="")``: one event line (and ``then``'s) in one write.
    ``token`` tags the line with the item it is about (items sharing a host, see
    ``host_main``); ``lock`` serializes the writes of such items' threads (a line over
    ``PIPE_BUF`` may be written in parts, and two threads' parts would interleave)."""

    def write(payload: bytes) -> None:
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

    def send(kind: str, data: Any, then: str = "", token: str = "") -> None:
        event = [kind, data, token] if token else [kind, data]
        line = json.dumps(event, default=str) + "\n"
        if then:
            line += json.dumps([then, None]) + "\n"
        if lock is None:
            write(line.encode())
            return
        with lock:
            write(line.encode())

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
    shared: contextlib.AbstractContextManager[Any] | None = None,
) -> None:
    """Run, store, send the result; ``then()`` names an event to send in the same write
    (the host's ``idle``: the engine then reuses the host the moment the item is done).
    ``shared``: the item shares its host with others; held around the store's calls (a
    ``ResultStore`` is used by one thread at a time unless it is ``threadsafe``).

    An answer to the same request stored earlier (judged by another scorer, or by an
    earlier version of this one) is re-scored instead of bought again: looked up here,
    after the claim, so the lookahead pays nothing for it."""
    guard = shared if shared is not None else contextlib.nullcontext()
    if job.reuse_answers and job.rescore_from is None:
        request_key = job.identity.get("request_key")
        with guard:
            answer = store.answer_for(request_key) if isinstance(request_key, str) else None
        if answer is not None:
            job = dataclasses.replace(job, rescore_from=answer)
    result = execute(job, send, task_deadline=deadline)
    if shared is None or time.monotonic() < deadline + LATE_PUT:
        # (An item sharing its host is not killed at its deadline, its host is, later: a
        # result that late lost to the engine's ``task_timeout`` record and is not stored.)
        with guard:
            store.put(result, holder=holder)
    after = then() if then is not None else ""
    send("result", result.to_dict(), after)


#: Seconds past its deadline after which an item sharing a host no longer stores its
#: result: the engine records ``task_timeout`` at the deadline plus ``KILL_SLACK`` (0.25 s).
LATE_PUT = 0.1


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


def _clean_up_after_item(group: Cgroup | None, token: str | None,
                         threads: Callable[[], int] = threading.active_count) -> bool:
    """Kill whatever the item left running; whether it left anything (a process or a
    thread: the host is then replaced, so no item inherits another's leftovers).
    ``token``: None for items sharing a host, which tag no process (their leftovers, if
    any, end with the host); ``threads()``: the threads that are not the host's own."""
    me = os.getpid()
    if group is not None:
        # The cgroup lists every process the item started, whatever it did to hide.
        left = bool(group.pids() - {me})
        if left:
            group.kill(spare=me)
    elif token is None:
        left = _reap_children() is not None
    else:
        # The host is a subreaper: whatever the item started and did not wait for is still
        # our descendant (a live child: one ``waitpid`` tells), and is found from here.
        left = _reap_children() is not None and bool(proc.kill_leftovers(token))
    return _reap_children() is not None or left or threads() > 1


class _Shared:
    """The items a host runs at once, a thread each (``Job.shareable``: items that run only
    this package's code, so no item can leave a process, change the environment or block
    past its deadline; the engine sends such items to one host while it has room).

    The threads are the host's, kept from one item to the next (``_work``), not one per
    item: a ``Thread.start`` waits for the new thread to take the GIL, and while the host's
    other items hold it (building requests, parsing answers) the job pipe was read one
    item per GIL hand-over. A new thread is started only when every one is busy, so a host
    has as many as it ever ran items at once. Each item runs in a fresh ``contextvars``
    context, as in a new thread."""

    def __init__(self, group: Cgroup | None) -> None:
        self.group = group
        self.lock = threading.Lock()
        """Held while ``active``/``leaving`` change, and around a job's start."""
        self.write_lock = threading.Lock()
        self.store_lock = threading.Lock()
        self.active = 0
        self.leaving = False
        """An item left something behind: every job from now on is refused."""
        self.threads: set[threading.Thread] = set()
        """The host's item threads (none of them is a stray)."""
        self.jobs: queue.SimpleQueue[tuple[Any, ResultStore, Callable[..., None]] | None] = (
            queue.SimpleQueue())

    def stray_threads(self) -> int:
        """Live threads that are neither the host's main thread nor an item's."""
        items = self.threads
        return sum(1 for t in threading.enumerate() if t not in items)

    def start(self, spawn: Any, store: ResultStore, send: Callable[..., None]) -> None:
        """Hand ``spawn`` to an item thread (``lock`` held)."""
        self.active += 1
        if self.active > len(self.threads):
            # Every thread is busy with an item (one that has just ended picks up the next
            # job as soon as its result is sent, which is why ``active`` is compared, not
            # the threads waiting).
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"item-thread-{len(self.threads) + 1}")
            self.threads.add(thread)
            thread.start()
        self.jobs.put((spawn, store, send))

    def _work(self) -> None:
        tid = threading.get_native_id()
        while (job := self.jobs.get()) is not None:
            contextvars.Context().run(self._run, *job, tid)

    def _run(self, spawn: Any, store: ResultStore, send: Callable[..., None], tid: int) -> None:
        token = spawn.token

        def tagged(kind: str, data: Any, then: str = "") -> None:
            send(kind, data, then, token)

        ended = False

        def then() -> str:
            nonlocal ended
            ended = True
            return self._ended()

        try:
            tagged("thread", tid)  # its own CPU time: stragglers
            guard = (contextlib.nullcontext() if getattr(store, "threadsafe", False) is True
                     else self.store_lock)
            _run_item(spawn.job, tagged, spawn.deadline, store, spawn.holder, then=then,
                      shared=guard)
        except BaseException:  # noqa: BLE001 - reported: the engine records a crash
            after = "" if ended else self._ended()
            with contextlib.suppress(Exception):
                send("crash", traceback.format_exc(), after, token)

    def _ended(self) -> str:
        """One item is done: ``idle`` (room for another) or ``leave`` (the host takes no
        more: it refuses what the engine sent meanwhile, and leaves at the end of its job
        pipe)."""
        with self.lock:
            self.active -= 1
            if self.active == 0 and not self.leaving:
                self.leaving = _clean_up_after_item(self.group, None, self.stray_threads)
            return "leave" if self.leaving else "idle"

    def join(self) -> None:
        """At the end of the job pipe: the items in flight finish (each by its deadline),
        then the threads end."""
        threads = list(self.threads)
        for _ in threads:
            self.jobs.put(None)
        for thread in threads:
            thread.join()


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
    """Body of an item host: run the items the engine sends through ``jobs_fd``, each as
    ``child_main`` would; say ``idle`` after each. An item of a ``shareable`` job runs in a
    thread, beside the host's other such items (``_Shared``); any other item runs alone
    (the engine sends it only to a host with nothing in flight). Leaves (so that the engine
    starts a fresh host) at end of input (once its items in flight are done), after
    ``HOST_MAX_ITEMS`` items, after an item that left a process or a thread behind (killed
    before its result is sent), and after any failure outside the items' own code.
    ``group``: the host's own cgroup, if it has one."""
    code = 0
    shared = _Shared(group)
    send = _sender(fd, shared.write_lock)
    state = _HostState(stores)
    try:
        _become_item_process(send)
        proc.set_child_subreaper()
        for served in range(1, HOST_MAX_ITEMS + 1):
            message = read_message(jobs_fd)
            if message is None:
                break
            last = served == HOST_MAX_ITEMS
            with shared.lock:
                loaded = state.load(message, shared)
                if isinstance(loaded, str):
                    send("refused", loaded, "" if last else "idle", state.token)
                    continue
                spawn, store = loaded
                if spawn.job.shareable:
                    shared.start(spawn, store, send)
                    continue
            if _run_alone(spawn, store, send, group, last, shared.stray_threads):
                break
        shared.join()
    except BaseException:  # noqa: BLE001 - reported to the parent, which records a crash
        code = 1
        _report_crash(fd)
    finally:
        os._exit(code)


class _HostState:
    """What a host carries from one job to the next: the environment it was sent."""

    def __init__(self, stores: Callable[[StoreRef], ResultStore]) -> None:
        self.stores = stores
        self.base_env: dict[str, str] | None = None
        self.wanted: dict[bytes, bytes] | None = None
        self.token = ""
        """The token of the job being loaded (tags a refusal of a shared item)."""

    def load(self, message: bytes, shared: _Shared) -> tuple[Any, ResultStore] | str:
        """The job in ``message`` and its store, the host made ready for it; or why the
        host refuses it (the engine then forks the item itself)."""
        import pickle

        self.token = ""
        try:
            spawn = pickle.loads(message)
            self.token = spawn.token if spawn.job.shareable else ""
            if shared.leaving:
                return "the host is leaving"
            busy = shared.active > 0
            if busy and (not spawn.job.shareable or spawn.env is not None
                         or list(spawn.sys_path) != sys.path or spawn.cwd != os.getcwd()):
                return "the host runs items that need its environment as it is"
            if list(spawn.sys_path) != sys.path:
                sys.path[:] = spawn.sys_path
            if spawn.cwd != os.getcwd():
                os.chdir(spawn.cwd)
            # Each item starts from the pytest process's environment (sent when it
            # changed), whatever the item before changed in this host's.
            self.base_env = spawn.env if spawn.env is not None else self.base_env
            if not busy:
                # The token the last item was tagged with is no change of its own (it is
                # set again for an item that runs alone); counting it made every item
                # rebuild the environment.
                os.environ.pop(proc.TOKEN_ENV, None)
                if spawn.env is not None:
                    self.wanted = _encoded(self.base_env)
                if self.base_env is not None and _environ_bytes() != self.wanted:
                    os.environ.clear()
                    os.environ.update(self.base_env)
            return spawn, self.stores(spawn.store)
        except Exception as exc:  # noqa: BLE001 - the engine forks this item itself
            return f"{type(exc).__name__}: {exc}"


def _run_alone(spawn: Any, store: ResultStore, send: Callable[..., None],
               group: Cgroup | None, last: bool, threads: Callable[[], int]) -> bool:
    """Run an item that has the host to itself; whether the host leaves after it.
    ``threads()``: the live threads that are not the host's (``_Shared.stray_threads``:
    the threads kept for shared items are the host's)."""
    proc.tag_process(spawn.token)
    leaving = False

    def then(token: str = spawn.token) -> str:
        nonlocal leaving
        leaving = _clean_up_after_item(group, token, threads) or last
        return "" if leaving else "idle"

    _run_item(spawn.job, send, spawn.deadline, store, spawn.holder, then=then)
    return leaving
