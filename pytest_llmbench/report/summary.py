"""Statistics per suite x model, and the plain-text summary table.

Shared by the terminal summary of a run and by ``python -m pytest_llmbench report``, so it
depends on nothing but ``records``: no pytest, no store.

Choices, so the numbers can be read without the code:

- **Pass rate** is ``passed / (passed + failed + errors)``: an item that could not be judged
  (timeout, API failure) counts as not passed. Leaving errors out would make a flaky
  endpoint look *better*; the errors column shows how many there were.
- **95 % interval**: the Wilson score interval on that ratio (good at small n and near 0 or
  1, where the normal approximation leaves [0, 1]).
- **Mean score** averages the items that have a score (errors usually have none).
- **Latency** p50/p95 use the nearest-rank method over the items that received at least one
  answer, cached ones included: a cached result carries the latency measured when it ran,
  which is the model's latency, not the cache's.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pytest_llmbench.errors import ERROR_CLASSES
from pytest_llmbench.records import ERROR, PASSED, ItemResult

__all__ = [
    "Details", "GroupSummary", "RunTally", "Summarizer", "detail_lines", "merge", "percentile",
    "render_table", "summarize", "wilson_interval",
]


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``k`` successes in ``n`` trials; ``(0, 1)`` for n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(sorted_values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of already sorted values (``None`` when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass(frozen=True, kw_only=True)
class GroupSummary:
    """The statistics of one suite x model (or of everything: ``suite == "TOTAL"``)."""

    suite: str
    model: str
    items: int
    passed: int
    failed: int
    errors: int
    cached: int
    pass_rate: float | None
    """``passed / items``; ``None`` when there are no items."""
    ci_low: float
    ci_high: float
    mean_score: float | None
    scored: int
    """Items that have a score (the mean's denominator)."""
    p50_latency: float | None
    p95_latency: float | None
    prompt_tokens: int
    completion_tokens: int
    errors_by_class: dict[str, int]
    attempts: int
    """HTTP attempts made in total (retries included)."""
    deadline_layers: dict[str, int]
    """How often each deadline layer (``api``, ``task``, ``lease``) fired."""
    latencies: tuple[float, ...] = field(default=(), repr=False, compare=False)
    """Sorted latencies, kept so groups can be merged into a totals row."""
    score_sum: float = field(default=0.0, repr=False, compare=False)


class Summarizer:
    """Incremental counterpart of ``summarize``: ``add`` results one by one (the report CLI
    streams 10^5 stored results without holding them), then ``groups()``."""

    def __init__(self) -> None:
        self._acc: dict[tuple[str, str], _Acc] = {}

    def add(self, result: ItemResult) -> None:
        suite = str(result.identity.get("suite", "?"))
        model = str(result.identity.get("model", "?"))
        acc = self._acc.get((suite, model))
        if acc is None:
            acc = self._acc[(suite, model)] = _Acc()
        acc.add(result)

    def groups(self) -> list[GroupSummary]:
        return [acc.summary(s, m) for (s, m), acc in sorted(self._acc.items())]


@dataclass
class _Acc:
    items: int = 0
    passed: int = 0
    errors: int = 0
    cached: int = 0
    scored: int = 0
    score_sum: float = 0.0
    latencies: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempts: int = 0
    error_classes: Counter[str] = field(default_factory=Counter)
    layers: Counter[str] = field(default_factory=Counter)

    def add(self, r: ItemResult) -> None:
        self.items += 1
        self.passed += r.status == PASSED
        if r.status == ERROR:
            self.errors += 1
            self.error_classes[r.error_class or "unknown"] += 1
        self.cached += bool(r.cached)
        if r.score is not None:
            self.scored += 1
            self.score_sum += r.score
        if r.completions or r.latency > 0:
            self.latencies.append(float(r.latency))
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        self.attempts += len(r.attempts)
        if r.deadline_layer:
            self.layers[r.deadline_layer] += 1

    def summary(self, suite: str, model: str) -> GroupSummary:
        lat = tuple(sorted(self.latencies))
        return _make(
            suite, model, items=self.items, passed=self.passed, errors=self.errors,
            cached=self.cached, scored=self.scored, score_sum=self.score_sum, latencies=lat,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            attempts=self.attempts, error_classes=self.error_classes, layers=self.layers,
        )


def _ordered(counts: Counter[str]) -> dict[str, int]:
    """Error classes in ``ERROR_CLASSES`` order, unknown ones after, alphabetically."""
    order = {name: i for i, name in enumerate(ERROR_CLASSES)}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _make(
    suite: str, model: str, *, items: int, passed: int, errors: int, cached: int, scored: int,
    score_sum: float, latencies: tuple[float, ...], prompt_tokens: int, completion_tokens: int,
    attempts: int, error_classes: Counter[str], layers: Counter[str],
) -> GroupSummary:
    low, high = wilson_interval(passed, items)
    return GroupSummary(
        suite=suite, model=model, items=items, passed=passed, failed=items - passed - errors,
        errors=errors, cached=cached, pass_rate=passed / items if items else None,
        ci_low=low, ci_high=high, mean_score=score_sum / scored if scored else None,
        scored=scored, p50_latency=percentile(latencies, 50),
        p95_latency=percentile(latencies, 95), prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, errors_by_class=_ordered(error_classes),
        attempts=attempts, deadline_layers=dict(sorted(layers.items())), latencies=latencies,
        score_sum=score_sum,
    )


def summarize(results: Iterable[ItemResult]) -> list[GroupSummary]:
    """One ``GroupSummary`` per (suite, model) of ``result.identity``, sorted by both."""
    acc = Summarizer()
    for result in results:
        acc.add(result)
    return acc.groups()


def merge(groups: Sequence[GroupSummary], *, suite: str = "TOTAL", model: str = "") -> GroupSummary:
    """All ``groups`` as one (the totals row): percentiles recomputed from the latencies."""
    errors: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for g in groups:
        errors.update(g.errors_by_class)
        layers.update(g.deadline_layers)
    return _make(
        suite, model, items=sum(g.items for g in groups), passed=sum(g.passed for g in groups),
        errors=sum(g.errors for g in groups), cached=sum(g.cached for g in groups),
        scored=sum(g.scored for g in groups), score_sum=sum(g.score_sum for g in groups),
        latencies=tuple(sorted(x for g in groups for x in g.latencies)),
        prompt_tokens=sum(g.prompt_tokens for g in groups),
        completion_tokens=sum(g.completion_tokens for g in groups),
        attempts=sum(g.attempts for g in groups), error_classes=errors, layers=layers,
    )


# --- rendering ------------------------------------------------------------------------------

_HEADERS = (
    "suite", "model", "items", "pass", "fail", "err", "pass rate [95% CI]", "mean score",
    "p50", "p95", "tokens in/out", "errors",
)
_RIGHT = frozenset({2, 3, 4, 5, 6, 7, 8, 9, 10})
_SHRINKABLE = (11, 0, 1)  # errors, suite, model: shrunk in this order to fit a width
_MIN_WIDTH = 8


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.1f}s" if value < 100 else f"{value:.0f}s"


