"""Two sets of results side by side: per suite, pass rates with intervals, and a paired test.

Depends on ``records``, ``store.runs`` and ``report.summary`` only (no pytest, no store I/O):
the CLI (``report/cli.py``) picks the items, this module does the numbers.

The statistics, so the output can be read without the code:

- Each side's **pass rate** per suite is over all of its items there (errors count as not
  passed, as in the summary table), with a 95 % Wilson interval.
- Items are **paired** by case (suite file, prompt, instance, repeat) and, when both sides
  hold the same models, by model: the paired items are the ones both sides have.
- The **difference** is tested with the exact McNemar test on the paired items: of the
  discordant pairs, ``regressed`` passed in A and not in B, ``improved`` the reverse; under
  the null hypothesis (no difference) each discordant pair is a fair coin, so the two-sided
  p-value is ``min(1, 2 * P(X <= min(regressed, improved)))`` with
  ``X ~ Binomial(regressed + improved, 1/2)``. Exact, so it holds at the small counts an
  eval produces (the chi-squared version does not); computed with ``math`` alone.
- A suite **regressed significantly** when ``regressed > improved`` and ``p < alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pytest_llmbench.report.summary import wilson_interval
from pytest_llmbench.store.runs import RunItem

__all__ = ["SuiteComparison", "binom_cdf_half", "compare_items", "mcnemar_exact", "render_comparison"]


def binom_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``.

    Exact integer arithmetic up to n = 1000 (``comb`` sums, one division); above, the terms
    are summed in log space (``lgamma``), which keeps 12+ significant digits where
    ``0.5 ** n`` would underflow."""
    if n < 0 or k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if n <= 1000:
        return float(sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    log_half_n = n * math.log(2.0)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - log_half_n
            for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def mcnemar_exact(regressed: int, improved: int) -> float:
    """Two-sided exact McNemar p-value for the discordant pair counts (1.0 when none)."""
    n = regressed + improved
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf_half(min(regressed, improved), n))


@dataclass(frozen=True, kw_only=True)
class SuiteComparison:
    """One suite: each side's pass rate, and the paired test."""

    suite: str
    n_a: int
    passed_a: int
    n_b: int
    passed_b: int
    paired: int
    regressed: tuple[str, ...] = field(default=())
    """Node ids (of side B) that passed in A and not in B."""
    improved: tuple[str, ...] = field(default=())
    p_value: float = 1.0

    @property
    def rate_a(self) -> float:
        return self.passed_a / self.n_a if self.n_a else 0.0

    @property
    def rate_b(self) -> float:
        return self.passed_b / self.n_b if self.n_b else 0.0

    def significant_regression(self, alpha: float) -> bool:
        return len(self.regressed) > len(self.improved) and self.p_value < alpha

    def significant_improvement(self, alpha: float) -> bool:
        return len(self.improved) > len(self.regressed) and self.p_value < alpha


def _pair_key(item: RunItem, with_model: bool) -> tuple[object, ...]:
    case = item.case_id()
    return (*case, item.model) if with_model else case


def _suite_of(item: RunItem) -> str:
    return item.suite or item.suite_path or item.nodeid.split("::", 1)[0]


def compare_items(
    a: Iterable[RunItem], b: Iterable[RunItem], *, with_model: bool
) -> list[SuiteComparison]:
    """Per suite (sorted by name): see the module docstring. ``with_model`` pairs items by
    model too (two runs of the same models); off, by case alone (two models)."""
    side_a: dict[str, dict[tuple[object, ...], RunItem]] = {}
    side_b: dict[str, dict[tuple[object, ...], RunItem]] = {}
    for items, side in ((a, side_a), (b, side_b)):
        for item in items:
            side.setdefault(_suite_of(item), {})[_pair_key(item, with_model)] = item
    out = []
    for suite in sorted(side_a.keys() | side_b.keys()):
        items_a, items_b = side_a.get(suite, {}), side_b.get(suite, {})
        regressed, improved = [], []
        paired = 0
        for pair, item_a in items_a.items():
            item_b = items_b.get(pair)
            if item_b is None:
                continue
            paired += 1
            pass_a, pass_b = item_a.outcome == "passed", item_b.outcome == "passed"
            if pass_a and not pass_b:
                regressed.append(item_b.nodeid)
            elif pass_b and not pass_a:
                improved.append(item_b.nodeid)
        out.append(SuiteComparison(
            suite=suite,
            n_a=len(items_a), passed_a=sum(i.outcome == "passed" for i in items_a.values()),
            n_b=len(items_b), passed_b=sum(i.outcome == "passed" for i in items_b.values()),
            paired=paired, regressed=tuple(sorted(regressed)), improved=tuple(sorted(improved)),
            p_value=mcnemar_exact(len(regressed), len(improved)),
        ))
    return out


def _rate(k: int, n: int) -> str:
    if not n:
        return "-"
    low, high = wilson_interval(k, n)
    return f"{k / n:6.1%} [{low:.1%}, {high:.1%}]"


def render_comparison(
    rows: Sequence[SuiteComparison], *, label_a: str, label_b: str, alpha: float,
    show_items: int = 20,
) -> str:
    """The comparison as text: a table, then the regressed and improved items per suite."""
    header = ("suite", "A n", "A pass rate [95% CI]", "B n", "B pass rate [95% CI]",
              "diff", "paired", "regr", "impr", "p (McNemar)", "")
    table = [header]
    for row in rows:
        diff = f"{row.rate_b - row.rate_a:+.1%}" if row.n_a and row.n_b else "-"
        verdict = ("REGRESSED" if row.significant_regression(alpha)
                   else "improved" if row.significant_improvement(alpha) else "")
        table.append((row.suite, str(row.n_a), _rate(row.passed_a, row.n_a), str(row.n_b),
                      _rate(row.passed_b, row.n_b), diff, str(row.paired),
                      str(len(row.regressed)), str(len(row.improved)), f"{row.p_value:.4g}",
                      verdict))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [f"A = {label_a}", f"B = {label_b}",
             f"significance level alpha = {alpha:g} (exact McNemar test on paired items)", ""]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for row in rows:
        for name, ids in (("regressed", row.regressed), ("improved", row.improved)):
            if not ids:
                continue
            lines.append(f"{row.suite}: {len(ids)} {name} (passed in "
                         f"{'A, not B' if name == 'regressed' else 'B, not A'}):")
            lines.extend(f"  {nodeid}" for nodeid in ids[:show_items])
            if len(ids) > show_items:
                lines.append(f"  ... and {len(ids) - show_items} more")
    return "\n".join(lines)
