"""Code execution with real processes: every verdict, the heuristic in action, containment."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import Score, ScoreRequest
from pytest_llmbench.scoring.codeexec import (
    Limits,
    judge,
    presets_from_history,
    probe_isolation,
    run_program,
    sandbox_lease,
)
from pytest_llmbench.scoring.codeexec.languages import choose_python
from pytest_llmbench.scoring.codeexec.sandbox import UID_BASE

ISO = probe_isolation()
PYTHON = choose_python("auto", ISO)
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")


def py(code: str) -> str:
    return f"Here you go:\n\n```python\n{code.strip()}\n```\n"


def score(answer: str, tests: list[dict[str, str]] | None = None, *, lease: Any = None,
          extra: Mapping[str, Any] | None = None, **options: Any) -> Score:
    data: dict[str, Any] = dict(extra or {})
    if tests is not None:
        data["tests"] = tests
    options.setdefault("time_limit", 1.0)
    req = ScoreRequest(answer=answer, expected=None, options=options, extra=data)
    return judge(req, lease=lease)


SUM = [{"stdin": "2 3\n", "stdout": "5\n"}, {"stdin": "10 -4\n", "stdout": "6\n"}]


def sandbox_processes(uid: int) -> list[int]:
    """Live processes running under the sandbox ``uid`` (root mode): none after a run."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                st = os.stat(f"/proc/{name}")
                with open(f"/proc/{name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if st.st_uid == uid and state != b"Z":
                found.append(int(name))
    return found


def processes_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds ``entry`` (root can read every environ)."""
    needle = b"\0" + entry.encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in b"\0" + f.read():
                        found.append(int(name))
            except OSError:
                continue
    return found


# --- verdicts ------------------------------------------------------------------------------


def test_ok_records_wall_cpu_and_limits_per_test() -> None:
    s = score(py("a, b = map(int, input().split())\nprint(a + b)"), SUM)
    assert (s.value, s.details["verdict"]) == (1.0, "OK")
    assert s.explanation == "OK: 2/2 tests passed"
    assert [t["verdict"] for t in s.details["tests"]] == ["OK", "OK"]
    t = s.details["tests"][0]
    assert 0 < t["wall"] < 1.0 and t["cpu"] > 0 and t["limit"] == 1.0
    assert t["exit_code"] == 0 and t["signal"] is None and t["stdout_head"] == "5\n"
    assert s.details["raises"] == [] and s.details["language"] == "python"


def test_wa_names_the_first_differing_line_and_first_failure_decides() -> None:
    tests = [*SUM, {"stdin": "1 1\n", "stdout": "2\n"}]
    prog = py("a, b = map(int, input().split())\nprint(a + b if a == 2 else a - b)")
    s = score(prog, tests)
    assert (s.value, s.details["verdict"]) == (0.0, "WA")
    assert s.explanation == "WA on test 2 (line 1: expected '6', got '14')"
    assert len(s.details["tests"]) == 2  # stopped at the first failure
    everything = score(prog, tests, run_all=True)
    assert [t["verdict"] for t in everything.details["tests"]] == ["OK", "WA", "WA"]
    assert everything.details["verdict"] == "WA"


def test_tle_without_output_is_not_raised() -> None:
    s = score(py("while True:\n    pass"), SUM, time_limit=0.3)
    assert s.details["verdict"] == "TLE"
    (decision,) = s.details["raises"]
    assert decision["reason"] == "no output" and decision["new_limit"] is None
    t = s.details["tests"][0]
    assert t["wall"] >= 0.3 and len(t["runs"]) == 1
    assert s.explanation.startswith("TLE on test 1 (limit 0.3 s, wall ")
    assert s.explanation.endswith("; no output, not raised)")


def test_re_mle_ole() -> None:
    re_ = score(py("raise ValueError('boom')"), SUM)
    assert re_.details["verdict"] == "RE"
    assert re_.explanation == "RE on test 1 (exit code 1: ValueError: boom)"
    mle = score(py("x = []\nwhile True:\n    x.append(bytearray(4 << 20))"), SUM, memory_mb=96)
    assert mle.details["verdict"] == "MLE", mle.explanation
    ole = score(py("while True:\n    print('y' * 500)"), SUM, output_limit_kb=16)
    assert ole.details["verdict"] == "OLE"
    assert ole.explanation == "OLE on test 1 (stdout or stderr over 16 KB)"
    killed = score(py("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)"), SUM)
    assert killed.details["verdict"] == "RE" and killed.details["tests"][0]["signal"] == 11


def test_sandbox_error_is_retried_as_is_and_marked() -> None:
    s = score(py("print(5)"), SUM, python="/nonexistent/python3", sandbox_retries=2)
    assert (s.value, s.details["verdict"]) == (0.0, "SANDBOX_ERROR")
    runs = s.details["tests"][0]["runs"]
    assert [r["verdict"] for r in runs] == ["SANDBOX_ERROR"] * 3
    assert {r["limit"] for r in runs} == {1.0}  # retried as is, never raised
    assert s.details["error_class"] == "sandbox_error"
    assert "nonexistent" in s.explanation


SLOW_COUNT = py("""
import time
n = int(input())
for i in range(1, n + 1):
    print(i)
    time.sleep(0.1)
""")
COUNT_10 = [{"stdin": "10\n", "stdout": "".join(f"{i}\n" for i in range(1, 11))}]


def test_slow_but_correct_program_passes_with_a_raised_limit() -> None:
    s = score(SLOW_COUNT, COUNT_10, time_limit=0.5)
    assert (s.value, s.details["verdict"]) == (1.0, "OK_EXTENDED"), s.explanation
    (decision,) = s.details["raises"]
    assert decision["is_prefix"] and decision["reason"] == "raise"
    assert 0 < decision["completion"] < 0.9
    assert decision["new_limit"] == pytest.approx(0.5 * decision["multiplier"], abs=1e-3)
    t = s.details["tests"][0]
    assert [r["verdict"] for r in t["runs"]] == ["TLE", "OK"]
    assert t["limit"] == decision["new_limit"] and t["base_limit"] == 0.5
    assert "test 1 needed a" in s.explanation


def test_output_that_is_not_a_prefix_stops_the_raises() -> None:
    wrong = SLOW_COUNT.replace("range(1, n + 1)", "range(n)")
    s = score(wrong, COUNT_10, time_limit=0.4)
    assert s.details["verdict"] == "TLE"
    (decision,) = s.details["raises"]
    assert (decision["is_prefix"], decision["multiplier"], decision["reason"]) == (
        False, None, "not a prefix")
    assert s.explanation.endswith("; not a prefix, not raised)")


def test_at_most_three_raises() -> None:
    # 95 % of the expected output at once, then a hang: every run asks for x2.
    prog = py("print('a' * 95, flush=True)\nimport time\ntime.sleep(60)")
    s = score(prog, [{"stdin": "", "stdout": "a" * 100}], time_limit=0.15)
    assert s.details["verdict"] == "TLE"
    raises = s.details["raises"]
    assert [d["limit"] for d in raises] == [0.15, 0.3, 0.6, 1.2]
    assert [d["new_limit"] for d in raises] == [0.3, 0.6, 1.2, None]
    assert all(d["multiplier"] == 2.0 and d["completion"] == 0.95 for d in raises)
    assert raises[-1]["reason"] == "3 raises max"
    assert len(s.details["tests"][0]["runs"]) == 4
    assert s.explanation.endswith(
        "; output 95% of expected, not raised further: 3 raises max "
        "(raised x2 to 0.3 s, x2 to 0.6 s, x2 to 1.2 s))")
    capped = score(prog, [{"stdin": "", "stdout": "a" * 100}], time_limit=0.15,
                   max_raises=1)
    assert [d["new_limit"] for d in capped.details["raises"]] == [0.3, None]


def test_preset_from_history_starts_with_the_raised_limit() -> None:
    # 0.8 s: the program needs over 1 s, and must print its first line before the limit
    # (at 0.3 s a loaded machine once left it no output at all)
    first = score(SLOW_COUNT, COUNT_10, time_limit=0.8, max_raises=0)
    assert first.details["verdict"] == "TLE"
    assert first.details["raises"][0]["reason"] == "0 raises max"
    presets = presets_from_history([first.details])
    assert presets == {1: 30.0}  # some output, under 100 chars
    second = score(SLOW_COUNT, COUNT_10, time_limit=0.8, max_raises=0, preset_limits=presets)
    assert second.details["verdict"] == "OK_EXTENDED"
    t = second.details["tests"][0]
    assert (t["limit"], len(t["runs"]), second.details["raises"]) == (30.0, 1, [])


def test_humaneval_style_verdicts() -> None:
    extra = {"entry_point": "inc", "prompt": "def inc(x):\n    \"\"\"x + 1\"\"\"\n",
             "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
    ok = score(py("def inc(x):\n    return x + 1"), extra=extra)
    assert ok.details["verdict"] == "OK", ok.explanation
    body_only = score("    return x + 1\n", extra=extra)  # a completion of the prompt
    assert body_only.details["verdict"] == "OK", body_only.explanation
    wa = score(py("def inc(x):\n    return x"), extra=extra)
    assert wa.details["verdict"] == "WA"
    assert wa.explanation == "WA on test 1 (an assertion of check() failed)"
    re_ = score(py("def inc(x):\n    return x.nope"), extra=extra)
    assert re_.details["verdict"] == "RE" and "AttributeError" in re_.explanation
    early = score(py("import sys\ndef inc(x):\n    return x + 1\nsys.exit(0)"), extra=extra)
    assert early.details["verdict"] == "RE"  # exited before check(): not a pass


def test_expect_verdict_turns_a_demonstration_into_a_pass() -> None:
    s = score(py("print(1)"), SUM, expect_verdict="WA")
    assert (s.value, s.details["verdict"], s.details["expect_verdict"]) == (1.0, "WA", "WA")
    assert s.explanation.endswith("[expected verdict WA]")
    # per problem, from the instance's extra (overrides the options)
    s2 = score(py("print(5)"), SUM, extra={"expect_verdict": "OK"}, expect_verdict="WA")
    assert s2.value == 0.0 and s2.details["verdict"] == "WA"


def test_bad_options_and_instances_are_scorer_errors() -> None:
    with pytest.raises(ScorerError, match="unknown option"):
        score(py("print(1)"), SUM, time_limt=1)
    with pytest.raises(ScorerError, match="language"):
        score(py("print(1)"), SUM, language="cobol")
    with pytest.raises(ScorerError, match="extra.tests or extra.test"):
        score(py("print(1)"))
    from pytest_llmbench.scoring.codeexec import validate_options

    validate_options({"time_limit": 0.5, "language": "cpp"})
    with pytest.raises(ScorerError, match="max_wall_factor"):
        validate_options({"max_wall_factor": 0.5})
    with pytest.raises(ScorerError, match="stdout"):
        score(py("print(1)"), [{"stdin": "1"}])  # type: ignore[list-item]


# --- C / C++ --------------------------------------------------------------------------------


@needs_gxx
def test_cpp_ok_compile_error_and_line_buffered_output() -> None:
    ok = score("```cpp\n#include <iostream>\nint main(){long a,b;std::cin>>a>>b;"
               "std::cout<<a+b<<'\\n';}\n```", SUM, compile_time_limit=60)
    assert ok.details["verdict"] == "OK", ok.explanation
    assert ok.details["compile"]["exit_code"] == 0
    bad = score("```cpp\nint main() { return x; }\n```", SUM, compile_time_limit=60)
    assert bad.details["verdict"] == "CE" and bad.explanation.startswith("CE: compile error")
    # printf without fflush, then a hang: the injected setvbuf keeps the lines.
    hang = score("```c\n#include <stdio.h>\nint main(){for(int i=1;i<=3;i++)printf(\"%d\\n\",i);"
                 "for(;;){}}\n```", [{"stdin": "", "stdout": "1\n2\n3\n4\n"}],
                 time_limit=0.3, max_raises=0, compile_time_limit=60)
    assert hang.details["tests"][0]["stdout_head"] == "1\n2\n3\n"
    assert hang.details["raises"][0]["is_prefix"]


def test_python_output_is_unbuffered() -> None:
    s = score(py("print('partial')\nwhile True:\n    pass"),
              [{"stdin": "", "stdout": "partial\nrest\n"}], time_limit=0.3, max_raises=0)
    assert s.details["tests"][0]["stdout_head"] == "partial\n"


# --- containment ----------------------------------------------------------------------------


def test_fork_bomb_is_capped_and_nothing_survives() -> None:
    mark = secrets.token_hex(6)
    bomb = (
        "import os, sys, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        os.setsid()\n"  # try to escape the process group too
        "        while True:\n"
        "            try: os.fork()\n"
        "            except OSError: time.sleep(0.01)\n"
        "    n += 1\n"
        "print('forks', n, flush=True)\n"
        "while True: pass\n"
    )
    result, _ = run_program([str(PYTHON), "-u", "main.py"], files={"main.py": bomb.encode()},
                            limits=Limits(time=0.8, processes=12), env={"BOMB_MARK": mark})
    assert result.timed_out and result.error == ""
    assert result.wall < 1.6  # several tasks: their CPU wait is not excused (max_wall 2.4)
    forks = int(result.stdout.split()[1])
    assert 1 <= forks <= 11  # the cap held (the main process counts as one)
    assert result.killed_leftovers >= forks
    time.sleep(0.05)
    assert processes_with_env(f"BOMB_MARK={mark}") == []
    if ISO.switch_user:  # every process of this run's own uid is gone
        assert sandbox_processes(UID_BASE + threading.get_native_id()) == []


def test_item_token_is_passed_to_the_program(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMBENCH_ITEM_TOKEN", "tok-123")
    s = score(py("import os\nprint(os.environ['LLMBENCH_ITEM_TOKEN'])"),
              [{"stdin": "", "stdout": "tok-123\n"}])
    assert s.details["verdict"] == "OK"


def test_network_is_blocked() -> None:
    if ISO.network == "shared":
        pytest.skip("the kernel allows no network namespace here: programs share the network")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        prog = py(f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2)
    print("connected")
except OSError as exc:
    print("blocked", exc.errno)
""")
        s = score(prog, [{"stdin": "", "stdout": "blocked 101\n"}])  # ENETUNREACH
    assert s.details["verdict"] == "OK", s.details["tests"][0]["stdout_head"]
    assert s.details["isolation"]["network"] in ("netns", "userns+netns")


