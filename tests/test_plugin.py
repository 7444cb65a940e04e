"""End to end: suites through pytest itself (pytester), against the real simulator over HTTP."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ARITH = """
[suite]
system = "Answer with the number only."
scorer = "numeric"
tags = ["math"]

[[prompts]]
id = "add"
template = "What is {{a}} + {{b}}?"

[[prompts.instances]]
id = "small"
vars = { a = 2, b = 3 }
expected = "5"

[[prompts.instances]]
id = "wrong"
vars = { a = 2, b = 2 }
expected = "5"

[[prompts]]
id = "mul"
template = "Compute {{a}} * {{b}}"

[[prompts.instances]]
vars = { a = 6, b = 7 }
expected = 42
"""

PASSING = """
[suite]
scorer = "numeric"

[[prompts]]
id = "sub"
template = "What is {{a}} - {{b}}?"

[[prompts.instances]]
id = "one"
vars = { a = 9, b = 4 }
expected = "5"

[[prompts.instances]]
id = "two"
vars = { a = 10, b = 1 }
expected = "9"
"""


def junit_cases(path: Path) -> dict[str, dict[str, str]]:
    tree = ET.parse(path)
    cases = {}
    for case in tree.iter("testcase"):
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        cases[f"{case.get('classname')}::{case.get('name')}"] = props
    return cases


def test_collect_only_gives_stable_readable_node_ids(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", arith=ARITH)
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        ["arith.toml::add[small-sim]", "arith.toml::add[wrong-sim]", "arith.toml::mul[0-sim]"]
    )
    assert result.ret == 0


def test_pass_fail_and_readable_failure(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", arith=ARITH)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*FAILED model sim: score 0.00 < threshold 1*",
            "*prompt:   What is 2 + 2?*",
            "*expected: 5*",
            "*got:      4*",
            "*llmbench summary*",
        ]
    )
    assert result.ret == 1


def test_markers_and_k_select_items(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", arith=ARITH, other=PASSING)
    result = pytester.runpytest("-m", "math", "-k", "add", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["arith.toml::add[small-sim]", "arith.toml::add[wrong-sim]"])
    result.stdout.no_fnmatch_line("*other.toml*")
    result.stdout.no_fnmatch_line("*mul*")


def test_xdist_junit_properties_on_every_case(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", arith=ARITH, other=PASSING)
    junit = pytester.path / "out.xml"
    result = pytester.runpytest("-n", "2", f"--junitxml={junit}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    cases = junit_cases(junit)
    assert len(cases) == 5
    for name, props in cases.items():
        for prop in ("model", "suite", "outcome", "score", "latency", "prompt_tokens",
                     "completion_tokens", "attempts", "cached"):
            assert prop in props, (name, prop, props)
        assert props["model"] == "sim"
        assert props["attempts"] == "1"
    outcomes = sorted(p["outcome"] for p in cases.values())
    assert outcomes == ["failed", "passed", "passed", "passed", "passed"]
    result.stdout.fnmatch_lines(["*llmbench summary*", "*arith*sim*"])


def test_second_run_reports_from_the_store_without_api_calls(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_llmbench.sim.control import SimServer

    pytester.makefile(".toml", other=PASSING)
    log = pytester.path / "requests.jsonl"
    with SimServer.start(request_log=log) as sim:
        monkeypatch.setenv("LLMBENCH_SIM_URL", sim.base_url)
        first = pytester.runpytest("-p", "no:cacheprovider")
        first.assert_outcomes(passed=2)
        assert len(sim.requests()) == 2
        second = pytester.runpytest("-p", "no:cacheprovider")
        second.assert_outcomes(passed=2)
        second.stdout.fnmatch_lines(["*2 of 2 items reported from the store*"])
        assert len(sim.requests()) == 2
        fresh = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-fresh")
        fresh.assert_outcomes(passed=2)
        assert len(sim.requests()) == 4


def test_schema_error_is_one_collection_error_and_other_files_run(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytester.makefile(".toml", other=PASSING)
    pytester.makefile(".toml", bad='[[prompts]]\nid = "x"\ntemplat = "hi"\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*bad.toml: prompts?0?.templat: unknown key*did you mean*"])
    result.assert_outcomes(passed=2, errors=1)
    assert "Traceback" not in result.stdout.str()
    assert result.ret != 0


def test_unknown_scorer_is_a_collection_error(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", bad=PASSING.replace('scorer = "numeric"', 'scorer = "numerik"'))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*bad.toml*numerik*"])
    assert "Traceback" not in result.stdout.str()
    assert result.ret != 0


def test_retry_after_is_waited_out_and_recorded(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(
        ".toml",
        faults="""
