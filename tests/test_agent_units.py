"""The agent loop's parts without pytest runs: guards, tool runner, suite schema, the
simulator's agent and tool calls over real HTTP (streamed and not)."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

from pytest_llmbench.agent.guards import Guards, call_key
from pytest_llmbench.agent.tools import ToolRunner
from pytest_llmbench.collect.suite import load_suite
from pytest_llmbench.errors import AgentStop, SuiteError
from pytest_llmbench.providers import api
from pytest_llmbench.records import (
    AgentLimits,
    Completion,
    Deadlines,
    ModelSpec,
    ToolCall,
    ToolSpec,
)
from pytest_llmbench.sim.agent import agent_reply

CALC = {"type": "object", "properties": {"expression": {"type": "string"}},
        "required": ["expression"]}
LOOKUP = {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}


def _answer(*calls: tuple[str, str], text: str = "", tokens: int = 0) -> Completion:
    return Completion(text=text, finish_reason="tool_calls" if calls else "stop",
                      prompt_tokens=tokens,
                      tool_calls=tuple(ToolCall(id=f"c{i}", name=n, arguments=a)
                                       for i, (n, a) in enumerate(calls)))


# --- guards --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5])
def test_loop_fires_at_the_nth_repeat_and_not_before(n: int) -> None:
    guards = Guards(AgentLimits(loop_repeats=n, max_tool_calls=100))
    for _ in range(n - 1):
        guards.check_answer(_answer(("lookup", '{"q": 1, "p": 2}')))
    with pytest.raises(AgentStop) as info:
        # the same call with its keys in another order and other blanks is the same call
        guards.check_answer(_answer(("lookup", '{ "p":2,"q":1 }')))
    assert info.value.error_class == "loop"
    assert info.value.detail == 'lookup({"p":2,"q":1})'
    assert f"made {n} times" in str(info.value)


def test_different_arguments_are_not_a_loop_but_max_tool_calls_ends_them() -> None:
    guards = Guards(AgentLimits(max_tool_calls=5))
    for i in range(5):
        guards.check_answer(_answer(("lookup", json.dumps({"q": i}))))
    with pytest.raises(AgentStop) as info:
        guards.check_answer(_answer(("lookup", '{"q": 99}')))
    assert info.value.error_class == "max_tool_calls"


def test_a_repeated_plain_answer_is_a_loop_too() -> None:
    guards = Guards(AgentLimits(loop_repeats=2))
    guards.check_answer(_answer(text="I do not know."))
    with pytest.raises(AgentStop, match="same assistant message"):
        guards.check_answer(_answer(text="I do not know. "))


def test_max_turns_and_token_budget() -> None:
    guards = Guards(AgentLimits(max_turns=2, token_budget=100))
    guards.before_call()
    guards.after_answer(_answer(tokens=60))
    guards.before_call()
    with pytest.raises(AgentStop) as info:
        guards.after_answer(_answer(tokens=41))
    assert info.value.error_class == "budget_exceeded"
    with pytest.raises(AgentStop) as info:
        guards.before_call()
    assert info.value.error_class == "max_turns"


def test_agent_stop_survives_pickling() -> None:
    import pickle

    exc = pickle.loads(pickle.dumps(AgentStop("loop", "msg", "f({})")))
    assert (exc.error_class, str(exc), exc.detail) == ("loop", "msg", "f({})")
    assert call_key(ToolCall(id="x", name="f", arguments="not json ")) == "f(not json)"


# --- the tool runner ---------------------------------------------------------------------


@pytest.fixture
def tool_dir(tmp_path: Path) -> Path:
    (tmp_path / "mytools.py").write_text(textwrap.dedent("""
        import time
        def add(a, b):
            return {"sum": a + b}
        def boom(a, b):
            raise RuntimeError("tool broke")
        def slow(a, b):
            time.sleep(30)
    """))
    (tmp_path / "echo.py").write_text(
        "import json, sys\nargs = json.load(sys.stdin)\nprint(args['a'] * args['b'])\n")
    (tmp_path / "fail.py").write_text("import sys\nsys.stderr.write('bad input')\nsys.exit(3)\n")
    return tmp_path


def _runner(tool_dir: Path, timeout: float = 5.0, **kinds: str | list[str]) -> ToolRunner:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "required": ["a", "b"]}
    tools = []
    for name, impl in kinds.items():
        if isinstance(impl, str):
            tools.append(ToolSpec(name=name, parameters=schema, function=impl, timeout=timeout,
                                  base_dir=str(tool_dir)))
        else:
            tools.append(ToolSpec(name=name, parameters=schema, command=tuple(impl),
                                  timeout=timeout, base_dir=str(tool_dir)))
    return ToolRunner(tools, task_deadline=time.monotonic() + 60, result_chars=200)


def _call(runner: ToolRunner, name: str, args: str) -> tuple[bool, str]:
    result = runner.call(ToolCall(id="1", name=name, arguments=args))
    return result.ok, result.content


def test_function_and_command_tools_give_results(tool_dir: Path) -> None:
    runner = _runner(tool_dir, add="mytools:add", mul=["{python}", "echo.py"])
    assert _call(runner, "add", '{"a": 2, "b": 3}') == (True, '{"sum": 5}')
    assert _call(runner, "mul", '{"a": 6, "b": 7}') == (True, "42")


@pytest.mark.parametrize(("name", "args", "error"), [
    ("nope", "{}", "unknown tool 'nope'; available tools: add, boom, slow, fail"),
    ("add", "{not json", "the arguments of add are not valid JSON"),
    ("add", "[1, 2]", "the arguments of add must be a JSON object"),
    ("add", '{"a": "two", "b": 3}', "do not match its schema: 'two' is not of type 'integer'"),
    ("add", '{"a": 2}', "do not match its schema: 'b' is a required property"),
    ("boom", '{"a": 1, "b": 2}', "boom raised RuntimeError: tool broke"),
    ("slow", '{"a": 1, "b": 2}', "slow timed out after 0.50 s"),
    ("fail", '{"a": 1, "b": 2}', "fail exited with status 3: bad input"),
])
def test_every_tool_failure_is_an_error_result(tool_dir: Path, name: str, args: str,
                                               error: str) -> None:
    runner = _runner(tool_dir, timeout=0.5, add="mytools:add", boom="mytools:boom",
                     slow="mytools:slow", fail=["{python}", "fail.py"])
    ok, content = _call(runner, name, args)
    assert not ok
    assert content.startswith("ERROR: ") and error in content


def test_a_long_result_is_cut(tool_dir: Path) -> None:
    (tool_dir / "big.py").write_text("print('x' * 5000)\n")
    runner = _runner(tool_dir, big=["{python}", "big.py"])
    ok, content = _call(runner, "big", '{"a": 1, "b": 2}')
    assert ok and content.startswith("x" * 200) and content.endswith("[cut: 5000 chars]")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_timed_out_command_is_killed_with_its_setsid_grandchild(tool_dir: Path) -> None:
    pidfile = tool_dir / "grandchild.pid"
    (tool_dir / "spawn.py").write_text(textwrap.dedent(f"""
        import subprocess, sys, time
        p = subprocess.Popen(["setsid", "sleep", "300"])
        open({str(pidfile)!r}, "w").write(str(p.pid))
        time.sleep(300)
    """))
    runner = _runner(tool_dir, timeout=1.0, spawn=["{python}", "spawn.py"])
    ok, content = _call(runner, "spawn", '{"a": 1, "b": 2}')
    assert not ok and "timed out" in content
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_command_that_exits_leaving_a_daemon_does_not_leave_it_running(tool_dir: Path) -> None:
    pidfile = tool_dir / "daemon.pid"
    (tool_dir / "daemon.py").write_text(textwrap.dedent(f"""
        import subprocess
        p = subprocess.Popen(["setsid", "sleep", "300"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        open({str(pidfile)!r}, "w").write(str(p.pid))
        print("started")
    """))
    runner = _runner(tool_dir, daemon=["{python}", "daemon.py"])
    pid = os.fork()
    if pid == 0:  # the runner makes its process a subreaper: do it in a child of the test
        code = 0 if _call(runner, "daemon", '{"a": 1, "b": 2}') == (True, "started") else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    daemon = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while _alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(daemon)


# --- suite schema ---------------------------------------------------------------------------

SUITE = """
[suite]
agent = {{ max_turns = 4 }}

[[suite.tools]]
name = "calc"
parameters = {{ type = "object", properties = {{ expression = {{ type = "string" }} }} }}
{impl}

[[prompts]]
id = "p"
template = "What is 2 + 2?"
{prompt}

[[prompts.instances]]
expected = "4"
"""


def _load(tmp_path: Path, impl: str = 'function = "m:f"', prompt: str = "") -> object:
    path = tmp_path / "s.toml"
    path.write_text(SUITE.format(impl=impl, prompt=prompt))
    return load_suite(path, rootdir=tmp_path)


def test_tools_and_limits_reach_the_case(tmp_path: Path) -> None:
    suite = _load(tmp_path, prompt='agent = { loop_repeats = 4 }')
    case = suite.cases[0]  # type: ignore[attr-defined]
    assert [t.name for t in case.tools] == ["calc"]
    assert case.tools[0].base_dir == str(tmp_path)
    assert case.agent == AgentLimits(max_turns=4, loop_repeats=4)
    assert case.tools[0].openai_tool()["function"]["parameters"]["type"] == "object"


@pytest.mark.parametrize(("impl", "prompt", "message"), [
    ('function = "m:f"\ncommand = ["x"]', "",
     "suite.tools[0]: a tool needs exactly one implementation: 'function' or 'command' (both"),
    ("", "", "suite.tools[0]: a tool needs exactly one implementation"),
    ('function = "nocolon"', "", "suite.tools[0].function: expected 'module:function'"),
    ('command = []', "", "suite.tools[0].command: the command is empty"),
    ('function = "m:f"\ntimeout = -1', "", "suite.tools[0].timeout: expected a positive number"),
    ('function = "m:f"', 'tools = ["calcc"]',
     "prompts[0].tools[0]: no suite tool named 'calcc' (suite tools: calc)"),
    ('function = "m:f"', 'agent = { max_turn = 3 }', "prompts[0].agent.max_turn: unknown key"),
    ('function = "m:f"', 'agent = { loop_repeats = 1 }', "loop_repeats must be at least 2"),
    ('function = "m:f"', 'agent = { expect_error = "lop" }',
     "prompts[0].agent.expect_error: unknown error class 'lop'"),
])
def test_tool_schema_errors_name_the_key_and_the_fix(tmp_path: Path, impl: str, prompt: str,
                                                     message: str) -> None:
    with pytest.raises(SuiteError) as info:
        _load(tmp_path, impl, prompt)
    assert message in str(info.value)


def test_a_bad_json_schema_is_a_collection_error(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SUITE.format(impl='function = "m:f"', prompt="").replace(
        '{ type = "string" }', '{ type = "strng" }'))
    with pytest.raises(SuiteError, match=r"suite.tools\[0\].parameters: not a valid JSON "
                                         r"schema at properties/expression/type"):
        load_suite(path, rootdir=tmp_path)


# --- the simulator's agent ------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": CALC}},
         {"type": "function", "function": {"name": "find", "parameters": LOOKUP}}]


def test_sim_agent_plans_parallel_lookups_then_the_calculator() -> None:
    q = [{"role": "user", "content": "What is the population of Oslo plus the population of Graz?"}]
    first = agent_reply(q, TOOLS)
    assert first is not None
    assert [json.loads(c["arguments"]) for c in first.tool_calls] == [
        {"query": "population of Oslo"}, {"query": "population of Graz"}]
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": c["name"],
              "arguments": c["arguments"]}} for i, c in enumerate(first.tool_calls)]
    q += [{"role": "assistant", "content": None, "tool_calls": calls},
          {"role": "tool", "tool_call_id": "c0", "content": "700"},
          {"role": "tool", "tool_call_id": "c1", "content": "300"}]
    second = agent_reply(q, TOOLS)
    assert second is not None and second.tool_calls == [
        {"name": "calc", "arguments": '{"expression": "700 + 300"}'}]
    q += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c2", "type": "function", "function": second.tool_calls[0]}]},
        {"role": "tool", "tool_call_id": "c2", "content": "ERROR: calc timed out"}]
    third = agent_reply(q, TOOLS)
    assert third is not None and third.text == "1000" and not third.tool_calls


def test_sim_agent_leaves_questions_without_a_tool_to_the_plain_model() -> None:
    assert agent_reply([{"role": "user", "content": "Reverse the word: abc"}], TOOLS) is None


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_over_http_streamed_and_not(shared_sim: str, stream: bool) -> None:
    model = ModelSpec(name="sim", model="sim", base_url=shared_sim, stream=stream)
    messages = [{"role": "user", "content": "What is the population of Oslo minus the "
                 f"population of Graz? [[sim:latency=0.0{int(stream)}]]"}]
    answer = api.chat(model, messages, tools=TOOLS, deadlines=Deadlines(api_timeout=10))
    assert answer.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("find", {"query": "population of Oslo"}), ("find", {"query": "population of Graz"})]
    assert all(c.id for c in answer.tool_calls)
    messages.append(answer.assistant_message())
    messages += [{"role": "tool", "tool_call_id": answer.tool_calls[0].id, "content": "709037"},
                 {"role": "tool", "tool_call_id": answer.tool_calls[1].id, "content": "298479"}]
    step = api.chat(model, messages, tools=TOOLS, deadlines=Deadlines(api_timeout=10))
    assert [json.loads(c.arguments) for c in step.tool_calls] == [
        {"expression": "709037 - 298479"}]


def test_unknown_agent_mode_is_a_bad_directive(shared_sim: str) -> None:
    from pytest_llmbench.errors import APIError

    model = ModelSpec(name="sim", model="sim", base_url=shared_sim)
    with pytest.raises(APIError, match="unknown sim agent mode 'lop'"):
        api.chat(model, [{"role": "user", "content": "hi [[sim:agent=lop]]"}], tools=TOOLS,
                 deadlines=Deadlines(api_timeout=10))




def test_a_command_never_sees_the_api_key_and_results_mask_it(
        tool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_KEY", "sk-secret-123")
    monkeypatch.setenv("OTHER_NAME", "sk-secret-123")
    (tool_dir / "env.py").write_text(
        "import os\nprint(os.environ.get('MY_API_KEY'), os.environ.get('OTHER_NAME'))\n")
    (tool_dir / "leak.py").write_text("print('key: sk-secret-123')\n")
    runner = ToolRunner(
        [ToolSpec(name=n, command=("{python}", f"{n}.py"), base_dir=str(tool_dir))
         for n in ("env", "leak")],
        task_deadline=time.monotonic() + 60, secrets={"MY_API_KEY": "sk-secret-123"})
    assert runner.call(ToolCall(id="1", name="env", arguments="{}")).content == "None None"
    assert runner.call(ToolCall(id="2", name="leak", arguments="{}")).content == "key: ***"


def test_a_prompt_has_its_own_tools_or_none(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SUITE.format(impl='function = "m:f"', prompt="") + textwrap.dedent('''
        [[prompts]]
        id = "own"
        template = "hi"
        tools = ["calc", { name = "echo", command = "cat" }]

        [[prompts.instances]]
        expected = "x"

        [[prompts]]
        id = "none"
        template = "hi"
        tools = []

        [[prompts.instances]]
        expected = "x"
    '''))
    cases = {c.prompt_id: c for c in load_suite(path, rootdir=tmp_path).cases}
    assert [t.name for t in cases["own"].tools] == ["calc", "echo"]
    assert cases["own"].tools[1].command == ("cat",)
    assert cases["none"].tools == () and cases["none"].agent == AgentLimits(max_turns=4)


def test_malformed_tools_are_a_bad_request(shared_sim: str) -> None:
    from pytest_llmbench.errors import APIError

    model = ModelSpec(name="sim", model="sim", base_url=shared_sim)
    with pytest.raises(APIError, match="'tools' must be an array") as info:
        api.chat(model, [{"role": "user", "content": "hi"}], tools=[{"type": "function"}],
                 deadlines=Deadlines(api_timeout=10))
    assert info.value.error_class == "bad_request"