def _count(n: int) -> str:
    if n < 10_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k" if n < 100_000 else f"{n / 1000:.0f}k"
    return f"{n / 1_000_000:.1f}M"


def rate_cell(g: GroupSummary) -> str:
    """The pass rate with its interval; errors are counted in its denominator, and a group
    where every item errored says so instead of claiming 0 % of a model never judged."""
    if g.pass_rate is None:
        return "-"
    if g.errors and g.errors == g.items:
        return f"n/a (all {g.items} errored)"
    return f"{g.pass_rate:.1%} [{100 * g.ci_low:.1f}-{100 * g.ci_high:.1f}]"


def _row(g: GroupSummary) -> list[str]:
    rate = rate_cell(g)
    errors = " ".join(f"{name}:{n}" for name, n in g.errors_by_class.items()) or "-"
    items = f"{g.items} ({g.cached} cached)" if g.cached else str(g.items)
    return [
        g.suite, g.model, items, str(g.passed), str(g.failed), str(g.errors), rate,
        "-" if g.mean_score is None else f"{g.mean_score:.3f}",
        _seconds(g.p50_latency), _seconds(g.p95_latency),
        f"{_count(g.prompt_tokens)}/{_count(g.completion_tokens)}", errors,
    ]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def render_table(groups: Sequence[GroupSummary], *, width: int | None = None) -> str:
    """The summary as an aligned plain-text table, with a totals row for several groups.

    With ``width`` the errors, suite and model columns are clipped (``...``) to fit when
    they can; numbers are never clipped.
    """
    rows = [_row(g) for g in groups]
    if len(groups) > 1:
        rows.append(_row(merge(groups)))
    table = [list(_HEADERS), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_HEADERS))]
    if width is not None:
        gap = 2 * (len(widths) - 1)
        for col in _SHRINKABLE:
            excess = sum(widths) + gap - width
            if excess <= 0:
                break
            widths[col] = max(_MIN_WIDTH, len(_HEADERS[col]), widths[col] - excess)

    def line(cells: list[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            cell = _clip(cell, widths[i])
            out.append(cell.rjust(widths[i]) if i in _RIGHT else cell.ljust(widths[i]))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(table[0]), rule, *(line(r) for r in rows[: len(groups)])]
    if len(groups) > 1:
        lines += [rule, line(rows[-1])]
    return "\n".join(lines)


def detail_lines(results: Iterable[ItemResult], groups: Sequence[GroupSummary]) -> list[str]:
    """Lines under the table: code-judge verdicts per group (``OK_EXTENDED`` apart from
    ``OK``), the expected errors of agent items that passed by showing them, and the
    deadline layers that fired."""
    details = Details()
    for r in results:
        details.add(r)
    return details.lines(groups)


class Details:
    """Incremental counterpart of ``detail_lines``: ``add`` results one by one, then
    ``lines(groups)``."""

    def __init__(self) -> None:
        self.verdicts: dict[tuple[str, str], Counter[str]] = {}
        self.expected: dict[tuple[str, str], Counter[str]] = {}

    def add(self, r: ItemResult) -> None:
        details = r.details if isinstance(r.details, dict) else {}
        verdict = details.get("verdict")
        error = details.get("expected_error")
        if not isinstance(verdict, str) and not (isinstance(error, str) and r.status == PASSED):
            return
        group = (str(r.identity.get("suite", "?")), str(r.identity.get("model", "?")))
        if isinstance(verdict, str):
            self.verdicts.setdefault(group, Counter())[verdict] += 1
        if isinstance(error, str) and r.status == PASSED:
            self.expected.setdefault(group, Counter())[error] += 1

    def lines(self, groups: Sequence[GroupSummary]) -> list[str]:
        lines = [
            f"verdicts {suite} x {model}: "
            + ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
            for (suite, model), counts in sorted(self.verdicts.items())
        ]
        lines += [  # agent items that demonstrate a limit (agent.expect_error) and showed it
            f"expected errors {suite} x {model} (passed): "
            + ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
            for (suite, model), counts in sorted(self.expected.items())
        ]
        layers: Counter[str] = Counter()
        for g in groups:
            layers.update(g.deadline_layers)
        if layers:
            lines.append("deadline layers fired: "
                         + ", ".join(f"{k} {n}" for k, n in sorted(layers.items())))
        return lines


class RunTally:
    """What the end-of-run summary needs of every record, kept as the records are reported
    instead of the records themselves: a run of 100,000 items held them all (answers,
    transcripts, details) until the summary, ~5 kB each in the pytest process."""

    def __init__(self) -> None:
        self.items = 0
        self.cached = 0
        self.summarizer = Summarizer()
        self.details = Details()

    def add(self, result: ItemResult) -> None:
        self.items += 1
        self.cached += bool(result.cached)
        self.summarizer.add(result)
        self.details.add(result)

    def groups(self) -> list[GroupSummary]:
        return self.summarizer.groups()

    def detail_lines(self, groups: Sequence[GroupSummary]) -> list[str]:
        return self.details.lines(groups)
