"""Item children come from the fork server; what it cannot take, pytest forks itself; if it
dies, the run goes on without it."""

from __future__ import annotations

import importlib
import os
import re
import secrets
from pathlib import Path

import pytest

SUITE = """
[[prompts]]
id = "add"
template = "What is {{a}} + 1?"
scorer = "parent_scorer:score"
"""

SCORER = """
import os, signal
from pytest_llmbench.records import Score

def score(req):
    with open(os.environ["PARENTS_LOG"], "a") as fh:
        fh.write(f"{req.identity['instance']} {os.getpid()} {os.getppid()}"
                 f" {os.environ.get('PYTEST_XDIST_WORKER', '-')} {os.environ.get('LATE', '-')}\\n")
    parent = os.getppid()
    if req.identity["instance"] == "i0" and parent != int(os.environ.get("KILL_SERVER", parent)):
        os.kill(parent, signal.SIGKILL)  # the fork server, never pytest itself
        import time
        time.sleep(10)  # the host dies with its server (parent-death signal) before it returns
    elif parent != int(os.environ.get("KILL_SERVER", parent)):
        # Another item in a host of the server i0 kills: it dies with that server, however
        # late i0 gets there (under load a host could otherwise run every other item first).
        import time
        time.sleep(10)
    if req.identity["instance"] == "i1" and os.environ.get("LEAVE_THREAD"):
        import threading, time
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return Score(value=1.0)
"""


def write(pytester: pytest.Pytester, n: int) -> Path:
    # A module name of its own per test: in-process runs would otherwise share one cached
    # module, whose function pickle would not recognise as the module's current one.
    module = f"parent_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: SCORER})
    pytester.makefile(".toml", suite=SUITE.replace("parent_scorer", module) + "".join(
        f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
        for i in range(n)))
    return pytester.path / "parents.log"


def parents(log: Path) -> dict[str, int]:
    return {inst: int(ppid) for inst, _pid, ppid, *_ in (line.split() for line in log.read_text().splitlines())}


def environments(log: Path) -> dict[str, tuple[str, str]]:
    """Item -> (its PYTEST_XDIST_WORKER, its LATE), as the item saw them."""
    return {inst: (worker, late) for inst, _pid, _ppid, worker, late
            in (line.split() for line in log.read_text().splitlines())}


