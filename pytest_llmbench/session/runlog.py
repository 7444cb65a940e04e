"""The run's manifest, built from the item reports this process sees.

Only the process that sees every report writes it: a plain run, or the xdist controller
(which receives every worker's reports; workers write none). Items are identified by the
``llmbench_key`` and ``source`` properties every suite item's report carries, so the
controller needs neither the items nor the workers' file systems to know what ran.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pytest_llmbench.records import ItemResult
from pytest_llmbench.store.runs import RunItem, RunManifest, command_line, scrub_secrets
from pytest_llmbench.version import plugin_version

if TYPE_CHECKING:
    import pytest

    from pytest_llmbench.config import Settings

log = logging.getLogger("pytest_llmbench.session.runlog")


class ItemFacts(NamedTuple):
    """What a run's manifest needs of an item's record, kept for every reported item in
    place of the record (``of``); looking every record up again at the end of a run of
    100,000 items held ~0.5 GB more in the pytest process. The fields are ``RunItem``'s
    of the same names (a tuple, not a ``RunItem``: ~5x smaller, one per item)."""

    suite: str = ""
    suite_path: str = ""
    prompt: str = ""
    instance: str = ""
    model: str = ""
    repeat: int = 0
    error_class: str | None = None

    @classmethod
    def of(cls, result: ItemResult) -> ItemFacts:
        ident, shared = result.identity, sys.intern  # names repeat across items: one copy
        return cls(
            shared(str(ident.get("suite", ""))), shared(str(ident.get("suite_path", ""))),
            shared(str(ident.get("prompt", ""))), str(ident.get("instance", "")),
            shared(str(ident.get("model", ""))), _int(ident.get("repeat", 0)), result.error_class,
        )


class RunLog:
    """Outcomes of the suite items reported in this run, by node id, in report order."""

    def __init__(self, run_id: str, started_at: float | None = None) -> None:
        self.run_id = run_id
        self.started_at = time.time() if started_at is None else started_at
        self.items: dict[str, dict[str, Any]] = {}

    def add(self, report: pytest.TestReport) -> None:
        """Record one phase's report of a suite item (others are ignored)."""
        props = dict(report.user_properties)
        key = props.get("llmbench_key")
        if not isinstance(key, str):
            return
        entry = self.items.setdefault(report.nodeid, {"key": key, "outcome": "error"})
        entry["key"] = key
        entry["source"] = props.get("source") or (
            "cached" if props.get("cached") == "true" else "ran")
        if report.when == "setup" and report.failed:
            entry["outcome"] = "error"  # could not be judged: API error, timeout, scorer error
        elif report.when == "call":
            entry["outcome"] = "passed" if report.passed else "failed"
        if report.when in ("setup", "call") and not report.passed:
            entry["error_class"] = props.get("error_class") or None

    def manifest(
        self,
        *,
        settings: Settings,
        args: Sequence[str],
        exit_status: int | None,
        facts: Mapping[str, ItemFacts],
    ) -> RunManifest:
        """The manifest; ``facts`` (key -> ``ItemFacts`` of the item's record) supply suite,
        prompt, instance, model and repeat of each item (an item without a record keeps
        its node id)."""
        items = []
        none = ItemFacts()
        for nodeid, entry in self.items.items():
            fact = facts.get(entry["key"], none)
            error_class = entry.get("error_class")
            if error_class is None and entry["outcome"] == "error":
                error_class = fact.error_class
            items.append(RunItem(**{
                **fact._asdict(), "key": entry["key"], "nodeid": nodeid,
                "outcome": entry["outcome"], "source": entry.get("source", "ran"),
                "error_class": error_class,
            }))
        return RunManifest(
            run_id=self.run_id,
            started_at=self.started_at,
            finished_at=time.time(),
            command=command_line(args),
            settings=effective_settings(settings),
            plugin_version=plugin_version(),
            models=tuple(m.name for m in settings.models),
            exit_status=exit_status,
            items=tuple(items),
        )


def effective_settings(settings: Settings) -> dict[str, Any]:
    """The settings as JSON types, without the ``.env`` values and without anything named
    like a secret (keys, tokens, auth headers) or URL credentials."""
    data = {
        f.name: getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name != "env"
    }
    return dict(scrub_secrets(_jsonable(data)))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)  # Path and the like


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0
