"""The HTML report: escaping of hostile model output, offline by construction (CSP), its size
for 10,000 items, and the page of a real run opened in headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.records import ItemResult
from pytest_llmbench.report.html import build_data, render_html

REPO = Path(__file__).resolve().parent.parent
HOSTILE = '</script><script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">&amp;'
RUN = {"run_id": "abc", "started_at": 1.0e9, "models": [
    {"name": "m1", "price_input": 2.5, "price_output": 10.0}, {"name": "m2"}]}


def record(i: int, *, model: str = "m1", status: str = "passed", answer: str = "42",
           error_class: str | None = None, suite: str = "math") -> dict[str, Any]:
    system = "You are a careful assistant. Answer with the number only, and nothing else."
    user = f"What is {i} + {i * 7 % 13}? Think about it and answer."
    result = ItemResult(
        key=f"{i:064x}", status=status, error_class=error_class,
        identity={"suite": suite, "suite_path": f"suites/{suite}.toml", "prompt": "add",
                  "instance": str(i), "model": model, "repeat": 0,
                  "nodeid": f"suites/{suite}.toml::add[{i}-{model}]", "run_id": "abc"},
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        completions=[{"text": answer, "finish_reason": "stop", "prompt_tokens": 31,
                      "completion_tokens": 2, "latency": 0.2 + (i % 50) / 100, "model": model}],
        answer=answer, expected=str(i + i * 7 % 13), score=1.0 if status == "passed" else 0.0,
        explanation="" if status == "passed" else f"expected {i}, got {answer}",
        attempts=[{"turn": 0, "number": 1, "started": 0.0, "duration": 0.2, "outcome": "ok",
                   "status": 200, "error": "", "wait": 0.0}],
        started_at=1.7e9 + i, elapsed=0.25, latency=0.2 + (i % 50) / 100, prompt_tokens=31,
        completion_tokens=2,
    )
    data = result.to_dict()
    data["cached"] = False
    return data


def _data_of(page: str) -> Any:
    match = re.search(r'<script type="application/json" id="llmbench-data">(.*?)</script>', page,
                      re.S)
    assert match
    return json.loads(match.group(1))


def test_hostile_answers_cannot_end_the_data_element_and_scripts_are_pinned_by_hash() -> None:
    page = render_html([record(1, answer=HOSTILE, status="failed")], RUN)
    assert "__pwned=1</script>" not in page and "<img src=x" not in page
    data = _data_of(page)
    assert HOSTILE in data["strings"]  # intact once parsed: the page shows it as text
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page)
    assert csp and "default-src 'none'" in csp.group(1)  # no fetch of any kind
    scripts = re.findall(r"<script>(.*?)</script>\n", page, re.S)
    assert len(scripts) == 2  # Chart.js and the page's own: both allowed by hash, nothing else
    for script in scripts:
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp.group(1)
    assert "'unsafe-inline'" not in csp.group(1).split("script-src")[1].split(";")[0]
    assert "http://" not in page.replace("http://www.w3.org", "") or "https://" not in page


def test_summary_groups_cost_histogram_and_interned_strings() -> None:
    records = [record(i) for i in range(8)] + [
        record(8, status="failed", answer="7"),
        {**record(9, model="m2", status="error", error_class="api_timeout"), "completions": [],
         "latency": 0.0, "answer": None},
    ]
    data = build_data(records, RUN)
    groups = {(g["suite"], g["model"]): g for g in data["groups"]}
    m1, m2 = groups[("math", "m1")], groups[("math", "m2")]
    assert (m1["items"], m1["passed"], m1["failed"], m1["errors"]) == (9, 8, 1, 0)
    assert m1["cost"] == pytest.approx((9 * 31 * 2.5 + 9 * 2 * 10.0) / 1e6)
    assert m2["cost"] is None and m2["errors_by_class"] == {"api_timeout": 1}
    assert data["error_classes"] == ["api_timeout"]
    assert sum(data["latency"]["series"]["m1"]) == 9 and "m2" not in data["latency"]["series"]
    # the system prompt is stored once for all ten items
    system = data["strings"].index(records[0]["messages"][0]["content"])
    assert [d["m"][0][1] for d in data["details"]] == [system] * 10


def test_ten_thousand_single_turn_items_stay_under_six_megabytes() -> None:
    records = [record(i, model=("m1", "m2")[i % 2], suite=f"s{i % 7}",
                      status="failed" if i % 9 == 0 else "passed") for i in range(10_000)]
    size = len(render_html(records, RUN).encode())
    print(f"HTML report of 10,000 single-turn items: {size / 1e6:.2f} MB")
    assert size < 6_000_000


# --- in a real browser -------------------------------------------------------------------

def _chromium() -> str | None:
    return os.environ.get("LLMBENCH_CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium driven by Playwright (no browser download: the system's)."""
    path = _chromium()
    if path is None:
        pytest.skip("no Chromium installed (apt-get install chromium; .ci/run does it)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=path, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield instance
        finally:
            instance.close()


def open_page(browser: Any, path: Path) -> tuple[Any, list[str]]:
    """The page loaded, and every console error, page error, dialog and non-file request."""
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"request: {r.url}")
            if not r.url.startswith("file:") else None)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=20_000)
    return page, problems