[[prompts]]
id = "limited"
template = "What is 1 + 1? [[sim:fail=429 retry_after=1 times=1]]"
scorer = "numeric"
[[prompts.instances]]
expected = 2
""",
    )
    out = pytester.path / "r.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmbench-jsonl={out}")
    result.assert_outcomes(passed=1)
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["outcome"] for a in record["attempts"]] == ["rate_limited", "ok"]
    assert 0.9 <= record["attempts"][0]["wait"] <= 3.0


def test_api_key_never_written_anywhere(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_llmbench.sim.control import SimServer

    secret = "sk-test-SECRET-0123456789"
    pytester.makefile(".toml", other=PASSING)
    log = pytester.path / "requests.jsonl"
    with SimServer.start(request_log=log, require_key=secret) as sim:
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        ok = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--llmbench-model=remote@{sim.base_url}",
            "--junitxml=j.xml", "--llmbench-jsonl=r.jsonl", "-n", "2", "-v", "--log-level=DEBUG",
        )
        ok.assert_outcomes(passed=2)
        monkeypatch.setenv("OPENAI_API_KEY", secret + "-wrong")
        bad = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--llmbench-model=remote@{sim.base_url}",
            "--llmbench-fresh", "--junitxml=j2.xml", "--llmbench-jsonl=r2.jsonl",
            "--llmbench-no-preflight",  # the items' own 401s are what is checked here
        )
        bad.assert_outcomes(errors=2)
        bad.stdout.fnmatch_lines(["*ERROR [auth_error]*"])
        # a 401 is tried once per item
        assert len(sim.requests()) == 2 + 2
    texts = [ok.stdout.str(), ok.stderr.str(), bad.stdout.str(), bad.stderr.str()]
    for path in pytester.path.rglob("*"):
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    assert not [t for t in texts if secret in t]


def test_rescore_uses_stored_completions_without_api_calls(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_llmbench.sim.control import SimServer

    suite = '[[prompts]]\nid = "p"\ntemplate = "What is 2 + 2?"\nscorer = "numeric"\n' \
            '[[prompts.instances]]\nexpected = "5"\n'
    pytester.makefile(".toml", s=suite)
    with SimServer.start(request_log=pytester.path / "requests.jsonl") as sim:
        monkeypatch.setenv("LLMBENCH_SIM_URL", sim.base_url)
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
        pytester.makefile(".toml", s=suite.replace('"5"', '"4"'))  # the expectation was wrong
        result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-rescore")
        result.assert_outcomes(passed=1)
        assert len(sim.requests()) == 1
        # without a stored answer, rescoring a new prompt still runs it
        pytester.makefile(".toml", s=suite.replace("2 + 2", "3 + 3").replace('"5"', '"6"'))
        pytester.runpytest("-p", "no:cacheprovider", "--llmbench-rescore").assert_outcomes(passed=1)
        assert len(sim.requests()) == 2


@pytest.mark.parametrize(("workers", "expected"), [(None, 16), ("1", 16), ("2", 32), ("8", 8), ("32", 2), ("64", 2)])
def test_default_concurrency_is_shared_by_xdist_workers(
    monkeypatch: pytest.MonkeyPatch, workers: str | None, expected: int
) -> None:
    from pytest_llmbench.config import default_concurrency

    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    assert default_concurrency() == expected