def test_program_runs_in_a_fresh_private_directory() -> None:
    prog = py("import os\nprint(sorted(os.listdir('.')))\nopen('junk', 'w').write('x')")
    s = score(prog, [{"stdin": "", "stdout": "['main.py']\n"}] * 2)
    assert s.details["verdict"] == "OK", s.explanation  # junk of test 1 is gone in test 2
    if ISO.switch_user:
        who = score(py("import os\nprint(os.getuid() != 0)"), [{"stdin": "", "stdout": "True"}])
        assert who.details["verdict"] == "OK"


# --- leases ---------------------------------------------------------------------------------


def test_a_lease_is_held_around_each_run_and_waiting_is_not_timed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels: list[str] = []
    s = score(py("print(5)"), SUM[:1], lease=lambda label: (labels.append(label), nullcontext())[1])
    assert s.details["verdict"] == "OK" and labels == ["test 1"]

    monkeypatch.setenv("LLMBENCH_STATE_DIR", str(tmp_path))
    acquire = sandbox_lease(1)
    held = acquire("blocker")
    held.__enter__()
    release = threading.Timer(0.6, held.__exit__, args=(None, None, None))
    release.start()
    started = time.monotonic()
    try:
        s = score(py("print(5)"), SUM[:1], lease=acquire, time_limit=0.4)
    finally:
        release.join()
    assert time.monotonic() - started >= 0.55  # it waited for the only slot...
    assert s.details["verdict"] == "OK"  # ...and the wait did not count as run time
    assert (tmp_path / "leases" / "sandbox").is_dir()


