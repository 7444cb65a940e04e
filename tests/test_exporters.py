"""The exporter seam: records reach the reporting process (the xdist controller) in the
reports; ``pytest_llmbench_result`` fires there once per item; third-party exporters work
under ``-n 2``; plain ``llm`` tests get a record, JUnit properties and a summary row."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

SUITE = """
[suite]
scorer = "numeric"
[[prompts]]
id = "add"
template = "What is {{a}} + {{b}}?"
[[prompts.instances]]
id = "one"
vars = { a = 1, b = 2 }
expected = 3
[[prompts.instances]]
id = "two"
vars = { a = 2, b = 2 }
expected = 4
[[prompts.instances]]
id = "wrong"
vars = { a = 2, b = 2 }
expected = 5
"""

CONFTEST = """
import json, os
from pathlib import Path

import pytest

WHERE = os.environ.get("PYTEST_XDIST_WORKER", "controller")


def pytest_llmbench_result(result, nodeid, item):
    with open(Path(os.environ["HOOK_LOG"]), "a") as fh:
        fh.write(json.dumps({"nodeid": nodeid, "where": WHERE, "status": result.status,
                             "has_item": item is not None}) + "\\n")


class CountingExporter:
    def __init__(self, path):
        self.path = path
        self.lines = []

    def start(self, run):
        self.lines.append(["start", run.run_id, WHERE])

    def add(self, result):
        self.lines.append(["add", result.identity["nodeid"], result.status, WHERE])

    def finish(self, end):
        self.lines.append(["finish", end.items, end.exitstatus, WHERE])
        Path(self.path).write_text(json.dumps(self.lines))
        return f"counted {end.items} items"


class BrokenExporter:
    def start(self, run):
        pass

    def add(self, result):
        raise RuntimeError("disk full")

    def finish(self, end):
        raise AssertionError("dropped exporters are not finished")


def pytest_llmbench_exporters(config):
    return [CountingExporter(os.environ["EXPORT_OUT"]), BrokenExporter()]
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_result_hook_and_exporters_run_once_per_item_on_the_reporting_process(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, xdist: list[str]
) -> None:
    pytester.makefile(".toml", math=SUITE)
    pytester.makeconftest(CONFTEST)
    hook_log = pytester.path / "hook.jsonl"
    export_out = pytester.path / "export.json"
    monkeypatch.setenv("HOOK_LOG", str(hook_log))
    monkeypatch.setenv("EXPORT_OUT", str(export_out))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-jsonl=r.jsonl",
                                           *xdist)
    result.assert_outcomes(passed=2, failed=1)
    for line in ("*llmbench: exporter BrokenExporter failed in add: disk full (dropped)*",
                 "*llmbench: counted 3 items*", "*llmbench: wrote 3 records to*r.jsonl*"):
        result.stdout.fnmatch_lines([line])
    calls = [json.loads(line) for line in hook_log.read_text().splitlines()]
    assert Counter(c["nodeid"] for c in calls) == Counter(
        {f"math.toml::add[{i}-sim]": 1 for i in ("one", "two", "wrong")})
    assert {c["where"] for c in calls} == {"controller"}
    assert {c["has_item"] for c in calls} == {not xdist}  # the controller has no items
    lines = json.loads(export_out.read_text())
    assert lines[0][0] == "start" and lines[-1] == ["finish", 3, 1, "controller"]
    adds = [line for line in lines if line[0] == "add"]
    assert sorted((a[1], a[2]) for a in adds) == [
        ("math.toml::add[one-sim]", "passed"), ("math.toml::add[two-sim]", "passed"),
        ("math.toml::add[wrong-sim]", "failed")]
    assert {a[3] for a in adds} == {"controller"}
    records = [json.loads(line) for line in (pytester.path / "r.jsonl").read_text().splitlines()]
    assert sorted(r["identity"]["instance"] for r in records) == ["one", "two", "wrong"]


def test_plain_llm_tests_get_a_record_junit_properties_and_a_summary_row(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytester.makepyfile(
        test_plain="""
        import pytest

        def test_right(llm):
            assert llm.chat("What is 20 + 22?").text.strip() == "42"

        def test_wrong(llm):
            assert llm.chat("What is 1 + 1?").text.strip() == "3"

        @pytest.mark.llmbench(api_timeout=0.5, api_retries=0)
        def test_unreachable(llm):
            llm.chat("hello [[sim:hang=1]]")

        def test_no_call(llm):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--junitxml=j.xml",
                                           "--llmbench-jsonl=r.jsonl", "-n", "2")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*llmbench summary*", "*test_plain.py*sim*3*1*1*1*"])
    records = {json.loads(line)["identity"]["prompt"]: json.loads(line)
               for line in (pytester.path / "r.jsonl").read_text().splitlines()}
    assert set(records) == {"test_right", "test_wrong", "test_unreachable"}
    assert records["test_right"]["status"] == "passed"
    assert records["test_right"]["completion_tokens"] > 0
    assert [m["role"] for m in records["test_right"]["messages"]] == ["user", "assistant"]
    assert records["test_wrong"]["status"] == "failed"
    assert records["test_unreachable"]["status"] == "error"
    assert records["test_unreachable"]["error_class"] == "api_timeout"
    cases = {c.get("name"): c for c in ET.parse(pytester.path / "j.xml").iter("testcase")}
    props = {p.get("name"): p.get("value") for p in cases["test_right"].iter("property")}
    assert props["model"] == "sim" and props["suite"] == "test_plain.py"
    assert props["outcome"] == "passed" and int(props["completion_tokens"]) > 0
    outcome = {p.get("name"): p.get("value") for p in cases["test_unreachable"].iter("property")}
    assert outcome["outcome"] == "api_timeout"
    assert not list(cases["test_no_call"].iter("property"))


def test_the_documented_exporter_and_prices_work_under_xdist(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    """docs/report.md's exporter example, as a conftest, under -n 2; a model's prices reach
    the HTML report's cost."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "report.md").read_text()
    section = doc.split("## Exporters", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code
    pytester.makeconftest(code.group(1))
    toml = re.search(r"```toml\n(.*?)```", doc.split("### Costs", 1)[1], re.S)
    assert toml
    pytester.makepyprojecttoml(toml.group(1).replace("gpt-4o", "priced").replace(
        'base_url = "https://api.openai.com/v1"', 'base_url = "sim"'))
    pytester.makefile(".toml", math=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           "--llmbench-model=priced", "--llmbench-html=r.html")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*llmbench: wrote 1 failures to failures.csv*"])
    rows = (pytester.path / "failures.csv").read_text().splitlines()
    assert rows[0].startswith("# run ") and rows[1:] == ["math.toml::add[wrong-priced],failed,None"]
    page = (pytester.path / "r.html").read_text()
    data = json.loads(re.search(r'id="llmbench-data">(.*?)</script>', page, re.S).group(1))
    (group,) = data["groups"]
    assert group["cost"] == pytest.approx(
        (group["tin"] * 2.5 + group["tout"] * 10.0) / 1e6) and group["cost"] > 0