def test_children_fork_from_the_server_not_from_pytest(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write(pytester, 6)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when these tests run under -n
    # The server starts while the suite is collected; an item still runs with the
    # environment pytest has when the item starts.
    pytester.makeconftest("""
        import os

        def pytest_collection_finish(session):
            os.environ["LATE"] = "set-after-collection"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    found = parents(log)
    assert len(found) == 6
    assert len(set(found.values())) == 1 and os.getpid() not in found.values()
    assert set(environments(log).values()) == {("-", "set-after-collection")}


def test_switched_off_pytest_forks_every_child(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write(pytester, 3)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    monkeypatch.setenv("LLMBENCH_FORK_SERVER", "0")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)
    assert set(parents(log).values()) == {os.getpid()}


def test_a_job_the_server_cannot_take_is_forked_by_pytest(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scorer from a conftest hook is a closure: it cannot be pickled to the server."""
    log = write(pytester, 3)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    pytester.makeconftest("""
        import os
        from pytest_llmbench.records import Score

        def pytest_llmbench_get_scorer(name):
            if name != "closure":
                return None
            def score(req):
                with open(os.environ["PARENTS_LOG"], "a") as fh:
                    fh.write(f"{req.identity['instance']} {os.getpid()} {os.getppid()} - -\\n")
                return Score(value=1.0)
            return score
    """)
    (pytester.path / "suite.toml").write_text(
        re.sub(r"parent_scorer_\w+:score", "closure", (pytester.path / "suite.toml").read_text()))
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)
    assert set(parents(log).values()) == {os.getpid()}


def test_the_run_survives_the_death_of_its_fork_server(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An item that kills its parent (the fork server) is reported as crashed: its host
    dies with the server (parent-death signal), and so does the host of the one item
    running beside it (which waits for that); the other items run, forked by pytest."""
    log = write(pytester, 8)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    monkeypatch.setenv("KILL_SERVER", str(os.getpid()))
    result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-concurrency=2")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 6 and outcomes.get("passed", 0) + outcomes["errors"] == 8
    result.stdout.fnmatch_lines(["ERROR suite.toml::add[[]i0-sim] - *crashed*"])
    errors = [line for line in result.stdout.lines if line.startswith("ERROR suite.toml::")]
    assert all("crashed" in line for line in errors), errors
    assert "the fork server exited" in caplog.text
    found = parents(log)
    assert found["i0"] != os.getpid()  # i0 ran in the server's child, and killed it
    assert found["i7"] == os.getpid()  # later items were forked by pytest itself


def pids(log: Path) -> dict[str, int]:
    return {inst: int(pid) for inst, pid, *_ in (line.split() for line in log.read_text().splitlines())}


def test_an_item_host_runs_item_after_item(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write(pytester, 5)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    pytester.runpytest("-p", "no:cacheprovider", "--llmbench-concurrency=1").assert_outcomes(passed=5)
    assert len(set(pids(log).values())) == 1  # one host ran all five, one after the other


def test_an_item_that_leaves_a_thread_behind_gets_its_host_replaced(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write(pytester, 4)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    monkeypatch.setenv("LEAVE_THREAD", "1")
    pytester.runpytest("-p", "no:cacheprovider", "--llmbench-concurrency=1").assert_outcomes(passed=4)
    found = pids(log)
    assert found["i0"] == found["i1"]  # i1 started the thread in the host i0 used
    assert found["i2"] != found["i1"] and found["i2"] == found["i3"]  # then a fresh host


@pytest.mark.parametrize("named", [False, True], ids=["collected", "suite-file-named"])
def test_xdist_workers_share_one_fork_server_started_by_the_controller(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, named: bool
) -> None:
    """Also when the suite file is named on the command line: a worker then must not start
    a server of its own at configure time (each would import the SDK: under -n 32, 30 CPU-s
    more, and the run took 24 s instead of 14)."""
    log = write(pytester, 8)
    workers = pytester.path / "workers.log"
    monkeypatch.setenv("PARENTS_LOG", str(log))
    monkeypatch.setenv("WORKERS_LOG", str(workers))
    pytester.makeconftest("""
        import os

        def pytest_configure(config):
            if hasattr(config, "workerinput"):
                with open(os.environ["WORKERS_LOG"], "a") as fh:
                    fh.write(f"{os.getpid()} {config.workerinput['llmbench_fork_server']}\\n")
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "-v", "--llmbench-concurrency=1",
        *(["suite.toml"] if named else []))
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*[[]gw0[]]*PASSED*"])
    result.stdout.fnmatch_lines(["*[[]gw1[]]*PASSED*"])
    result.stdout.no_fnmatch_line("*could not connect to the shared fork server*")
    entries = [line.split() for line in workers.read_text().splitlines()]
    worker_pids = {int(pid) for pid, _path in entries}
    paths = {path for _pid, path in entries}
    assert len(worker_pids) == 2 and len(paths) == 1
    (path,) = paths
    assert path.startswith("@llmbench-fs-")  # an abstract socket: no file to leave behind
    found = parents(log)
    assert len(found) == 8
    (server,) = set(found.values())  # one process forked every host, for both workers
    assert server not in worker_pids and server != os.getpid()
    # Items run with their worker's environment, not the controller's (the server's).
    assert {worker for worker, _late in environments(log).values()} <= {"gw0", "gw1"}
    assert len(environments(log)) == 8


def test_a_worker_that_cannot_reach_the_shared_server_starts_its_own(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = write(pytester, 4)
    monkeypatch.setenv("PARENTS_LOG", str(log))
    pytester.makeconftest("""
        import pytest

        @pytest.hookimpl(trylast=True)
        def pytest_configure_node(node):
            node.workerinput["llmbench_fork_server"] = "/nonexistent/llmb-fs"
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=4)
    assert os.getpid() not in parents(log).values()


@pytest.mark.parametrize("https", [True, False])
def test_the_server_builds_the_tls_context_for_its_hosts_only_when_a_model_uses_https(
    https: bool,
) -> None:
    import subprocess
    import sys

    from pytest_llmbench.engine import forkserver

    env = {k: v for k, v in os.environ.items() if k != forkserver._TLS_ENV}
    if https:
        env[forkserver._TLS_ENV] = "1"
    code = ("import os; from pytest_llmbench.engine import forkserver; from pytest_llmbench.providers import openai_compat as oc; forkserver.warm_up();"
            " print(oc.default_ssl_context.cache_info().currsize, 'openai' in __import__('sys').modules,"
            f" {forkserver._TLS_ENV!r} in os.environ)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    # Built once in the server (hosts inherit it); the variable is not passed on to them.
    assert out == (["1", "True", "False"] if https else ["0", "True", "False"])


def test_an_item_does_not_see_the_environment_changes_of_the_item_before_it_in_its_host(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"leaky_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: """
        import os
        from pytest_llmbench.records import Score

        def score(req):
            with open(os.environ["ENV_LOG"], "a") as fh:
                fh.write(f"{req.identity['instance']} {os.getpid()} {os.environ.get('LEAK', '-')}\\n")
            os.environ["LEAK"] = req.identity["instance"]
            return Score(value=1.0)
    """})
    pytester.makefile(".toml", suite=SUITE.replace("parent_scorer:score", f"{module}:score") + "".join(
        f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
        for i in range(3)))
    log = pytester.path / "env.log"
    monkeypatch.setenv("ENV_LOG", str(log))
    pytester.runpytest("-p", "no:cacheprovider", "--llmbench-concurrency=1").assert_outcomes(passed=3)
    rows = [line.split() for line in log.read_text().splitlines()]
    assert len({pid for _inst, pid, _leak in rows}) == 1  # one host ran all three
    assert [leak for _inst, _pid, leak in rows] == ["-", "-", "-"]


def test_items_run_nicer_than_the_pytest_process(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine (results, new items, deadlines) must not wait behind its own items for the
    CPU: an item process runs at ``ITEM_NICE`` above the pytest process's niceness."""
    from pytest_llmbench.engine.child import ITEM_NICE

    module = f"nice_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: """
        import os
        from pytest_llmbench.records import Score

        def score(req):
            with open(os.environ["NICE_LOG"], "a") as fh:
                fh.write(f"{os.nice(0)}\\n")
            return Score(value=1.0)
    """})
    pytester.makefile(".toml", suite=SUITE.replace("parent_scorer", module) + "".join(
        f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
        for i in range(2)))
    log = pytester.path / "nice.log"
    monkeypatch.setenv("NICE_LOG", str(log))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert [int(n) for n in log.read_text().split()] == [min(19, os.nice(0) + ITEM_NICE)] * 2


def test_an_optional_module_is_hidden_only_inside_the_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fork server's warm-up hides aiohttp while ``import openai`` runs (the SDK then
    # skips its optional async transport); item code can import it afterwards.
    from pytest_llmbench.engine import forkserver

    name = f"optional_dep_{secrets.token_hex(4)}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with forkserver.hidden_modules((name, "os")):
        with pytest.raises(ImportError):
            importlib.import_module(name)
        assert importlib.import_module("os") is os  # already imported: left alone
    assert importlib.import_module(name).VALUE == 1
    assert "aiohttp" in forkserver.SKIPPED_AT_WARM_UP


EARLY_PROBE = """
import os

def _forkserver_children():
    mine = str(os.getpid())
    found = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                parent = fh.read().rsplit(")", 1)[1].split()[1]
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        found += parent == mine and b"pytest_llmbench.engine.forkserver" in cmdline
    return found

def pytest_sessionstart(session):
    with open(os.environ["EARLY_LOG"], "w") as fh:
        fh.write(str(_forkserver_children()))
"""


@pytest.mark.parametrize("named", [True, False], ids=["suite-file-named", "directory"])
def test_a_suite_file_named_on_the_command_line_starts_the_fork_server_before_the_session(
        pytester: pytest.Pytester, sim_env: str, named: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulated model needs no preflight (which would start the server at configure
    time): a suite file named on the command line does, so its first item does not wait for
    the server's start-up on top of the collection. A directory starts it at collection."""
    suites = pytester.mkdir("suites")
    (suites / "add.toml").write_text(
        '[[prompts]]\nid = "add"\ntemplate = "What is {{a}} + 1?"\nscorer = "numeric"\n'
        '[[prompts.instances]]\nid = "one"\nvars = { a = 1 }\nexpected = "2"\n')
    pytester.makeconftest(EARLY_PROBE)
    log = tmp_path / "early.log"
    monkeypatch.setenv("EARLY_LOG", str(log))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "suites/add.toml" if named else "suites", timeout=120)
    result.assert_outcomes(passed=1)
    assert log.read_text() == ("1" if named else "0")