def test_score_code_uses_the_state_dir_pool(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llmbench.scoring.codeexec import score_code

    monkeypatch.setenv("LLMBENCH_STATE_DIR", str(tmp_path))
    s = score_code(ScoreRequest(answer=py("print(5)"), expected=None,
                                options={"sandbox_slots": 2}, extra={"tests": SUM[:1]}))
    assert s.details["verdict"] == "OK"
    assert sorted(p.name for p in (tmp_path / "leases" / "sandbox").glob("*.lock"))


def test_waiting_for_a_cpu_is_not_counted_as_run_time() -> None:
    """Two busy processes share the program's only CPU: its wall time triples, its run does not."""
    import subprocess
    import sys

    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})  # the hogs and the program inherit this one CPU
    # Each hog in a session of its own: with autogroup scheduling every session gets a fair
    # share, so the program (also a session) gets a third of the CPU.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(2)]
    try:
        prog = py("import time\nt = time.process_time()\nwhile time.process_time() - t < 0.25:\n"
                  "    pass\nprint('done')")
        tests = [{"stdin": "", "stdout": "done\n"}]
        fair = score(prog, tests, time_limit=0.5, max_raises=0, max_wall_factor=8.0)
        strict = score(prog, tests, time_limit=0.5, max_raises=0, max_wall_factor=1.0)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        os.sched_setaffinity(0, before)
    t = fair.details["tests"][0]
    assert fair.details["verdict"] == "OK", fair.details["tests"]
    assert t["wall"] > 0.5 and t["cpu_wait"] > 0.2 and t["wall"] - t["cpu_wait"] < 0.5
    assert strict.details["verdict"] == "TLE"
    assert strict.details["tests"][0]["wall"] < 1.0


