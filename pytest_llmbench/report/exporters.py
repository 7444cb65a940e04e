"""Result exporters: the seam through which a run's records leave it (JSONL, HTML, yours).

An exporter is fed on the process that reports the items: the xdist controller under
``-n W`` (each record travels there inside its item's report), the pytest process in a
plain run. The plugin asks every ``pytest_llmbench_exporters(config)`` implementation for
a list (the plugin's own returns the JSONL and HTML exporters when their options are set),
then calls ``start`` once, ``add`` once per reported item and ``finish`` once at the end.

This module depends on ``records`` and the standard library only, so a third-party exporter
can be written and tested without pytest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from pytest_llmbench.records import ItemResult

__all__ = ["Exporter", "JsonlExporter", "RunEnd", "RunInfo", "record_of"]


@dataclass(frozen=True, kw_only=True)
class RunInfo:
    """What is known about the run when it starts."""

    run_id: str
    started_at: float
    """Unix time."""
    rootdir: str
    args: tuple[str, ...] = ()
    """The pytest command line's arguments."""
    models: tuple[Mapping[str, Any], ...] = ()
    """One mapping per selected model: ``name``, ``model``, ``base_url`` (``sim`` for the
    simulator), ``price_input`` and ``price_output`` (USD per 1M tokens, or ``None``).
    Never a key."""
    plugin_version: str = ""


@dataclass(frozen=True, kw_only=True)
class RunEnd:
    """What is known when the run ends."""

    finished_at: float
    exitstatus: int
    items: int
    """Items given to ``add``."""
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class Exporter(Protocol):
    """Receives every reported item's result, on the reporting process only.

    ``finish`` returns a line for the terminal summary (e.g. ``wrote 12 records to x``) or
    ``None``. An exporter that raises is reported as a warning; the run's outcome and the
    other exporters are not affected.
    """

    def start(self, run: RunInfo) -> None: ...

    def add(self, result: ItemResult) -> None: ...

    def finish(self, end: RunEnd) -> str | None: ...


def record_of(result: ItemResult) -> dict[str, Any]:
    """The stored record plus ``cached``: what the JSONL and HTML exports hold per item."""
    record = result.to_dict()
    record["cached"] = result.cached
    return record


class JsonlExporter:
    """One JSON object per item, streamed to a temporary file that replaces ``path`` at the
    end (a reader never sees half a file; an interrupted run leaves the old file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._fh: IO[str] | None = None
        self.count = 0

    def start(self, run: RunInfo) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self._tmp.open("w", encoding="utf-8")

    def add(self, result: ItemResult) -> None:
        assert self._fh is not None, "start() first"
        self._fh.write(
            json.dumps(record_of(result), ensure_ascii=False, sort_keys=True, default=str) + "\n"
        )
        self.count += 1

    def finish(self, end: RunEnd) -> str | None:
        if self._fh is None:
            return None
        self._fh.close()
        self._fh = None
        self._tmp.replace(self.path)
        return f"wrote {self.count} records to {self.path}"
