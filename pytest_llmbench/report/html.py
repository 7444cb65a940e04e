"""One self-contained HTML report: summary table, plots, a filterable items table with every
item's transcript, and optionally a comparison of two runs.

The page opens offline: the plotting library (Chart.js, MIT, vendored minified in
``report/vendor/``), the page's own script and style are inlined, and a Content Security
Policy forbids every fetch (``default-src 'none'``) and lets only those two scripts run (by
their SHA-256). Model output is hostile: the data is embedded as JSON in a
``<script type="application/json">`` with every ``<``, ``>`` and ``&`` escaped as ``\\u00XX``
(nothing in it can close the element), and the page's script writes it with ``textContent``
only, never as HTML.

Size: strings are interned (a system prompt repeated by 10,000 items is stored once) and items
are rows of numbers; 10,000 single-turn items make about 2 MB (``tests/test_html.py``
measures it). Input is plain data, so the same renderer serves a live run (``HtmlExporter``)
and a stored one (``render_html(records, run)``): a list of ``ItemResult.to_dict()`` records
(plus ``cached``), run metadata, and an optional comparison.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from pytest_llmbench.records import ERROR, ItemResult
from pytest_llmbench.report.exporters import RunEnd, RunInfo, record_of
from pytest_llmbench.report.summary import GroupSummary, merge, percentile, summarize

__all__ = ["HtmlExporter", "SuiteRow", "build_data", "comparison_data", "render_html", "write_html"]

#: Longest text kept per message/answer in the page (the store keeps all of it).
MAX_TEXT = 20_000
#: Bins of the latency histogram.
LATENCY_BINS = 20

_MARKER = re.compile(r"/\*@(STYLE|CHARTJS|APP|CSP)@\*/|@@DATA@@")


class _Strings:
    """Interning table: each distinct string is stored once, referenced by its index."""

    def __init__(self) -> None:
        self.table: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, value: object, *, indent: int | None = None) -> int:
        if value is None:
            return -1
        text = value if isinstance(value, str) else json.dumps(
            value, ensure_ascii=False, default=str, indent=indent)
        if len(text) > MAX_TEXT:
            text = text[:MAX_TEXT] + f"\n... [{len(text)} chars; the full text is in the store]"
        index = self._index.get(text)
        if index is None:
            index = self._index[text] = len(self.table)
            self.table.append(text)
        return index


def _outcome(record: Mapping[str, Any]) -> str:
    if record.get("status") == ERROR:
        return "error"
    return str(record.get("status", "?"))


def _message(s: _Strings, message: Mapping[str, Any]) -> list[int]:
    row = [s(message.get("role", "?")), s(message.get("content", ""))]
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    if extra:  # tool calls, tool_call_id, name: shown as JSON
        row.append(s(extra))
    return row


def _detail(s: _Strings, r: Mapping[str, Any]) -> dict[str, Any]:
    details = r.get("details") if isinstance(r.get("details"), Mapping) else {}
    out: dict[str, Any] = {"m": [_message(s, m) for m in r.get("messages") or [] if
                                 isinstance(m, Mapping)]}
    if r.get("answer") is not None:
        out["a"] = s(r.get("answer"))
    if r.get("expected") is not None:
        out["e"] = s(r.get("expected"))
    for key, field in (("x", "explanation"), ("err", "error"), ("dl", "deadline_layer")):
        if r.get(field):
            out[key] = s(r.get(field))
    if details:
        out["d"] = s(details, indent=1)  # program verdicts, test results, scorer details
    transcript = r.get("transcript") or []
    if any(isinstance(e, Mapping) and e.get("kind") in ("tool", "stop") for e in transcript):
        out["tr"] = [_entry(s, e) for e in transcript if isinstance(e, Mapping)]
    attempts = r.get("attempts") or []
    if attempts:
        out["t"] = s(", ".join(str(a.get("outcome")) for a in attempts if isinstance(a, Mapping)))
    return out


def _entry(s: _Strings, e: Mapping[str, Any]) -> list[int]:
    """One agent transcript entry (``ItemResult.transcript``) as [label, text]."""
    kind = e.get("kind")
    if kind == "answer":
        calls = ", ".join(f"{c.get('name')}({c.get('arguments')})"
                          for c in e.get("tool_calls") or () if isinstance(c, Mapping))
        label = f"model call {e.get('call', '')}"
        text = f"calls {calls}" if calls else str(e.get("text", ""))
        text += (f"\n[{e.get('prompt_tokens')}+{e.get('completion_tokens')} tokens,"
                 f" {float(e.get('latency') or 0):.2f} s]")
    elif kind == "tool":
        label = f"tool {e.get('name')}" + ("" if e.get("ok") else " (failed)")
        text = (f"arguments: {e.get('arguments')}\n{e.get('content')}"
                f"\n[{float(e.get('duration') or 0):.2f} s]")
    elif kind == "message":
        label, text = str(e.get("role", "message")), str(e.get("content", ""))
    else:
        label, text = "stopped", f"{e.get('error_class')}: {e.get('detail')}"
    return [s(f"{float(e.get('t') or 0):.2f}s {label}"), s(text)]


def _prices(run: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    prices = {}
    for m in run.get("models") or ():
        pin, pout = m.get("price_input"), m.get("price_output")
        if pin is not None or pout is not None:
            prices[str(m.get("name"))] = (float(pin or 0.0), float(pout or 0.0))
    return prices


def _cost(model: str, tin: int, tout: int, prices: Mapping[str, tuple[float, float]]) -> float | None:
    """USD for these tokens when the model (or every model of ``a+b``) has prices."""
    names = model.split("+")
    if not all(n in prices for n in names) or len(names) != 1:
        return None
    pin, pout = prices[names[0]]
    return (tin * pin + tout * pout) / 1e6


def _group(g: GroupSummary, prices: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    return {
        "suite": g.suite, "model": g.model, "items": g.items, "passed": g.passed,
        "failed": g.failed, "errors": g.errors, "cached": g.cached, "rate": g.pass_rate,
        "lo": g.ci_low, "hi": g.ci_high, "mean_score": g.mean_score,
        "p50": g.p50_latency, "p95": g.p95_latency, "tin": g.prompt_tokens,
        "tout": g.completion_tokens, "errors_by_class": g.errors_by_class,
        "cost": _cost(g.model, g.prompt_tokens, g.completion_tokens, prices),
    }


def _latency_histogram(results: Sequence[ItemResult]) -> dict[str, Any]:
    by_model: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.completions or r.latency > 0:
            by_model[str(r.identity.get("model", "?"))].append(float(r.latency))
    values = sorted(v for vs in by_model.values() for v in vs)
    if not values:
        return {"edges": [], "series": {}}
    top = percentile(values, 99) or values[-1]
    top = top if top > 0 else 1.0
    width = top / LATENCY_BINS
    edges = [round(i * width, 4) for i in range(LATENCY_BINS + 1)]
    series = {}
    for model, vs in sorted(by_model.items()):
        counts = [0] * LATENCY_BINS
        for v in vs:  # the last bin holds everything above the 99th percentile too
            counts[min(int(v / width), LATENCY_BINS - 1)] += 1
        series[model] = counts
    return {"edges": edges, "series": series}


def build_data(
    records: Iterable[Mapping[str, Any]], run: Mapping[str, Any], *,
    comparison: Mapping[str, Any] | None = None, title: str = "pytest-llmbench report",
) -> dict[str, Any]:
    """The page's data: interned strings, item rows, transcripts, summary groups, plots."""
    s = _Strings()
    results: list[ItemResult] = []
    items: list[list[Any]] = []
    details: list[dict[str, Any]] = []
    for record in records:
        data = dict(record)
        cached = bool(data.pop("cached", False))
        result = ItemResult.from_dict(data)
        result.cached = cached
        results.append(result)
        ident = result.identity
        items.append([
            s(ident.get("nodeid", result.key)), s(ident.get("suite", "?")),
            s(ident.get("model", "?")), s(_outcome(data)), s(result.error_class),
            None if result.score is None else round(result.score, 4),
            round(result.latency, 3), result.prompt_tokens, result.completion_tokens,
            int(cached),
        ])
        details.append(_detail(s, data))
    prices = _prices(run)
    summaries = summarize(results)
    groups = [_group(g, prices) for g in summaries]
    total = _group(merge(summaries), prices) if len(summaries) > 1 else None
    if total is not None:
        costs = [g["cost"] for g in groups]
        total["cost"] = sum(costs) if all(c is not None for c in costs) else None
    error_classes = Counter(r.error_class or "unknown" for r in results if r.status == ERROR)
    return {
        "version": 1,
        "title": title,
        "generated_at": time.time(),
        "run": dict(run),
        "strings": s.table,
        "items": items,
        "details": details,
        "groups": groups,
        "total": total,
        "error_classes": sorted(error_classes),
        "latency": _latency_histogram(results),
        "priced": bool(prices),
        "comparison": dict(comparison) if comparison else None,
    }


