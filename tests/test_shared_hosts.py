"""Items that run only the plugin's own code share item hosts, a thread each; every other
item keeps a process to itself (``runner.Job.shareable``, ``child._Shared``).

The engine's hosts are observed from a conftest hook in the run (how many items each host
runs at once), and from the items themselves (pid and thread) where a test makes
its own scorer's items shareable (``FORCE_SHARE``): that is how the paths no legitimate
shareable item can reach (a thread stuck past its deadline, a thread left behind) are
driven.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import pytest

from pytest_llmbench.coord import proc

# Records the engine's hosts as jobs are sent to them: how many items each runs at once.
WATCH = """
import json, os
import pytest
from pytest_llmbench.session.run import LLMBenchSession

# Two CPUs at most, as on CI: shareable items spread over as many hosts as the run may use
# CPUs before they share one, and these tests count items per host.
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])

if os.environ.get("FORCE_SHARE"):
    LLMBenchSession._shareable = lambda self, item, scorer, provider: True

SEEN = {"max_children": 0, "hosts": set()}

from pytest_llmbench.engine.hostpool import HostPool

_place = HostPool.place

def _watching_place(self, host):
    # Called each time a job is sent to a host (and when one frees): its items then.
    SEEN["max_children"] = max(SEEN["max_children"], len(host.children))
    SEEN["hosts"].add(host.seq)
    return _place(self, host)

HostPool.place = _watching_place

def pytest_unconfigure(config):
    with open(os.environ["WATCH_LOG"], "w") as fh:
        json.dump({"max_children": SEEN["max_children"], "hosts": len(SEEN["hosts"])}, fh)
"""

SCORER = """
import os, threading, time
from pytest_llmbench.records import Score

def score(req):
    extra = req.extra or {}
    with open(os.environ["ITEMS_LOG"], "a") as fh:
        fh.write(f"{req.identity['instance']} {os.getpid()} {threading.get_native_id()}\\n")
    if extra.get("leave_thread"):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    time.sleep(float(extra.get("sleep", 0)))
    return Score(value=1.0)
"""


def watch(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = pytester.path / "watch.json"
    monkeypatch.setenv("WATCH_LOG", str(log))
    pytester.makeconftest(WATCH)
    return log


def forced_sharing(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The run treats every item as shareable; where the items' scorer logs them."""
    watch(pytester, monkeypatch)
    monkeypatch.setenv("FORCE_SHARE", "1")
    items = pytester.path / "items.log"
    monkeypatch.setenv("ITEMS_LOG", str(items))
    return items


def builtin_suite(pytester: pytest.Pytester, n: int, latency: float) -> None:
    pytester.makefile(".toml", suite=(
        '[suite]\nscorer = "numeric"\n\n[[prompts]]\nid = "add"\n'
        f'template = "What is {{{{a}}}} + 1? [[sim:latency={latency}]]"\n'
        + "".join(f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\n'
                  f'expected = "{i + 1}"\n' for i in range(n))))


def own_scorer_suite(pytester: pytest.Pytester, instances: list[str]) -> str:
    """A suite scored by a scorer module of the test's own (a fresh name: in-process runs
    would share a cached module); ``instances``: each instance's extra TOML keys."""
    module = f"share_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: SCORER})
    pytester.makefile(".toml", suite=(
        f'[suite]\nscorer = "{module}:score"\n\n[[prompts]]\nid = "p"\n'
        'template = "What is {{a}} + 1?"\n'
        + "".join(f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\n'
                  f'expected = "{i + 1}"\n{keys}\n' for i, keys in enumerate(instances))))
    return module


def items_seen(log: Path) -> dict[str, tuple[int, int]]:
    """instance -> (pid, thread id) of what ran its scorer."""
    return {inst: (int(pid), int(tid))
            for inst, pid, tid in (line.split() for line in log.read_text().splitlines())}


@pytest.mark.parametrize("xdist", [False, True], ids=["plain", "n2"])
def test_items_of_our_own_code_share_hosts(pytester: pytest.Pytester, sim_env: str,
                                           monkeypatch: pytest.MonkeyPatch, xdist: bool) -> None:
    log = watch(pytester, monkeypatch)
    builtin_suite(pytester, 24, 1.0)
    args = ["-p", "no:cacheprovider", "--llmbench-concurrency", "24",
            "--llmbench-host-threads", "8"] + (["-n", "2"] if xdist else [])
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=24)
    if not xdist:  # (under xdist the watch runs on the controller, which has no engine)
        seen = json.loads(log.read_text())
        assert 2 <= seen["max_children"] <= 8, seen
        assert seen["hosts"] <= 6, seen  # 24 in flight, 8 a host: not one host per item


