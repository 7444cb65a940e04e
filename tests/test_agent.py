"""Agentic suites end to end: pytest (pytester, plain and -n 2) against the simulator over
HTTP, tools run for real in the item processes."""

from __future__ import annotations

import json
import secrets
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

TOOLS = '''
[suite]
system = "Use the tools."
agent = { max_turns = 6, loop_repeats = 3 }
deadlines = { api_timeout = 10, api_retries = 1, task_timeout = 60 }

[[suite.tools]]
name = "calculator"
description = "Arithmetic"
parameters = { type = "object", properties = { expression = { type = "string" } }, required = ["expression"] }
function = "agtools:calculator"

[[suite.tools]]
name = "lookup"
description = "Facts"
parameters = { type = "object", properties = { query = { type = "string" } }, required = ["query"] }
command = ["{python}", "lookup.py"]
timeout = 10
'''

# a suite's own deadlines win over the command line: tests that set them there use this
NO_DEADLINES = TOOLS.replace(
    "deadlines = { api_timeout = 10, api_retries = 1, task_timeout = 60 }", "")

AGTOOLS = '''
def calculator(expression):
    import ast
    return str(eval(compile(ast.parse(expression, mode="eval"), "<expr>", "eval"), {}, {}))

def broken(expression):
    raise ValueError("calculator is broken")
'''

LOOKUP = '''
import json, sys
facts = {"population of oslo": "709037", "population of graz": "298479",
         "capital of norway": "Oslo"}
print(facts.get(json.load(sys.stdin)["query"].lower(), "no entry"))
'''


def prompt(pid: str, template: str, expected: str | None = None, scorer: str = "numeric",
           extra: str = "") -> str:
    text = f'\n[[prompts]]\nid = "{pid}"\ntemplate = "{template}"\nscorer = "{scorer}"\n{extra}\n'
    text += "[[prompts.instances]]\n"
    if expected is not None:
        text += f'expected = "{expected}"\n'
    return text


def setup_suite(pytester: pytest.Pytester, body: str, tools: str = TOOLS) -> Path:
    pytester.makepyfile(agtools=AGTOOLS)
    (pytester.path / "lookup.py").write_text(LOOKUP)
    pytester.makefile(".toml", agents=tools + body)
    return pytester.path / "out.jsonl"


def records(out: Path) -> dict[str, dict[str, Any]]:
    return {r["identity"]["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}


def kinds(record: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in record["transcript"]]


MULTI = prompt("multi", "What is the population of Oslo minus the population of Graz?",
               "410558")


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "n2"])
def test_multi_step_tool_task_passes(pytester: pytest.Pytester, sim_env: str,
                                     xdist: bool) -> None:
    out = setup_suite(pytester, MULTI + prompt("calc", "Use the calculator: what is 6 * 7?", "42"))
    junit = pytester.path / "junit.xml"
    args = ["-p", "no:cacheprovider", f"--llmbench-jsonl={out}", f"--junitxml={junit}"]
    result = pytester.runpytest_subprocess(*args + (["-n", "2"] if xdist else []), timeout=120)
    result.assert_outcomes(passed=2)
    assert 'name="tool_calls" value="3"' in junit.read_text()
    multi = records(out)["multi"]
    assert kinds(multi) == ["message", "message", "answer", "tool", "tool", "answer", "tool",
                            "answer"]
    tools = [e for e in multi["transcript"] if e["kind"] == "tool"]
    assert [(t["name"], t["content"], t["ok"]) for t in tools] == [
        ("lookup", "709037", True), ("lookup", "298479", True), ("calculator", "410558", True)]
    assert multi["transcript"][2]["tool_calls"][1]["name"] == "lookup"  # parallel calls
    assert multi["answer"] == "410558"
    roles = [m["role"] for m in multi["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "tool", "assistant", "tool",
                     "assistant"]
    assert multi["prompt_tokens"] > 0 and len(multi["completions"]) == 3


FAILURES = (
    prompt("bad-args", "Use the calculator: what is 6 * 7? [[sim:agent=bad_args]]", "42")
    + prompt("unknown", "Use the calculator: what is 6 * 7? [[sim:agent=unknown_tool]]", "42")
    + prompt("raises", "Use the calculator: what is 6 * 7?", "42", extra='tools = ["broken"]')
    + prompt("timeout", "Use the calculator: what is 6 * 7?", "42", extra='tools = ["hangs"]')
)
FAILING_TOOLS = TOOLS + '''
[[suite.tools]]
name = "broken"
parameters = { type = "object", properties = { expression = { type = "string" } } }
function = "agtools:broken"

[[suite.tools]]
name = "hangs"
parameters = { type = "object", properties = { expression = { type = "string" } } }
command = ["sleep", "300"]
timeout = 1
'''


def test_each_tool_failure_is_an_error_result_and_the_item_goes_on(
        pytester: pytest.Pytester, sim_env: str) -> None:
    out = setup_suite(pytester, FAILURES, FAILING_TOOLS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--llmbench-jsonl={out}",
                                           timeout=120)
    result.assert_outcomes(passed=4)
    found = records(out)
    expected = {
        "bad-args": "do not match its schema: 12345 is not of type 'string'",
        "unknown": "unknown tool 'no_such_tool'; available tools: calculator, lookup",
        "raises": "broken raised ValueError: calculator is broken",
        "timeout": "hangs timed out after 1.00 s",
    }
    for pid, error in expected.items():
        failed = [e for e in found[pid]["transcript"] if e["kind"] == "tool" and not e["ok"]]
        assert len(failed) == 1 and error in failed[0]["content"], (pid, failed)
        assert found[pid]["messages"][3]["role"] == "tool"
        assert found[pid]["messages"][3]["content"].startswith("ERROR: ")
        assert found[pid]["answer"] == "42"


def test_loop_is_detected_at_the_nth_repeat(pytester: pytest.Pytester, sim_env: str) -> None:
    body = prompt("loops", "Look up the capital of Norway. [[sim:agent=loop]]", "Oslo",
                  scorer="exact", extra="agent = { loop_repeats = 4 }")
    out = setup_suite(pytester, body)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--llmbench-jsonl={out}",
                                           timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR [[]loop[]]*the same tool call was made 4 times: "
        'lookup({"query":"Look up the capital of Norway."})*',
        "*transcript: 10 entries*",
        "*stopped: loop: lookup(*",
        "*llmbench summary*",
    ])
    summary = result.stdout.str().split("llmbench summary")[1]
    assert "loop" in summary
    rec = records(out)["loops"]
    assert rec["error_class"] == "loop"
    assert kinds(rec).count("answer") == 4 and kinds(rec).count("tool") == 3
    assert rec["details"]["repeated"] == 'lookup({"query":"Look up the capital of Norway."})'