class SuiteRow(Protocol):
    """One suite of a comparison (what ``report/compare.py``'s ``SuiteComparison`` holds)."""

    @property
    def suite(self) -> str: ...
    @property
    def n_a(self) -> int: ...
    @property
    def passed_a(self) -> int: ...
    @property
    def n_b(self) -> int: ...
    @property
    def passed_b(self) -> int: ...
    @property
    def paired(self) -> int: ...
    @property
    def regressed(self) -> Sequence[str]: ...
    @property
    def improved(self) -> Sequence[str]: ...
    @property
    def p_value(self) -> float: ...


def comparison_data(rows: Iterable[SuiteRow], label_a: str, label_b: str, *,
                    alpha: float = 0.05) -> dict[str, Any]:
    """The page's comparison section from per-suite rows (intervals: Wilson, as the CLI)."""
    from pytest_llmbench.report.summary import wilson_interval

    def side(k: int, n: int) -> dict[str, Any]:
        low, high = wilson_interval(k, n)
        return {"items": n, "passed": k, "rate": k / n if n else None,
                "ci_low": low, "ci_high": high}

    suites = []
    for r in rows:
        a, b = side(r.passed_a, r.n_a), side(r.passed_b, r.n_b)
        diff = b["rate"] - a["rate"] if a["rate"] is not None and b["rate"] is not None else None
        suites.append({
            "suite": r.suite, "a": a, "b": b, "both": r.paired, "diff": diff,
            "p_value": r.p_value, "significant": r.p_value < alpha and (
                len(r.regressed) != len(r.improved)),
            "regressed": list(r.regressed), "improved": list(r.improved),
        })
    return {"a": {"label": label_a}, "b": {"label": label_b}, "alpha": alpha, "suites": suites}