def test_hosts_leave_once_every_item_has_started(pytester: pytest.Pytester, sim_env: str) -> None:
    """An idle host with no job to come leaves at once, beside the run's last items, not
    in the clean-up at the run's end (which the run's wall time waited for)."""
    builtin_suite(pytester, 6, 0.3)
    pytester.makeconftest("""
        import pytest
        from pytest_llmbench.session.run import SESSION_KEY

        @pytest.hookimpl(tryfirst=True)
        def pytest_sessionfinish(session):
            engine = session.config.stash[SESSION_KEY].engine
            kept = [h for h in engine.pool.hosts.values() if h.jobs_fd >= 0]
            print(f"HOSTS-KEPT {len(kept)} STARTED {engine.server is not None}")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s",
                                           "--llmbench-concurrency", "6",
                                           "--llmbench-host-threads", "2")
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*HOSTS-KEPT 0 STARTED True*"])


def test_one_host_thread_gives_every_item_a_process(pytester: pytest.Pytester, sim_env: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = watch(pytester, monkeypatch)
    builtin_suite(pytester, 12, 1.0)
    pytester.makeini("[pytest]\nllmbench_host_threads = 1\n")  # the ini twin
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "--llmbench-concurrency", "12")
    result.assert_outcomes(passed=12)
    seen = json.loads(log.read_text())
    assert seen["max_children"] == 1 and seen["hosts"] >= 6, seen


def test_items_running_user_code_never_share_a_host(pytester: pytest.Pytester, sim_env: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = watch(pytester, monkeypatch)
    items = pytester.path / "items.log"
    monkeypatch.setenv("ITEMS_LOG", str(items))
    own_scorer_suite(pytester, ["extra = { sleep = 1.0 }"] * 8)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "--llmbench-concurrency", "8")
    result.assert_outcomes(passed=8)
    assert json.loads(log.read_text())["max_children"] == 1
    assert len({pid for pid, _tid in items_seen(items).values()}) == 8


def test_a_thread_stuck_past_its_deadline_times_out_alone_and_its_host_dies_after(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = forced_sharing(pytester, monkeypatch)
    own_scorer_suite(pytester, [
        "extra = { sleep = 60 }\ndeadlines = { task_timeout = 2 }",  # stuck
        "extra = { sleep = 0 }",
        "extra = { sleep = 4 }\ndeadlines = { task_timeout = 20 }",  # runs past i0's kill
        "extra = { sleep = 0 }",
        "extra = { sleep = 0 }",
    ])
    started = time.monotonic()
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rA", "--llmbench-concurrency", "3",
        "--llmbench-host-threads", "3", timeout=50)
    took = time.monotonic() - started
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*i0*task_timeout*"])
    seen = items_seen(items)
    host = seen["i0"][0]
    assert seen["i2"][0] == host and seen["i2"][1] != seen["i0"][1]  # one host, two threads
    assert not proc.pid_alive(host)  # killed once i2 was done, its stuck thread with it
    assert took < 30  # nobody waited for the stuck thread's 60 s


def test_a_shared_host_whose_item_leaves_a_thread_is_replaced(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = forced_sharing(pytester, monkeypatch)
    own_scorer_suite(pytester, ["extra = { leave_thread = true }", "", "", ""])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           "--llmbench-concurrency", "1")
    result.assert_outcomes(passed=4)
    seen = items_seen(items)
    assert seen["i1"][0] != seen["i0"][0]  # the host i0 left a thread in ran nothing more
    assert seen["i1"][0] == seen["i2"][0] == seen["i3"][0]  # a clean host is reused
    # ... and its thread too: one at a time, the items run in the same kept thread
    assert seen["i1"][1] == seen["i2"][1] == seen["i3"][1]


def test_a_host_keeps_its_item_threads(pytester: pytest.Pytester, sim_env: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Items sharing a host run in threads it keeps: no more threads than it ran items at
    once, reused by the items that follow (a thread started per item made the host's job
    intake wait on every new thread taking the GIL)."""
    items = forced_sharing(pytester, monkeypatch)
    own_scorer_suite(pytester, ["extra = { sleep = 0.2 }"] * 12)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-concurrency",
                                           "4", "--llmbench-host-threads", "4")
    result.assert_outcomes(passed=12)
    threads: dict[int, set[int]] = {}
    for pid, tid in items_seen(items).values():
        threads.setdefault(pid, set()).add(tid)
    assert all(len(tids) <= 4 for tids in threads.values()), threads
    assert sum(len(tids) for tids in threads.values()) < 12, threads


@pytest.mark.parametrize(("args", "ini", "message"), [
    (["--llmbench-host-threads", "0"], "",
     "--llmbench-host-threads: *at least 1*"),
    ([], "llmbench_host_threads = many\n", "ini option llmbench_host_threads: *"),
])
def test_a_bad_host_threads_value_is_named(pytester: pytest.Pytester, sim_env: str,
                                           args: list[str], ini: str, message: str) -> None:
    builtin_suite(pytester, 1, 0.0)
    pytester.makeini("[pytest]\n" + ini)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret != 0
    result.stderr.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stderr.str()


def test_only_builtin_text_scorers_run_only_our_code() -> None:
    from pytest_llmbench.records import ScorerSpec
    from pytest_llmbench.scoring.resolve import resolve_scorer, runs_only_our_code

    assert runs_only_our_code(resolve_scorer(ScorerSpec(name="numeric")))
    assert runs_only_our_code(resolve_scorer(ScorerSpec(name="exact")))
    assert not runs_only_our_code(resolve_scorer(ScorerSpec(name="code")))
    assert not runs_only_our_code(resolve_scorer(ScorerSpec(name="os.path:exists")))
    assert not runs_only_our_code(os.path.exists)
