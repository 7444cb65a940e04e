"""The item's side of a fork: what a forked child runs, whoever forked it.

The child (forked by the engine or by the fork server, see ``forkserver.py``) leads its own
process group, carries the item's token (``proc.tag_process``), ships its log records,
attempts and result to the parent as JSON lines on a pipe, writes its result to the store
*before* sending it, and leaves with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import proc
from .runner import Job, execute
from .store import ClaimHolder, Store


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


def child_main(
    job: Job, fd: int, token: str, deadline: float, store: Store, holder: ClaimHolder
) -> NoReturn:  # pragma: no cover - runs in the child, measured by the tests' outcomes
    """Body of an item's forked child: run the item, store its result (dropping ``holder``'s
    claim), send it to the parent through ``fd``. Never returns."""
    code = 0
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        proc.tag_process(token)

        def send(kind: str, data: Any) -> None:
            payload = (json.dumps([kind, data], default=str) + "\n").encode()
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

        root = logging.getLogger("pytest_llmbench")
        root.handlers = [_PipeLogHandler(send)]
        root.propagate = False
        root.setLevel(logging.DEBUG)
        result = execute(job, send, task_deadline=deadline)
        store.put(result, holder=holder)
        send("result", result.to_dict())
    except BaseException:  # noqa: BLE001 - reported to the parent, which records a crash
        code = 1
        with contextlib.suppress(OSError):
            os.write(fd, (json.dumps(["crash", traceback.format_exc()]) + "\n").encode())
    finally:
        os._exit(code)
