"""Every item's record travels in its report to the process that reports it, and is fed there
to ``pytest_llmbench_result`` and to the exporters.

Where records come from:

- a suite item (``LLMItem``) puts its ``ItemResult`` on its *setup* report (the phase that
  waits for the result; it is the one report every item has);
- a plain test that used the ``llm`` fixture gets one record built from its calls, on its
  *teardown* report, with the same JUnit properties as a suite item; it is summarised
  under its module (the "suite") and the model(s) it called.

In an xdist worker the record is a JSON string attribute of the report (``llmbench_record``):
pytest copies a report's extra attributes when it serialises it, so xdist carries it to the
controller unchanged, and a string crosses execnet whatever the result holds (a TOML date
as ``expected``, say); the controller's ``pytest_runtest_logreport`` turns it back into an
``ItemResult``. A plain run keeps the ``ItemResult`` itself until its report is logged (no
JSON round trip). Either way the reporting process calls ``pytest_llmbench_result`` once
and feeds every exporter. The controller's summary and exports are therefore complete whatever the
workers' file systems hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pytest_llmbench.records import ERROR, FAILED, PASSED, Completion, ItemResult, Message
from pytest_llmbench.report.exporters import Exporter, JsonlExporter, RunEnd, RunInfo
from pytest_llmbench.version import plugin_version as _plugin_version

if TYPE_CHECKING:
    from pytest_llmbench.config import Settings
    from pytest_llmbench.report.summary import RunTally
    from pytest_llmbench.session.runlog import ItemFacts

log = logging.getLogger("pytest_llmbench.export")

RECORD_ATTR = "llmbench_record"
EXPORT_KEY = pytest.StashKey["ExportHub"]()
CALLS_KEY = pytest.StashKey[list["Call"]]()
_OUTCOMES_KEY = pytest.StashKey[dict[str, Any]]()


class RunServices(Protocol):
    """What the hub needs of the run (``LLMBenchSession``; a protocol, so this module does
    not import ``session/run.py``, which reads the hub's results for its summary)."""

    is_worker: bool
    run_id: str
    settings: Settings

    def properties(self, result: ItemResult) -> list[tuple[str, object]]: ...


class Call:
    """One ``llm.chat`` call of a plain test, as its record shows it."""

    __slots__ = ("messages", "model", "completion", "error", "error_class", "started")

    def __init__(self, messages: list[Message], model: str, started: float) -> None:
        self.messages = messages
        self.model = model
        self.started = started
        self.completion: Completion | None = None
        self.error = ""
        self.error_class: str | None = None


class ExportHub:
    """Registered on every pytest process; feeds hooks and exporters on the reporting one."""

    def __init__(self, config: pytest.Config, session: RunServices) -> None:
        self.config = config
        self.session = session
        self.is_worker = session.is_worker
        self._tally: RunTally | None = None
        self.facts: dict[str, ItemFacts] = {}
        """Key -> what the run's manifest needs of each record reported."""
        self.exporters: list[Exporter] = []
        self.messages: list[str] = []
        self._started = False
        self._run: RunInfo | None = None
        self._items: dict[str, pytest.Item] = {}
        """Plain runs: the item of a report carrying a record, until the report is seen."""
        self._records: dict[str, ItemResult] = {}
        """Plain runs: the record of an item's setup (suite item) or teardown (``llm`` test)
        report, until that report is seen (the record is not put on the report itself)."""

    @property
    def tally(self) -> RunTally:
        """The summary's figures of every record reported (the controller's, under xdist);
        the records themselves go to the exporters and are not kept. Made on first use:
        xdist workers report nothing and do not import the summary."""
        if self._tally is None:
            from pytest_llmbench.report.summary import RunTally

            self._tally = RunTally()
        return self._tally

    # --- on the process that runs the item: put the record on the report ---------------

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        from pytest_llmbench.collect.items import LLMItem

        if isinstance(item, LLMItem):
            report = yield
            if call.when == "setup" and item.result is not None:
                self._attach(report, item, item.result)
            return report
        calls = item.stash.get(CALLS_KEY, None)
        if calls is None:
            return (yield)
        outcomes = item.stash.setdefault(_OUTCOMES_KEY, {})
        result = None
        if call.when == "teardown":
            result = plain_test_result(item.nodeid, calls, outcomes, self.session.run_id)
            if result is not None:
                # Before the report is made: it copies the item's user properties.
                for name, value in self.session.properties(result):
                    item.user_properties.append((name, value))
        report = yield
        outcomes[call.when] = (report.outcome, call.excinfo.value if call.excinfo else None)
        if result is not None:
            self._attach(report, item, result)
        return report

    def check(self) -> None:
        """The HTML file can be written: a bad path is one usage error now, not a traceback
        after the run (raises ``ConfigError``)."""
        html = output_path(self.config, "llmbench_html")
        if html is not None and not self.is_worker:
            from pytest_llmbench.config import check_output_file

            check_output_file(html, "--llmbench-html")

    def _attach(self, report: pytest.TestReport, item: pytest.Item, result: ItemResult) -> None:
        """Put the record on ``report``. A worker's report crosses execnet: the record goes
        as JSON text. A plain run reports in this process: the result itself is kept for
        ``pytest_runtest_logreport``, by node id (a JSON round trip per item was ~3 % of the
        pytest process's CPU at zero latency)."""
        if self.is_worker:
            setattr(report, RECORD_ATTR, _dumps(result))
            return
        self._items[item.nodeid] = item
        self._records[item.nodeid] = result

    # --- on the reporting process: hook, exporters, summary ----------------------------

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        kept = self._records.pop(report.nodeid, None)  # put there by this phase's makereport
        raw = getattr(report, RECORD_ATTR, None)
        if kept is not None:
            result = kept
        elif not isinstance(raw, str):
            return
        else:
            try:
                data = json.loads(raw)
                cached = bool(data.pop("cached", False))
                result = ItemResult.from_dict(data)
            except (ValueError, TypeError) as exc:
                log.warning("%s: unreadable record in the report (%s)", report.nodeid, exc)
                return
            result.cached = cached
        from pytest_llmbench.session.runlog import ItemFacts

        self.tally.add(result)
        self.facts[result.key] = ItemFacts.of(result)
        item = self._items.pop(report.nodeid, None)
        self.config.hook.pytest_llmbench_result(result=result, item=item, nodeid=report.nodeid)
        self._start()
        for exporter in list(self.exporters):
            self._guard(exporter, "add", lambda e=exporter: e.add(result))

    def pytest_llmbench_exporters(self, config: pytest.Config) -> list[Exporter]:
        """The plugin's own exporters: JSONL and HTML, when their options are set."""
        exporters: list[Exporter] = []
        if self.session.settings.jsonl is not None:
            exporters.append(JsonlExporter(self.session.settings.jsonl))
        html = output_path(config, "llmbench_html")
        if html is not None:
            from pytest_llmbench.report.html import HtmlExporter

            exporters.append(HtmlExporter(html))
        return exporters

    def run_info(self) -> RunInfo:
        if self._run is None:
            self._run = RunInfo(
                run_id=self.session.run_id,
                started_at=time.time(),
                rootdir=str(self.config.rootpath),
                args=tuple(str(a) for a in self.config.invocation_params.args),
                models=tuple(
                    {"name": m.name, "model": m.model, "base_url": m.base_url,
                     "price_input": m.price_input, "price_output": m.price_output}
                    for m in self.session.settings.models
                ),
                plugin_version=_plugin_version(),
            )
        return self._run

    def pytest_sessionstart(self) -> None:
        if not self.is_worker:
            self.run_info()  # the start time

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        for batch in self.config.hook.pytest_llmbench_exporters(config=self.config):
            self.exporters.extend(batch or ())
        run = self.run_info()
        for exporter in list(self.exporters):
            self._guard(exporter, "start", lambda e=exporter: e.start(run))

    def _guard(self, exporter: Exporter, stage: str, call: Any) -> Any:
        """One exporter failing is a warning, and that exporter is dropped; never the run."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - a third-party exporter may raise anything
            name = type(exporter).__name__
            log.warning("exporter %s failed in %s: %s", name, stage, exc, exc_info=True)
            self.messages.append(f"exporter {name} failed in {stage}: {exc} (dropped)")
            if exporter in self.exporters:
                self.exporters.remove(exporter)
            return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_worker or getattr(self.config.option, "collectonly", False):
            return
        if not self.tally.items and not self._started:
            return
        self._start()
        end = RunEnd(finished_at=time.time(), exitstatus=int(exitstatus), items=self.tally.items)
        for exporter in list(self.exporters):
            line = self._guard(exporter, "finish", lambda e=exporter: e.finish(end))
            if line:
                self.messages.append(str(line))

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.messages:
            terminalreporter.write_line(f"llmbench: {line}")


def output_path(config: pytest.Config, name: str) -> Any:
    """The path of an output option (``--NAME`` or its ini twin), relative to where pytest
    was started; ``None`` when unset."""
    from pathlib import Path

    raw = config.getoption(name, None) or config.getini(name)
    if not raw:
        return None
    path = Path(str(raw)).expanduser()
    return path if path.is_absolute() else Path(config.invocation_params.dir) / path


def _dumps(result: ItemResult) -> str:
    from pytest_llmbench.report.exporters import record_of

    return json.dumps(record_of(result), ensure_ascii=False, default=str)


def _test_status(outcomes: dict[str, Any]) -> tuple[str, str | None, str]:
    """(status, error class, error) of a plain test from its phases' outcomes: an API error
    is an error with its class; another failure in setup ``test_error``; in the test, a
    failure (the model's answer did not pass the test's assertions)."""
    from pytest_llmbench.errors import APIError

    for when in ("setup", "call"):
        outcome, exc = outcomes.get(when, ("passed", None))
        if outcome != "failed":
            continue
        if isinstance(exc, APIError):
            return ERROR, exc.error_class, str(exc)
        if when == "setup":
            return ERROR, "test_error", f"{type(exc).__name__}: {exc}"
        return FAILED, None, f"{type(exc).__name__}: {exc}"
    return PASSED, None, ""


def _transcript(calls: list[Call]) -> tuple[list[Message], list[dict[str, Any]]]:
    from pytest_llmbench.records import to_jsonable

    messages: list[Message] = []
    completions: list[dict[str, Any]] = []
    for c in calls:
        messages.extend(c.messages)
        if c.completion is not None:
            messages.append(c.completion.assistant_message())
            completions.append(to_jsonable(c.completion))
    return messages, completions


def plain_test_result(
    nodeid: str, calls: list[Call], outcomes: dict[str, Any], run_id: str
) -> ItemResult | None:
    """The record of a plain test that called ``llm``: its outcome, its calls' transcript,
    tokens and latency. ``None`` for a test that made no call or was skipped."""
    if not calls or any(o == "skipped" for o, _ in outcomes.values()):
        return None
    status, error_class, error = _test_status(outcomes)
    messages, completions = _transcript(calls)
    done = [c.completion for c in calls if c.completion is not None]
    module, _, name = nodeid.partition("::")
    return ItemResult(
        key="test-" + hashlib.sha256(nodeid.encode()).hexdigest()[:32],
        identity={"suite": module, "suite_path": module, "prompt": name, "instance": "",
                  "model": "+".join(sorted({c.model for c in calls})), "repeat": 0,
                  "nodeid": nodeid, "kind": "test", "run_id": run_id},
        status=status, error_class=error_class, error=error,
        messages=messages, completions=completions,
        answer=done[-1].text if done else None,
        score={PASSED: 1.0, FAILED: 0.0}.get(status),
        explanation=error if status == FAILED else "",
        started_at=calls[0].started,
        latency=sum(c.latency for c in done),
        prompt_tokens=sum(c.prompt_tokens for c in done),
        completion_tokens=sum(c.completion_tokens for c in done),
        attempts=[{"turn": i, "outcome": "ok" if c.completion else (c.error_class or "error")}
                  for i, c in enumerate(calls)],
    )


__all__ = ["CALLS_KEY", "EXPORT_KEY", "Call", "ExportHub", "output_path", "plain_test_result"]
