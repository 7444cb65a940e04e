"""Live progress: the line's content, drawn by pytest (forced on, plain and -n 2), auto mode
on a real pseudo-terminal and silent under -q or without a terminal; the half-deadline log
line."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_llmbench.records import ItemResult
from pytest_llmbench.report.progress import Progress

FAST = "\n".join(
    f"""
[[prompts.instances]]
id = "f{i}"
vars = {{ a = {i}, b = 1 }}
expected = {i + 1}"""
    for i in range(6)
)
SUITE = f"""
[suite]
scorer = "numeric"
[[prompts]]
id = "add"
template = "What is {{{{a}}}} + {{{{b}}}}?"
{FAST}
[[prompts]]
id = "late"
template = "What is 2 + 2? [[sim:latency=SLOW]]"
[[prompts.instances]]
id = "slow"
expected = 4
"""


def result(status: str = "passed", *, model: str = "m", elapsed: float = 1.0, cached: bool = False,
           tokens: tuple[int, int] = (100, 10)) -> ItemResult:
    r = ItemResult(key="k", identity={"model": model}, status=status, elapsed=elapsed,
                   prompt_tokens=tokens[0], completion_tokens=tokens[1])
    r.cached = cached
    return r


def test_line_counts_rate_eta_tokens_cost_and_names_slow_items() -> None:
    p = Progress(started=0.0, prices={"m": (2.0, 10.0)}, total=20)
    for i in range(6):
        p.finished(f"s.toml::a[{i}]")
        p.add(result("error" if i == 5 else "passed", elapsed=1.0))
    p.add(result("passed", cached=True, tokens=(999, 999)))  # not this run's tokens
    p.first_done = 100.0
    p.set_in_flight("gw0", [("s.toml::a[7]", 108.0), ("s.toml::a[0]", 90.0)])  # a[0]: reported
    p.set_in_flight("gw1", [("s.toml::stuck[x-m]", 90.0)])
    line = p.line(110.0)
    assert line.startswith("llmbench 6/20 done | 2 in flight | 12 queued")
    assert "pass 85.7% (1 err)" in line  # 6 of 7 results passed; the error is shown beside
    assert "ETA 28s" in line  # 14 left at 5 items per 10 s since the first finished
    assert "tokens 600/60 | $0.0018" in line
    assert "slow: stuck[x-m] 20s | tokens" in line and "a[7]" not in line  # 2 s is not 3x the usual 1 s
    assert len(p.line(110.0, width=40)) <= 40


def test_nothing_is_named_slow_before_the_usual_time_is_known() -> None:
    p = Progress(started=0.0, total=3)
    p.add(result(elapsed=0.1))
    p.set_in_flight("local", [("x", 0.0)])
    assert "slow" not in p.line(1000.0) and p.eta(1000.0) is None


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_forced_on_draws_the_line_and_names_the_slow_item(
    pytester: pytest.Pytester, sim_env: str, xdist: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    # 8 s, not 4: under xdist the line learns what is in flight from the workers' reports, so
    # the slow item is named only if another item is reported while it runs; on a loaded
    # machine (CI runs three suites at once) 4 s once passed without such a report.
    pytester.makefile(".toml", math=SUITE.replace("SLOW", "8"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-progress=on",
                                           "--llmbench-concurrency=8", *xdist)
    result.assert_outcomes(passed=7)
    out = result.stdout.str()
    assert re.search(r"llmbench 7/7 done \| 0 in flight \| 0 queued \| pass 100\.0%", out)
    assert re.search(r"slow: late\[slow-sim\] \d+s", out), out[-3000:]
    # erased before pytest's summary, and pytest's own lines are intact
    result.stdout.fnmatch_lines(["*llmbench summary*", "*7 passed*"])
    assert "\x1b[2K" in out


def test_off_by_default_without_a_terminal(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", math=SUITE.replace("SLOW", "0"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    assert "llmbench 0/" not in result.stdout.str() and "\x1b[2K" not in result.stdout.str()


def run_in_pty(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """pytest on a real pseudo-terminal: what a user at a terminal sees (raw bytes)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=cwd, env=env,
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the follower side closed: the run ended
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def test_auto_on_a_terminal_and_silent_with_q(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", math=SUITE.replace("SLOW", "0"))
    env = {**os.environ, "COLUMNS": "160", "LINES": "40"}
    shown = run_in_pty(["-p", "no:cacheprovider", "math.toml"], pytester.path, env)
    assert "llmbench 7/7 done" in shown, shown[-2000:]
    quiet = run_in_pty(["-p", "no:cacheprovider", "-q", "--llmbench-fresh", "math.toml"],
                       pytester.path, env)
    assert "7 passed" in quiet and "llmbench 0/" not in quiet and "done |" not in quiet


def test_a_log_line_names_an_item_past_half_its_task_deadline(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytester.makefile(".toml", math=SUITE.replace("SLOW", "4.5"))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--llmbench-task-timeout=8", "--llmbench-api-timeout=7",
        "--llmbench-api-retries=0", "-o", "log_cli=true", "--log-cli-level=WARNING")
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines([
        "*WARNING*math.toml::late[[]slow-sim[]]: still running after 4.* s, half of its task"
        " deadline of 8 s*"])
    assert "add[f1-sim]: still running" not in result.stdout.str()


def test_a_bad_progress_setting_is_one_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("-p", "no:cacheprovider", "-o", "llmbench_progress=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*llmbench_progress: expected one of auto, on, off; got 'maybe'*"])