def test_max_turns_and_token_budget_end_the_item(pytester: pytest.Pytester,
                                                 sim_env: str) -> None:
    body = (prompt("forever", "Look up the capital of Norway. [[sim:agent=forever]]", "x",
                   scorer="exact", extra="agent = { max_turns = 3 }")
            + prompt("budget", "What is the population of Oslo minus the population of Graz?",
                     "410558", extra="agent = { token_budget = 40 }")
            + prompt("expected", "Look up the capital of Norway. [[sim:agent=forever]]",
                     extra='agent = { max_turns = 2, expect_error = "max_turns" }'))
    out = setup_suite(pytester, body)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--llmbench-jsonl={out}",
                                           timeout=120)
    result.assert_outcomes(errors=2, passed=1)
    result.stdout.fnmatch_lines([
        "*ERROR [[]max_turns[]]*max_turns = 3 model calls*",
        "*ERROR [[]budget_exceeded[]]*tokens spent, over the token_budget of 40*",
    ])
    found = records(out)
    assert kinds(found["forever"]).count("answer") == 3
    assert found["budget"]["error_class"] == "budget_exceeded"
    assert found["budget"]["prompt_tokens"] + found["budget"]["completion_tokens"] > 40
    assert found["expected"]["status"] == "passed"
    assert found["expected"]["details"]["expected_error"] == "max_turns"
    summary = result.stdout.str().split("llmbench summary")[1]
    assert "budget_exceeded:1" in summary and "max_turns:1" in summary
    result.stdout.fnmatch_lines(["expected errors agents x sim (passed): max_turns 1"])


def test_a_task_whose_every_call_hangs_ends_at_the_task_deadline(
        pytester: pytest.Pytester, sim_env: str) -> None:
    # 10 turns x (1 + 2 retries) x 2 s of api_timeout would be 60 s; the task has 3 s.
    body = prompt("hangs", "Look up the capital of Norway. [[sim:agent=forever hang=1]]",
                  "x", scorer="exact", extra="agent = { max_turns = 10 }")
    out = setup_suite(pytester, body, NO_DEADLINES)
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--llmbench-jsonl={out}", "--llmbench-task-timeout=3",
        "--llmbench-api-timeout=2", "--llmbench-api-retries=2", "-n", "2", timeout=120)
    wall = time.monotonic() - started
    result.assert_outcomes(errors=1)
    # the start-up check used the suite's max_turns (found by a worker, shown by the controller)
    result.stdout.fnmatch_lines(["llmbench WARNING: deadline hierarchy violated in agents.toml:"
                                 " hangs: task_timeout 3 s <= api_timeout 2 s x (retries 2 + 1)"
                                 " x max_turns 10 = 60 s*"])
    rec = records(out)["hangs"]
    # the task deadline either cut an attempt (task_timeout) or left no time for the next
    # attempt's backoff (the last attempt's api_timeout stands): never 10 turns of retries
    assert rec["error_class"] in ("task_timeout", "api_timeout")
    assert rec["elapsed"] <= 3 + 2.0
    assert len(rec["attempts"]) <= 2 and len(rec["completions"]) == 0
    assert wall < 40