# --- the heuristic within the item's task deadline (issue 13, point 6) -----------------------

COUNT_SLOW = py("import time\nfor i in range(1, int(input()) + 1):\n    print(i)\n    time.sleep(0.1)")
COUNT_30 = [{"stdin": "30\n", "stdout": "".join(f"{i}\n" for i in range(1, 31))}]


def score_by(deadline_in: float, answer: str, tests: list[dict[str, str]], **options: Any) -> Score:
    options.setdefault("time_limit", 0.5)
    req = ScoreRequest(answer=answer, expected=None, options=options, extra={"tests": tests},
                       deadline=time.monotonic() + deadline_in)
    return judge(req, lease=None)


def test_a_raise_that_does_not_fit_the_task_deadline_ends_as_tle_with_the_reason() -> None:
    started = time.monotonic()
    s = score_by(4.0, COUNT_SLOW, COUNT_30)  # needs ~3 s: a x8 raise from 0.5 s cannot fit
    assert s.details["verdict"] == "TLE", s.explanation
    last = s.details["raises"][-1]
    assert last["multiplier"] is not None and last["new_limit"] is None
    assert last["reason"].startswith("no time left to raise"), last
    assert "no time left to raise" in s.explanation
    assert time.monotonic() - started < 4.0  # returned before the deadline, with a verdict