def _asset(name: str) -> str:
    return resources.files("pytest_llmbench.report").joinpath(name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON that cannot end the ``<script>`` element it sits in, whatever the strings hold."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sha256(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def render_html(
    records: Iterable[Mapping[str, Any]], run: Mapping[str, Any], *,
    comparison: Mapping[str, Any] | None = None, title: str = "pytest-llmbench report",
) -> str:
    """The whole page as a string. ``records``: ``ItemResult.to_dict()`` plus ``cached``;
    ``run``: run metadata (``run_id``, ``started_at``, ``models`` with optional prices...);
    ``comparison``: the shape ``docs/report.md`` describes, or ``None``."""
    data = build_data(records, run, comparison=comparison, title=title)
    chart = _asset("vendor/chart.umd.min.js")
    app = _asset("assets/report.js")
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src {_sha256(chart)} {_sha256(app)}; base-uri 'none'; form-action 'none'"
    )
    parts = {
        "STYLE": _asset("assets/report.css"), "CHARTJS": chart, "APP": app, "CSP": csp,
        "DATA": _script_json(data),
    }

    def fill(match: re.Match[str]) -> str:
        return parts[match.group(1) or "DATA"]

    # One pass: text put in is never scanned for markers again.
    return _MARKER.sub(fill, _asset("assets/report.html"))


def write_html(path: Path, records: Iterable[Mapping[str, Any]], run: Mapping[str, Any], *,
               comparison: Mapping[str, Any] | None = None,
               title: str = "pytest-llmbench report") -> None:
    """Write the page atomically (temp file + rename)."""
    page = render_html(records, run, comparison=comparison, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    from pytest_llmbench.coord.atomic import atomic_write

    atomic_write(path, page.encode("utf-8"))


class HtmlExporter:
    """``--llmbench-html FILE``: collects the run's records, writes the page at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.run: dict[str, Any] = {}

    def start(self, run: RunInfo) -> None:
        from dataclasses import asdict

        self.run = {k: v for k, v in asdict(run).items()}
        self.run["models"] = [dict(m) for m in run.models]

    def add(self, result: ItemResult) -> None:
        self.records.append(record_of(result))

    def finish(self, end: RunEnd) -> str | None:
        self.run.update(finished_at=end.finished_at, exitstatus=end.exitstatus)
        write_html(self.path, self.records, self.run)
        return f"wrote the HTML report of {len(self.records)} items to {self.path}"