def _spawner(mark: str, hang: bool) -> str:
    return textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen(["setsid", "sleep", "{mark}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        if {hang}:
            time.sleep(300)
        print("done")
    """)


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "n2"])
def test_a_hanging_tool_and_its_setsid_grandchild_are_killed_with_the_item(
        pytester: pytest.Pytester, sim_env: str, leftovers: Any, xdist: bool) -> None:
    mark = str(1000 + secrets.randbelow(10**6))  # sleep's argument: findable in /proc
    (pytester.path / "spawner.py").write_text(_spawner(mark, hang=True))
    tools = NO_DEADLINES + '''
[[suite.tools]]
name = "spawner"
parameters = { type = "object", properties = { query = { type = "string" } } }
command = ["{python}", "spawner.py"]
timeout = 300
'''
    body = prompt("killed", "Look up the capital of Norway.", "Oslo", scorer="exact",
                  extra='tools = ["spawner"]')
    out = setup_suite(pytester, body, tools)
    args = ["-p", "no:cacheprovider", f"--llmbench-jsonl={out}", "--llmbench-task-timeout=3"]
    result = pytester.runpytest_subprocess(*args + (["-n", "2"] if xdist else []), timeout=120)
    result.assert_outcomes(errors=1)
    rec = records(out)["killed"]
    assert rec["error_class"] == "task_timeout"
    # the transcript is kept whichever came first: the engine's kill at the deadline, or
    # the tool's timeout (capped by the task deadline) and then no time for another call
    calls = [e for e in rec["transcript"] if e["kind"] == "answer"]
    assert calls[0]["tool_calls"][0]["name"] == "spawner"
    deadline = time.monotonic() + 10
    while leftovers(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(mark) == []


def test_a_tool_that_exits_leaving_a_setsid_daemon_does_not_leave_it(
        pytester: pytest.Pytester, sim_env: str, leftovers: Any) -> None:
    mark = str(1000 + secrets.randbelow(10**6))
    (pytester.path / "spawner.py").write_text(_spawner(mark, hang=False))
    tools = TOOLS + '''
[[suite.tools]]
name = "spawner"
parameters = { type = "object", properties = { query = { type = "string" } } }
command = ["{python}", "spawner.py"]
'''
    body = prompt("daemon", "Look up the capital of Norway.", "done", scorer="exact",
                  extra='tools = ["spawner"]')
    out = setup_suite(pytester, body, tools)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--llmbench-jsonl={out}",
                                           timeout=120)
    result.assert_outcomes(passed=1)
    deadline = time.monotonic() + 10
    while leftovers(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(mark) == []


def test_llm_fixture_passes_tools_and_shares_the_rate_limits(
        pytester: pytest.Pytester, sim_env: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # limits of this test only
    pytester.makepyfile(test_tools='''
        import json, time
        import pytest
        from pytest_llmbench.errors import APIError

        TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {
            "type": "object", "properties": {"expression": {"type": "string"}}}}}]

        def test_tool_calls(llm):
            answer = llm.chat("What is 6 * 7?", tools=TOOLS)
            assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
                ("calc", {"expression": "6 * 7"})]
            messages = [{"role": "user", "content": "What is 6 * 7?"},
                        answer.assistant_message(),
                        {"role": "tool", "tool_call_id": answer.tool_calls[0].id,
                         "content": "42"}]
            assert llm.chat(messages, tools=TOOLS).text == "42"

        @pytest.mark.llmbench(api_retries=0)
        def test_a_429_blocks_the_next_call(llm):
            with pytest.raises(APIError):
                llm.chat("What is 1 + 1? [[sim:fail=429 retry_after=2]]")
            started = time.monotonic()
            assert llm.chat("What is 2 + 2?").text == "4"
            # the shared limiter held the second call for the first one's Retry-After
            assert time.monotonic() - started >= 1.0
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)