def test_a_run_never_outlasts_the_task_deadline() -> None:
    s = score_by(2.5, py("while True: pass"), [{"stdin": "", "stdout": "x"}], time_limit=10)
    assert s.details["verdict"] == "TLE"
    assert s.details["tests"][0]["wall"] <= 1.5 + 0.3  # 2.5 s minus the 1 s margin
    assert s.details["task_time_left"] > 0


def test_a_raise_that_fits_is_still_made() -> None:
    s = score_by(30.0, COUNT_SLOW, [{"stdin": "8\n", "stdout": "".join(f"{i}\n" for i in range(1, 9))}])
    assert s.details["verdict"] == "OK_EXTENDED", s.explanation


@pytest.mark.slow
def test_item_reports_the_tle_verdict_instead_of_a_task_timeout(
        pytester: pytest.Pytester, sim_env: str) -> None:
    import json

    # 120 lines at 0.1 s: ~8 % printed at the 1 s limit, so the heuristic wants x9 (9 s);
    # the 10 s task leaves at most ~7.5 s after the API call, the first run and the margin.
    # A generous task deadline, so that a loaded machine's slow start-up does not eat it.
    expected = "".join(f"{i}\\n" for i in range(1, 121))
    pytester.makefile(".toml", code="""
[suite]
scorer = { name = "code", time_limit = 1.0 }
deadlines = { task_timeout = 10 }

[[prompts]]
id = "count"
template = "Print 1..n. [[sim:program=count_slow]]"
extra = { tests = [{ stdin = "120\\n", stdout = "EXPECTED" }] }

[[prompts.instances]]
id = "slow"
""".replace("EXPECTED", expected))
    out = pytester.path / "r.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmbench-jsonl={out}")
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["status"] == "failed" and not record.get("error_class"), record
    result.assert_outcomes(failed=1)
    assert record["details"]["verdict"] == "TLE"
    assert "no time left to raise" in record["explanation"]
