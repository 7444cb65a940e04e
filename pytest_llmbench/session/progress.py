"""Live progress on the terminal, drawn on the line below pytest's own progress.

pytest writes its dots on the current line; the progress line sits on the line below and is
redrawn in place (ANSI: clear line, cursor up, back to pytest's column). It is erased before
every pytest hook that may write (``logstart``/``logreport``/``logfinish``, and the end of
the session) and drawn again after, so pytest's output is never interleaved with it; a
thread redraws it once a second while pytest is quiet (a stuck item grows its elapsed time).
Under ``-n W`` it runs on the controller only: each worker sends the items its engine has in
flight with its reports (``llmbench_inflight``, a JSON string: extra report attributes
travel with xdist's serialisation).

``--llmbench-progress=auto`` (the default) draws only on a terminal and not with ``-q``;
``on`` forces it (tests), ``off`` never.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_llmbench.errors import ConfigError
from pytest_llmbench.report.progress import Progress

if TYPE_CHECKING:
    from pytest_llmbench.records import ItemResult
    from pytest_llmbench.session.run import LLMBenchSession

INFLIGHT_ATTR = "llmbench_inflight"
#: Seconds between redraws while pytest is quiet.
REFRESH = 1.0
MODES = ("auto", "on", "off")


def progress_mode(config: pytest.Config) -> str:
    mode = config.getoption("llmbench_progress", None) or config.getini("llmbench_progress") or "auto"
    if mode not in MODES:
        raise ConfigError(f"llmbench_progress: expected one of auto, on, off; got {mode!r}")
    return str(mode)


def _wanted(config: pytest.Config, mode: str) -> bool:
    if mode != "auto":
        return mode == "on"
    # pytest's terminal reporter is not registered yet (plugins configure before it): ask
    # the stream it will write to, as it will.
    if config.get_verbosity() < 0 or getattr(config.option, "collectonly", False):
        return False
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty())


def install(config: pytest.Config, session: LLMBenchSession) -> None:
    """Register the progress plugin where it has a job: the reporting process when progress
    is wanted; an xdist worker when the controller asked for its in-flight items."""
    workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
    if workerinput is not None:
        if workerinput.get("llmbench_progress"):
            config.pluginmanager.register(WorkerState(session), "llmbench-progress")
        return
    if _wanted(config, progress_mode(config)):
        config.pluginmanager.register(LiveProgress(config, session), "llmbench-progress")


class WorkerState:
    """xdist worker: put this worker's items in flight on each suite item's setup report."""

    def __init__(self, session: LLMBenchSession) -> None:
        self.session = session

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if call.when == "setup":
            setattr(report, INFLIGHT_ATTR, json.dumps(self.session.in_flight()))
        return report


class LiveProgress:
    """The reporting process: counts, the line, and drawing it around pytest's output."""

    def __init__(self, config: pytest.Config, session: LLMBenchSession) -> None:
        self.config = config
        self.session = session
        prices = {m.name: (m.price_input or 0.0, m.price_output or 0.0)
                  for m in session.settings.models
                  if m.price_input is not None or m.price_output is not None}
        self.state = Progress(started=time.time(), prices=prices)
        self.lock = threading.RLock()
        self.drawn = False
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.fd: int | None = None
        """A duplicate of the terminal's file descriptor (-1: write to the file object)."""

    # --- state ---------------------------------------------------------------------------

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["llmbench_progress"] = True

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.state.total = max(self.state.total, len(ids))

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if not getattr(self.config, "workerinput", None):
            self.state.total = max(self.state.total, len(session.items))

    def pytest_llmbench_result(self, result: ItemResult) -> None:
        self.state.add(result)

    def _update_in_flight(self, report: pytest.TestReport | None = None) -> None:
        raw = getattr(report, INFLIGHT_ATTR, None) if report is not None else None
        if isinstance(raw, str):
            try:
                items = [(str(n), float(s)) for n, s in json.loads(raw)]
            except (ValueError, TypeError):
                return
            self.state.set_in_flight(str(getattr(report, "worker_id", "worker")), items)
        else:
            self.state.set_in_flight("local", self.session.in_flight())

    # --- drawing around pytest's own output ----------------------------------------------

    def _reporter(self) -> Any:
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _write(self, text: str) -> None:
        reporter = self._reporter()
        if reporter is None:
            return
        file = reporter._tw._file
        if self.fd is None:
            # The first call runs in a pytest hook, where output capture is suspended, so
            # the terminal's fd is the terminal: keep a duplicate. The refresh thread draws
            # while an item's setup runs, when capture has fd 1 pointing at its temp file.
            try:
                self.fd = os.dup(file.fileno())
            except (AttributeError, OSError, ValueError):  # no real file (in-process tests)
                self.fd = -1
        # Never through TerminalWriter.write: it would count these characters as part of
        # pytest's current line (it tracks the column for its right-aligned percentages).
        file.flush()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, text.encode("utf-8", "replace"))
        else:
            file.write(text)
            file.flush()

    def _back_to_column(self) -> str:
        reporter = self._reporter()
        column = reporter._tw.width_of_current_line if reporter is not None else 0
        return "\x1b[1A\r" + (f"\x1b[{column}C" if column else "")

    def draw(self) -> None:
        with self.lock:
            if self.stopped.is_set():
                return
            reporter = self._reporter()
            width = reporter._tw.fullwidth if reporter is not None else 80
            if not self.config.pluginmanager.has_plugin("dsession"):  # not the xdist controller
                self._update_in_flight()
            line = self.state.line(time.time(), width - 1)
            self._write("\n\r\x1b[2K" + line + self._back_to_column())
            self.drawn = True
            if self.thread is None:
                self.thread = threading.Thread(target=self._refresh, name="llmbench-progress",
                                               daemon=True)
                self.thread.start()

    def erase(self) -> None:
        with self.lock:
            if self.drawn:
                self._write("\n\r\x1b[2K" + self._back_to_column())
                self.drawn = False

    def _refresh(self) -> None:
        while not self.stopped.wait(REFRESH):
            # Only while drawn: between an erase and the next draw pytest is writing.
            if self.lock.acquire(timeout=0.1):
                try:
                    if self.drawn:
                        self.draw()
                finally:
                    self.lock.release()

    def _around(self) -> Generator[None, Any, Any]:
        """Erase before pytest writes, draw again after; the lock keeps the refresh thread
        out in between."""
        with self.lock:
            self.erase()
            try:
                return (yield)
            finally:
                self.draw()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logstart(self) -> Generator[None, Any, Any]:
        return (yield from self._around())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> Generator[None, Any, Any]:
        if hasattr(report, INFLIGHT_ATTR):
            self._update_in_flight(report)
        return (yield from self._around())

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_logfinish(self, nodeid: str) -> Generator[None, Any, Any]:
        self.state.finished(nodeid)
        return (yield from self._around())

    def stop(self) -> None:
        with self.lock:
            self.erase()
            self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout=2 * REFRESH)
            self.thread = None
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self) -> None:
        self.stop()

    def pytest_unconfigure(self) -> None:
        self.stop()
