"""Summary statistics, the table, and the ``report`` CLI end to end (a real subprocess)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llmbench.records import ItemResult
from pytest_llmbench.report.cli import CSV_COLUMNS
from pytest_llmbench.report.summary import (
    merge,
    percentile,
    render_table,
    summarize,
    wilson_interval,
)
from pytest_llmbench.store.filestore import Store, item_key


def res(i: int, status: str, *, suite: str = "math", model: str = "gpt-4o", **kw: object) -> ItemResult:
    fields: dict[str, object] = {
        "identity": {"suite": suite, "model": model, "prompt": "p", "instance": str(i),
                     "repeat": 0, "nodeid": f"{suite}.toml::p[{i}-{model}]"},
        "score": {"passed": 1.0, "failed": 0.0}.get(status),
        "completions": [{"text": "x"}] if status != "error" else [],
        "latency": 0.0 if status == "error" else 0.1 * (i + 1),
        "prompt_tokens": 10, "completion_tokens": 2,
        "attempts": [{"outcome": "ok"}],
    }
    fields.update(kw)
    key = item_key(messages=[suite, model, i], model=model, base_url="sim", params={},
                   scorer={}, repeat=0)
    return ItemResult(key=key, status=status, **fields)  # type: ignore[arg-type]


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (8, 10, 0.490, 0.943),
    (0, 10, 0.000, 0.278),
    (10, 10, 0.722, 1.000),
    (50, 100, 0.404, 0.596),
    (1, 1, 0.207, 1.000),
])
def test_wilson_interval_known_values(k: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 3), round(hi, 3)) == (low, high)


def test_wilson_interval_empty_and_z() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(8, 10, z=1.0), wilson_interval(8, 10, z=2.576)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]


def test_percentile_nearest_rank() -> None:
    ten = [float(x) for x in range(1, 11)]
    assert percentile(ten, 50) == 5.0 and percentile(ten, 95) == 10.0
    assert percentile([float(x) for x in range(1, 21)], 95) == 19.0
    assert percentile([3.0], 50) == 3.0 and percentile([], 50) is None


def test_summarize_counts_rates_latency_tokens_errors() -> None:
    results = [
        *(res(i, "passed") for i in range(6)),
        res(6, "failed"), res(7, "failed"),
        res(8, "error", error_class="task_timeout", deadline_layer="task", attempts=[{}, {}]),
        res(9, "error", error_class="api_timeout", deadline_layer="api"),
        res(10, "error", error_class="api_timeout", deadline_layer="api"),
        res(11, "passed", cached=True, latency=5.0),
        res(0, "passed", model="qwen7b"),
    ]
    groups = summarize(results)
    assert [(g.suite, g.model) for g in groups] == [("math", "gpt-4o"), ("math", "qwen7b")]
    g = groups[0]
    assert (g.items, g.passed, g.failed, g.errors, g.cached) == (12, 7, 2, 3, 1)
    assert g.pass_rate == pytest.approx(7 / 12)  # errors count as not passed
    assert (g.ci_low, g.ci_high) == wilson_interval(7, 12)
    assert g.scored == 9 and g.mean_score == pytest.approx(7 / 9)  # errors have no score
    # latencies of the 9 answered items (errors excluded, the cached one included):
    lat = sorted([0.1 * (i + 1) for i in range(8)] + [5.0])
    assert g.p50_latency == pytest.approx(lat[4]) and g.p95_latency == pytest.approx(5.0)
    assert (g.prompt_tokens, g.completion_tokens) == (120, 24)
    assert list(g.errors_by_class.items()) == [("api_timeout", 2), ("task_timeout", 1)]
    assert g.attempts == 13 and g.deadline_layers == {"api": 2, "task": 1}


def test_merge_recomputes_from_all_items() -> None:
    groups = summarize([res(0, "passed", latency=1.0), res(1, "failed", latency=2.0),
                        res(0, "passed", model="b", latency=3.0),
                        res(1, "error", model="b", error_class="crashed")])
    total = merge(groups)
    assert (total.items, total.passed, total.failed, total.errors) == (4, 2, 1, 1)
    assert total.p50_latency == 2.0 and total.p95_latency == 3.0
    assert total.errors_by_class == {"crashed": 1}


def test_summarize_empty() -> None:
    assert summarize([]) == []


# --- the table ------------------------------------------------------------------------------


def test_render_table_rows_and_totals() -> None:
    results = [res(i, "passed") for i in range(8)] + [
        res(8, "failed"), res(9, "error", error_class="api_timeout"),
        res(0, "error", model="qwen7b", error_class="task_timeout"),
    ]
    text = render_table(summarize(results))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["suite", "model", "items", "pass", "fail"]
    assert "pass rate [95% CI]" in lines[0] and "errors" in lines[0]
    row = next(line for line in lines if "gpt-4o" in line)
    lo, hi = wilson_interval(8, 10)
    assert f"80.0% [{100 * lo:.1f}-{100 * hi:.1f}]" in row
    assert row.split()[:5] == ["math", "gpt-4o", "10", "8", "1"] and "api_timeout:1" in row
    total = lines[-1]
    assert total.startswith("TOTAL") and "task_timeout:1" in total and "api_timeout:1" in total
    assert total.split()[1:4] == ["11", "8", "1"]
    widths = {len(line.rstrip()) for line in lines if set(line) <= {"-", " "}}
    assert len(widths) == 1  # both rules have the table's width
    # One group: no totals row.
    single = render_table(summarize(results[:3])).splitlines()
    assert len(single) == 3 and not any(line.startswith("TOTAL") for line in single)


def test_render_table_fits_width_by_clipping_text_columns() -> None:
    results = [res(0, "error", suite="a-very-long-suite-name-that-goes-on", error_class=c)
               for c in ("api_timeout", "task_timeout", "lease_timeout", "connection_error")]
    full = render_table(summarize(results))
    narrow = render_table(summarize(results), width=120)
    assert max(map(len, full.splitlines())) > 120
    assert max(map(len, narrow.splitlines())) <= 120
    assert "..." in narrow and "a-very-long-suite-name-that-goes-on" not in narrow


def test_errors_are_counted_beside_the_rate_and_all_errored_is_not_zero_percent() -> None:
    results = [res(i, "error", error_class="connection_error") for i in range(5)]
    results += [res(0, "passed", suite="other"), res(1, "error", suite="other",
                                                     error_class="api_timeout")]
    lines = render_table(summarize(results)).splitlines()
    assert lines[0].split()[:6] == ["suite", "model", "items", "pass", "fail", "err"]
    broken = next(line for line in lines if line.startswith("math"))
    assert broken.split()[2:6] == ["5", "0", "0", "5"]
    assert "n/a (all 5 errored)" in broken and "0.0%" not in broken
    other = next(line for line in lines if line.startswith("other"))
    assert other.split()[2:6] == ["2", "1", "0", "1"] and "50.0% [" in other


def test_render_table_cached_and_no_latency() -> None:
    text = render_table(summarize([res(0, "passed", cached=True),
                                   res(1, "error", error_class="crashed")]))
    row = text.splitlines()[2]
    assert "2 (1 cached)" in row and "crashed:1" in row


# --- the report CLI -------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_llmbench", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, list[ItemResult], Path]:
    store = Store.open(tmp_path / "st")
    results = [res(i, "passed") for i in range(5)] + [
        res(5, "failed"), res(6, "error", error_class="api_timeout", deadline_layer="api"),
        res(0, "passed", suite="code", model="qwen7b"),
    ]
    for r in results:
        store.put(r)
    bad = store.put(res(99, "passed"))
    bad.write_text('{"_v": 1, "key": "trunc')
    return store.root, results, bad


def test_report_cli_table_exports_and_corrupt(filled: tuple[Path, list[ItemResult], Path],
                                              tmp_path: Path) -> None:
    root, results, bad = filled
    jsonl, csv_path = tmp_path / "out.jsonl", tmp_path / "out.csv"
    out = run_cli("report", str(root), "--jsonl", str(jsonl), "--csv", str(csv_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.split()[:5] == ["math", "gpt-4o", "7", "5", "1"] for line in lines)
    assert any(line.startswith("code") and "qwen7b" in line for line in lines)
    assert lines[-1].startswith("TOTAL") and "api_timeout:1" in lines[-1]
    assert f"corrupt result file {bad}" in out.stderr and "Traceback" not in out.stderr
    assert bad.exists()  # read-only: nothing moved
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(r.key for r in results)
    by_key = {r.key: r for r in results}
    assert all(ItemResult.from_dict(rec) == by_key[rec["key"]] for rec in records)
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(results)
    err = next(r for r in rows if r["status"] == "error")
    assert (err["error_class"], err["deadline_layer"], err["score"], err["attempts"]) == (
        "api_timeout", "api", "", "1")
    ok = next(r for r in rows if r["nodeid"] == "math.toml::p[0-gpt-4o]")
    assert (ok["suite"], ok["model"], ok["instance"], ok["score"]) == ("math", "gpt-4o", "0", "1.0")


def test_report_cli_filters(filled: tuple[Path, list[ItemResult], Path], tmp_path: Path) -> None:
    root, _, _ = filled
    out = run_cli("report", str(root), "--suite", "code", "--csv", str(tmp_path / "c.csv"))
    assert out.returncode == 0 and "qwen7b" in out.stdout and "gpt-4o" not in out.stdout
    assert len((tmp_path / "c.csv").read_text().splitlines()) == 2
    out = run_cli("report", str(root), "--model", "nope")
    assert out.returncode == 0 and "no results" in out.stdout


def test_report_cli_missing_store_exit_2_one_line(tmp_path: Path) -> None:
    out = run_cli("report", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: no result store at")


def test_report_cli_unsupported_version_exit_2_one_line(tmp_path: Path) -> None:
    root = tmp_path / "old"
    root.mkdir()
    (root / "store.json").write_text('{"format": 99}')
    out = run_cli("report", str(root))
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "format 99" in out.stderr
    assert "Traceback" not in out.stderr


def test_report_cli_does_not_import_pytest_or_openai(filled: tuple[Path, list[ItemResult], Path]) -> None:
    root, _, _ = filled
    code = (
        "import sys\n"
        "from pytest_llmbench.report.cli import main\n"
        f"assert main(['report', {str(root)!r}]) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest', 'openai'))\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
