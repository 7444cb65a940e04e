"""The task deadline kills an item's whole process tree; the other items are unaffected.

Each stuck behaviour runs inside a real item process (a ``module:function`` scorer is code
that runs in the item's child), with and without xdist; afterwards no process the test
started may be left (checked in /proc by a unique marker on its command line).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import pytest

STUCK = {
    # a model call that never answers
    "hang": None,
    "python_loop": """
import signal
def score(req):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        pass
""",
    "gil_held_in_c": """
import ctypes, signal
def score(req):
    signal.signal(signal.SIGTERM, lambda *a: None)
    libc = ctypes.PyDLL(None)   # PyDLL keeps the GIL during the C call
    while True:
        libc.sleep(1000)
""",
    "child_sleep": """
import subprocess
def score(req):
    subprocess.run(["sleep", "1000.MARK"])
""",
    "setsid_grandchild": """
import subprocess, time
def score(req):
    subprocess.Popen(["setsid", "sleep", "1000.MARK"])
    time.sleep(1000)
""",
}

TASK_TIMEOUT = 2.0


def write_suite(pytester: pytest.Pytester, kind: str, mark: str) -> None:
    code = STUCK[kind]
    if code is not None:
        pytester.makepyfile(stuck_scorer=code.replace("MARK", mark))
    stuck_prompt = (
        '[[prompts]]\nid = "stuck"\ntemplate = "What is 1 + 1? [[sim:hang=1]]"\nscorer = "numeric"\n'
        if code is None
        else '[[prompts]]\nid = "stuck"\ntemplate = "What is 1 + 1?"\nscorer = "stuck_scorer:score"\n'
    )
    pytester.makefile(
        ".toml",
        suite=stuck_prompt
        + '[[prompts.instances]]\nexpected = "2"\n\n'
        + '[[prompts]]\nid = "fine"\ntemplate = "What is {{a}} + 1?"\nscorer = "numeric"\n'
        + "".join(f'[[prompts.instances]]\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n' for i in range(4)),
    )


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "n2"])
@pytest.mark.parametrize("kind", list(STUCK))
def test_stuck_item_is_killed_at_its_deadline(
    pytester: pytest.Pytester, sim_env: str, kind: str, xdist: bool, leftovers: Any
) -> None:
    mark = secrets.token_hex(4)
    write_suite(pytester, kind, str(int(mark, 16)))
    out = pytester.path / "r.jsonl"
    # api_timeout 120 s, and the run must end well before it: a loaded machine (CI runs three
    # suites at once) took over 50 s for this run of 5 items, so the bound is 90 s.
    args = ["-p", "no:cacheprovider", f"--llmbench-task-timeout={TASK_TIMEOUT}",
            "--llmbench-api-timeout=120", f"--llmbench-jsonl={out}"]
    if xdist:
        args += ["-n", "2"]
    started = time.monotonic()
    result = pytester.runpytest_subprocess(*args, timeout=180)
    wall = time.monotonic() - started
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*ERROR [[]task_timeout[]]*task deadline of 2 s exceeded*"])
    records = {r["identity"]["prompt"] + r["identity"]["instance"]: r
               for r in map(json.loads, out.read_text().splitlines())}
    stuck = records["stuck0"]
    assert stuck["status"] == "error" and stuck["error_class"] == "task_timeout"
    assert stuck["deadline_layer"] == "task"
    assert TASK_TIMEOUT <= stuck["elapsed"] <= TASK_TIMEOUT + 2.0
    assert wall < 90  # nothing waited for the stuck item beyond its deadline
    if kind == "hang":
        assert stuck["attempts"] == [] or all(a["outcome"] != "ok" for a in stuck["attempts"])
    # nothing the item started is left running
    deadline = time.monotonic() + 5
    while leftovers(str(int(mark, 16))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(str(int(mark, 16))) == []


def test_invalid_deadline_values_are_usage_errors(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", s='[[prompts]]\nid = "a"\ntemplate = "hi"\n[[prompts.instances]]\nexpected = "x"\n')
    result = pytester.runpytest("--llmbench-task-timeout=-5")
    result.stderr.fnmatch_lines(["*--llmbench-task-timeout: must be greater than 0, got '-5'*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result = pytester.runpytest("--llmbench-api-retries=two")
    result.stderr.fnmatch_lines(["*--llmbench-api-retries: expected a whole number, got 'two'*"])


def test_invalid_environment_value_names_the_variable(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASK_EXECUTION_TIMEOUT", "soon")
    result = pytester.runpytest()
    result.stderr.fnmatch_lines(["*environment variable TASK_EXECUTION_TIMEOUT: expected a number*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_header_shows_values_sources_and_hierarchy_violation(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_MAX_RETRIES", "3")
    (pytester.path / ".env").write_text("TASK_EXECUTION_TIMEOUT=50\n")
    pytester.makeini("[pytest]\nllmbench_lease_max = 40\n")
    result = pytester.runpytest("--llmbench-api-timeout=20", "--collect-only")
    result.stdout.fnmatch_lines([
        "llmbench deadlines: api_timeout 20 s (option --llmbench-api-timeout), api_retries 3"
        " (environment variable OPENAI_MAX_RETRIES), task_timeout 50 s (.env variable"
        " TASK_EXECUTION_TIMEOUT), lease_max 40 s (ini option llmbench_lease_max)",
        "llmbench WARNING: deadline hierarchy violated: task_timeout 50 s <= api_timeout 20 s"
        " x (retries 3 + 1) x max_turns 1 = 80 s*; lease_max 40 s <= task_timeout 50 s*",
    ])


def test_cli_beats_environment_beats_file(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyprojecttoml("[tool.llmbench.deadlines]\ntask_timeout = 70\napi_timeout = 5\n")
    monkeypatch.setenv("TASK_EXECUTION_TIMEOUT", "80")
    result = pytester.runpytest("--collect-only")
    result.stdout.fnmatch_lines([
        "*api_timeout 5 s (*pyproject.toml: deadlines.api_timeout)*task_timeout 80 s"
        " (environment variable TASK_EXECUTION_TIMEOUT)*"
    ])
    result = pytester.runpytest("--collect-only", "--llmbench-task-timeout=90")
    result.stdout.fnmatch_lines(["*task_timeout 90 s (option --llmbench-task-timeout)*"])


def test_retries_never_outlive_the_task(pytester: pytest.Pytester, sim_env: str) -> None:
    """api_timeout 30 s x 3 attempts against a hang, but the task has 1.5 s: one capped
    attempt, then a clean task-level stop well before 90 s."""
    pytester.makefile(".toml", s='[[prompts]]\nid = "h"\ntemplate = "hi [[sim:hang=1]]"\n'
                      '[[prompts.instances]]\nexpected = "x"\n')
    out = pytester.path / "r.jsonl"
    started = time.monotonic()
    result = pytester.runpytest("--llmbench-task-timeout=1.5", f"--llmbench-jsonl={out}")
    assert time.monotonic() - started < 15
    result.assert_outcomes(errors=1)
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["error_class"] in ("api_timeout", "task_timeout")
    assert record["elapsed"] <= 1.5 + 2.0


def hang_suite(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", s='[[prompts]]\nid = "h"\ntemplate = "What is 1 + 1? [[sim:hang=1]]"\n'
                      'scorer = "numeric"\n[[prompts.instances]]\nexpected = "2"\n')


def test_hang_capped_by_the_task_deadline_is_a_task_timeout(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    """api_timeout 30 s but the task has 2 s: the attempt is capped at the task deadline, and
    whether the child's capped timeout or the engine's kill comes first, the task layer fired."""
    hang_suite(pytester)
    out = pytester.path / "out.jsonl"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--llmbench-task-timeout=2", "--llmbench-api-timeout=30",
        f"--llmbench-jsonl={out}", timeout=60)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR [[]task_timeout[]]*task deadline of 2 s exceeded*"])
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["status"] == "error"
    assert record["error_class"] == "task_timeout" and record["deadline_layer"] == "task"
    assert 2.0 <= record["elapsed"] <= 2.0 + 2.0
    assert all(a["outcome"] == "timeout" for a in record["attempts"])
    assert len(record["attempts"]) <= 1  # no retry after the capped attempt


def test_hang_past_api_timeout_with_task_time_left_is_an_api_timeout(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    hang_suite(pytester)
    out = pytester.path / "out.jsonl"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--llmbench-task-timeout=30", "--llmbench-api-timeout=1",
        "--llmbench-api-retries=0", f"--llmbench-jsonl={out}", timeout=60)
    result.assert_outcomes(errors=1)
    (record,) = map(json.loads, out.read_text().splitlines())
    assert record["status"] == "error"
    assert record["error_class"] == "api_timeout" and record["deadline_layer"] == "api"
    assert "1 attempt failed; last: timed out after 1.00 s" in record["error"]
    assert [a["outcome"] for a in record["attempts"]] == ["timeout"]
    assert record["elapsed"] < 10


def test_items_that_time_out_together_are_all_killed_and_the_rest_run(
    pytester: pytest.Pytester, sim_env: str, leftovers: Any
) -> None:
    """Four items stuck in a child ``sleep`` reach their deadline together (one kill pass);
    the four fine items after them still run, in hosts that replace the killed ones, and no
    ``sleep`` is left."""
    mark = str(int(secrets.token_hex(4), 16))
    pytester.makepyfile(stuck_scorer=STUCK["child_sleep"].replace("MARK", mark))
    pytester.makefile(".toml", suite=(
        '[[prompts]]\nid = "stuck"\ntemplate = "What is {{a}} + 1?"\nscorer = "stuck_scorer:score"\n'
        + "".join(f'[[prompts.instances]]\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n' for i in range(4))
        + '[[prompts]]\nid = "fine"\ntemplate = "What is {{a}} + 1?"\nscorer = "numeric"\n'
        + "".join(f'[[prompts.instances]]\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n' for i in range(4))
    ))
    out = pytester.path / "r.jsonl"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--llmbench-task-timeout={TASK_TIMEOUT}",
        "--llmbench-api-timeout=30", "--llmbench-concurrency=4", f"--llmbench-jsonl={out}",
        timeout=60,
    )
    result.assert_outcomes(passed=4, errors=4)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    stuck = [r for r in records if r["identity"]["prompt"] == "stuck"]
    assert [r["error_class"] for r in stuck] == ["task_timeout"] * 4
    assert all(TASK_TIMEOUT <= r["elapsed"] <= TASK_TIMEOUT + 2.0 for r in stuck)
    deadline = time.monotonic() + 5
    while leftovers(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert leftovers(mark) == []