@pytest.mark.slow
def test_report_of_the_example_suites_opens_in_chromium_with_plots(
    pytester: pytest.Pytester, sim_env: str, browser: Any
) -> None:
    shutil.copytree(REPO / "example_suites", pytester.path / "example_suites")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           "example_suites/", "--llmbench-html=report.html")
    result.stdout.fnmatch_lines(["*llmbench: wrote the HTML report of * items to*report.html"])
    page, problems = open_page(browser, pytester.path / "report.html")
    assert problems == []
    assert page.evaluate("document.body.dataset.charts") == "4"
    # every chart drew something on its canvas
    for canvas in ("chart-rate", "chart-latency", "chart-tokens", "chart-errors"):
        assert page.evaluate(f"document.getElementById('{canvas}').width") > 100
        assert page.evaluate(f"!!Chart.getChart('{canvas}')")
    assert page.locator("#summary tr").count() >= 7  # header + six suites
    page.select_option("#f-suite", "code")
    count = page.locator("#items tbody tr").count()
    assert 0 < count < 50 and page.locator("#f-count").inner_text().startswith(f"{count} of ")
    page.locator("#items tbody tr").first.click()
    assert "USER" in page.locator("#transcript").inner_text().upper()
    assert "Program verdicts" in page.locator("#detail-extra").inner_text()  # a code item
    assert page.locator("#detail-extra table tr").count() >= 2
    page.select_option("#f-suite", "agent")  # an agent item: its tool calls, timed
    page.locator("#items tbody tr").first.click()
    assert "Agent transcript" in page.locator("#transcript").inner_text()
    assert problems == []


@pytest.mark.slow
def test_hostile_output_is_shown_as_text_and_never_runs(browser: Any, tmp_path: Path) -> None:
    from pytest_llmbench.report.html import write_html

    comparison = {"a": {"label": "run A"}, "b": {"label": "run B"}, "suites": [
        {"suite": "math", "a": {"rate": 0.9, "ci_low": 0.8, "ci_high": 0.95},
         "b": {"rate": 0.7, "ci_low": 0.6, "ci_high": 0.8}, "both": 200, "diff": -0.2,
         "p_value": 0.001, "significant": True, "regressed": [HOSTILE], "improved": []}]}
    path = tmp_path / "r.html"
    write_html(path, [record(1, answer=HOSTILE, status="failed"), record(2)], RUN,
               comparison=comparison)
    page, problems = open_page(browser, path)
    page.locator("#items tbody tr").first.click()
    assert HOSTILE in page.locator("#detail").inner_text()
    assert HOSTILE in page.locator("#cmp-items").inner_text()
    assert page.evaluate("window.__pwned === undefined")
    assert page.locator("#detail img, #cmp-items img").count() == 0
    assert page.evaluate("!!Chart.getChart('chart-compare')")
    assert "significant regression" in page.locator("#cmp-table").inner_text()
    assert problems == []


def test_an_unwritable_html_path_is_one_usage_error_before_the_run(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytester.makefile(".toml", math='[[prompts]]\nid = "a"\ntemplate = "1 + 1?"\n'
                      '[[prompts.instances]]\nexpected = "2"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-html=missing/r.html")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llmbench-html *missing/r.html: directory * does not exist;"
                                 " create it or choose another file*"])


def test_comparison_rows_become_the_pages_comparison() -> None:
    from dataclasses import dataclass

    from pytest_llmbench.report.html import comparison_data

    @dataclass
    class Row:  # the fields of report/compare.py's SuiteComparison
        suite: str
        n_a: int
        passed_a: int
        n_b: int
        passed_b: int
        paired: int
        regressed: tuple[str, ...]
        improved: tuple[str, ...]
        p_value: float

    rows = [Row("math", 200, 190, 200, 180, 200, tuple(f"m[{i}]" for i in range(10)), (), 0.002),
            Row("words", 10, 5, 10, 6, 10, (), ("w[1]",), 1.0)]
    data = comparison_data(rows, "run A", "run B")
    math, words = data["suites"]
    assert math["a"]["rate"] == pytest.approx(0.95) and math["diff"] == pytest.approx(-0.05)
    assert math["significant"] and len(math["regressed"]) == 10
    assert not words["significant"] and words["improved"] == ["w[1]"]
    page = render_html([], {"run_id": "x"}, comparison=data)
    assert _data_of(page)["comparison"]["b"]["label"] == "run B"


def test_report_cli_writes_the_html_report_of_a_store(tmp_path: Path) -> None:
    import subprocess
    import sys

    from pytest_llmbench.store.filestore import Store

    store = Store.open(tmp_path / "st")
    for i in range(4):
        store.put(ItemResult.from_dict({k: v for k, v in record(i, status="failed" if i == 3
                                                                     else "passed").items()
                                        if k != "cached"}))
    out = subprocess.run([sys.executable, "-m", "pytest_llmbench", "report", str(store.root),
                          "--html", str(tmp_path / "r.html")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "wrote the HTML report of 4 results" in out.stderr
    data = _data_of((tmp_path / "r.html").read_text())
    (group,) = data["groups"]
    assert (group["items"], group["passed"], group["failed"]) == (4, 3, 1)
