"""Nothing an item starts survives it, however it ends; nothing of a run survives pytest.

Real processes throughout: items start daemons that ``setsid``, clear their environment and
rename themselves, and processes whose main thread exited; pytest process groups are killed
with SIGKILL; items kill their own xdist worker. Each check runs with cgroups (where this
machine allows them) and with the fallback (``LLMBENCH_CGROUPS=0``), and with the fork
server on and off.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_llmbench.coord import cgroup, proc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

REPO = Path(__file__).resolve().parents[1]

#: A double-forked daemon: ``setsid``, an empty environment, a new name; writes its pid.
DAEMON = r"""
import os, sys, time
out = sys.argv[1]
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
code = (
    "import ctypes, os, sys, time; ctypes.CDLL(None).prctl(15, b'innocent', 0, 0, 0);"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()));"
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(1000)"
)
os.execve(sys.executable, ["innocent", "-c", code, out], {})
"""

#: A process whose main thread exits while another thread runs on (its leader shows ``Z``).
HEADLESS = r"""
import ctypes, os, sys, threading, time
threading.Thread(target=time.sleep, args=(1000,)).start()
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
ctypes.CDLL(None).pthread_exit(None)
"""

SCORER = r"""
import os, subprocess, sys, time
from pytest_llmbench.records import Score

DAEMON = {daemon!r}
HEADLESS = {headless!r}

def wait_for(path):
    for _ in range(500):
        if os.path.exists(path):
            return int(open(path).read())
        time.sleep(0.01)
    raise RuntimeError("no pid in " + path)

def running(pid, comm=None):
    # Alive, and hidden as meant: no environment, and renamed (the daemon).
    if comm is not None:  # (a leader whose main thread exited has no readable environ)
        with open(f"/proc/{{pid}}/environ", "rb") as fh:
            assert fh.read() == b"", "the process kept an environment"
        with open(f"/proc/{{pid}}/comm") as fh:
            assert fh.read().strip() == comm, "the process was not renamed"
    with open(f"/proc/{{pid}}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]

def score(req):
    inst = req.identity["instance"]
    state = os.environ["STATE"]
    with open(os.path.join(state, "hosts.log"), "a") as fh:
        fh.write(f"{{inst}} {{os.getpid()}}\n")
    if inst in ("start", "hang"):
        subprocess.run([sys.executable, "-c", DAEMON, os.path.join(state, inst + ".daemon")],
                       check=True, env={{}})
        subprocess.Popen([sys.executable, "-c", HEADLESS, os.path.join(state, inst + ".headless")],
                         start_new_session=True, env={{}})
        daemon = wait_for(os.path.join(state, inst + ".daemon"))
        headless = wait_for(os.path.join(state, inst + ".headless"))
        assert running(daemon, "innocent") in "SR"
        for _ in range(500):  # its main thread exits just after writing the pid
            if running(headless) == "Z":
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the main thread of the headless process did not exit")
        if inst == "hang":
            time.sleep(1000)
    elif inst == "check":
        with open(os.path.join(state, "check.log"), "w") as fh:
            for name in ("start.daemon", "start.headless"):
                pid = wait_for(os.path.join(state, name))
                fh.write(f"{{name}} {{pid}} {{int(os.path.exists(f'/proc/{{pid}}'))}}\n")
    return Score(value=1.0)
"""


def suite(pytester: pytest.Pytester, instances: list[str], state: Path) -> None:
    module = f"contain_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: SCORER.format(daemon=DAEMON, headless=HEADLESS)})
    body = f'[[prompts]]\nid = "p"\ntemplate = "What is 1 + {{{{a}}}}?"\nscorer = "{module}:score"\n'
    for i, name in enumerate(instances):
        body += f'[[prompts.instances]]\nid = "{name}"\nvars = {{ a = {i} }}\nexpected = "x"\n'
    pytester.makefile(".toml", suite=body)
    state.mkdir(exist_ok=True)


def alive(pid: int) -> bool:
    """Exists in any state but a zombie without threads (a reaped-later orphan of ours)."""
    info = proc.read_stat(pid)
    return info is not None and info.alive


def pids_in(state: Path, suffix: str) -> list[int]:
    return [int(p.read_text()) for p in state.glob(f"*{suffix}")]


MODES = [
    pytest.param({}, id="cgroup" if cgroup.available() else "no-cgroup"),
    pytest.param({"LLMBENCH_CGROUPS": "0"}, id="fallback"),
    pytest.param({"LLMBENCH_FORK_SERVER": "0"}, id="no-fork-server"),
    pytest.param({"LLMBENCH_FORK_SERVER": "0", "LLMBENCH_CGROUPS": "0"}, id="no-fork-server-fallback"),
]


@pytest.mark.parametrize("env", MODES)
def test_a_passing_item_leaves_nothing_behind(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    env: dict[str, str],
) -> None:
    """``start`` passes, leaving a setsid daemon (no environment, renamed) and a process whose
    main thread exited; by the time ``check`` (the next item, same worker) runs, both are
    gone, and ``check`` ran in a fresh item host."""
    state = tmp_path / "state"
    suite(pytester, ["start", "check"], state)
    monkeypatch.setenv("STATE", str(state))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-concurrency=1")
    result.assert_outcomes(passed=2)
    checked = dict((name, int(dead_or_alive)) for name, _pid, dead_or_alive
                   in (line.split() for line in (state / "check.log").read_text().splitlines()))
    assert checked == {"start.daemon": 0, "start.headless": 0}
    hosts = dict(line.split() for line in (state / "hosts.log").read_text().splitlines())
    assert hosts["start"] != hosts["check"]  # the host that ran ``start`` was replaced


@pytest.mark.parametrize("env", MODES[:2] + MODES[2:3])
def test_an_item_killed_at_its_deadline_leaves_nothing_behind(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    env: dict[str, str],
) -> None:
    state = tmp_path / "state"
    suite(pytester, ["hang"], state)
    monkeypatch.setenv("STATE", str(state))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # 10 s, not less: the item must import the SDK, get its answer and start both processes
    # before its deadline, which took over 4 s on a loaded machine (CI runs three suites).
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-task-timeout=10",
                                           "--llmbench-api-timeout=1", "--llmbench-lease-max=20")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*task_timeout*"])
    escaped = pids_in(state, ".daemon") + pids_in(state, ".headless")
    assert len(escaped) == 2
    assert not [p for p in escaped if alive(p)]


def _run_and_kill_group(cmd: list[str], cwd: Path, env: dict[str, str], state: Path,
                        leftovers: Callable[[str], list[int]]) -> list[int]:
    """Start pytest in a process group of its own, wait until its item is stuck, SIGKILL
    the group; the pids of the run's processes still alive 2 s later."""
    run = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(pids_in(state, ".daemon")) + len(pids_in(state, ".headless")) < 2:
        assert time.monotonic() < deadline, "the items never got stuck"
        assert run.poll() is None, "pytest ended before its items got stuck"
        time.sleep(0.05)
    time.sleep(0.2)
    marked = set(pids_in(state, ".daemon") + pids_in(state, ".headless"))
    hosts = {int(line.split()[1]) for line in (state / "hosts.log").read_text().splitlines()}
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    time.sleep(2.0)
    survivors = {p for p in marked | hosts if alive(p)}
    survivors |= {p for p in leftovers(env["RUN_MARK"]) if alive(p)}
    return sorted(survivors)


@pytest.mark.slow
@pytest.mark.parametrize(("env", "args"), [
    ({}, []), ({"LLMBENCH_CGROUPS": "0"}, []),
    ({}, ["-n", "2"]), ({"LLMBENCH_FORK_SERVER": "0"}, ["-n", "2"]),
], ids=["fork-server", "fallback", "xdist", "xdist-no-fork-server"])
def test_killing_the_pytest_process_group_leaves_no_process_of_the_run(
    pytester: pytest.Pytester, sim_env: str, tmp_path: Path, env: dict[str, str],
    args: list[str], leftovers: Callable[[str], list[int]],
) -> None:
    state = tmp_path / "state"
    suite(pytester, ["hang"], state)
    mark = secrets.token_hex(8)
    run_env = dict(os.environ, STATE=str(state), RUN_MARK=mark, PYTHONPATH=f"{REPO}:{pytester.path}",
                   **env)
    run_env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--llmbench-concurrency=1", *args,
           "--llmbench-task-timeout=300", "--llmbench-lease-max=400", str(pytester.path)]
    survivors = _run_and_kill_group(cmd, pytester.path, run_env, state, leftovers)
    assert survivors == [], [(p, proc.read_stat(p)) for p in survivors]


KILLER = r"""
import os, signal, time
from pytest_llmbench.records import Score

def score(req):
    if req.identity["instance"] == "i0":
        os.kill(os.getppid(), signal.SIGKILL)  # the xdist worker (no fork server)
        time.sleep(1000)
    return Score(value=1.0)
"""


@pytest.mark.slow
def test_an_item_that_kills_its_xdist_worker_is_crashed_and_the_run_ends(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = f"killer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: KILLER})
    body = f'[[prompts]]\nid = "p"\ntemplate = "What is {{{{a}}}} + 1?"\nscorer = "{module}:score"\n'
    for i in range(6):
        body += f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
    pytester.makefile(".toml", suite=body)
    monkeypatch.setenv("LLMBENCH_FORK_SERVER", "0")
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    started = time.monotonic()
    # One item in flight per worker: the items a killed worker was running beside the killer
    # die with it (crashed too), which would make the count below depend on timing.
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           "--llmbench-concurrency=1", timeout=300)
    assert time.monotonic() - started < 200  # the item's sleep(1000) is not waited for
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) >= 1
    assert outcomes.get("passed", 0) >= 4
    result.stdout.fnmatch_lines(["*i0-sim*crashed*"])


# --- leases over their maximum ----------------------------------------------------------

LEASE_TESTS = r"""
import time

def test_hog(llm_lease):
    with llm_lease("gpu", timeout=30):
        time.sleep(60)

def test_next(llm_lease):
    with llm_lease("gpu", timeout=30) as lease:
        assert lease.slot == 0
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_plain_tests_lease_over_its_maximum_is_reclaimed_without_a_worker_crash(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, xdist: list[str],
) -> None:
    pytester.makepyfile(test_leases=LEASE_TESTS)
    pytester.makepyprojecttoml("[tool.llmbench.resources]\ngpu = 1\n")
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    junit = pytester.path / "out.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", *xdist, "--llmbench-lease-max=1.5", "--llmbench-task-timeout=1",
        "--llmbench-api-timeout=0.2", "--llmbench-api-retries=0", f"--junitxml={junit}",
        "-o", "log_level=WARNING", timeout=120,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*LeaseExpired: [[]lease_timeout[]] held resource 'gpu' (slot 0)*over its limit of 1.5 s*",
    ])
    out = result.stdout.str()
    assert "[ResourceTimeout] resource=gpu slot=0" in out
    assert "[ForcedRelease] resource=gpu slot=0" in out and "reason=over_time" in out
    assert "crashed" not in out and "replacing" not in out
    assert 'name="llmbench_error_class" value="lease_timeout"' in junit.read_text()


ITEM_LEASE = r"""
import os, time
from pytest_llmbench.coord.lease import LeasePool, default_state_dir
from pytest_llmbench.records import Score

def score(req):
    pool = LeasePool(default_state_dir(), "sandbox", 1, max_occupation=1.0)
    with pool.acquire(timeout=30, label=req.identity["instance"]):
        if req.identity["instance"] == "hog":
            time.sleep(60)
    return Score(value=1.0)
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_an_items_lease_over_its_maximum_kills_the_item_not_the_worker(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    xdist: list[str],
) -> None:
    module = f"lease_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: ITEM_LEASE})
    body = f'[[prompts]]\nid = "p"\ntemplate = "What is 1 + {{{{a}}}}?"\nscorer = "{module}:score"\n'
    for i, name in enumerate(["hog", "next1", "next2"]):
        body += f'[[prompts.instances]]\nid = "{name}"\nvars = {{ a = {i} }}\nexpected = "x"\n'
    pytester.makefile(".toml", suite=body)
    monkeypatch.setenv("LLMBENCH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", *xdist, "--llmbench-task-timeout=30", "--llmbench-lease-max=40",
        # Live logs: the reclaim may be made by a waiting item's process, whose records reach
        # pytest when they arrive, perhaps while the next item runs (and a passing item's
        # captured log is not shown).
        "-o", "log_level=WARNING", "-o", "log_cli=true", "-o", "log_cli_level=WARNING",
        timeout=120,
    )
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*p[[]hog-sim[]]*lease_timeout*"])
    out = result.stdout.str()
    assert "replacing" not in out and "crashed" not in out
    (record,) = (tmp_path / "state" / "leases" / ".reclaimed").glob("*.json")
    assert '"reason": "over_time"' in record.read_text()
    if not xdist:  # under xdist the reclaiming process may be a worker whose log is not shown
        assert "[ResourceTimeout] resource=sandbox slot=0" in out
        assert "[ForcedRelease] resource=sandbox slot=0" in out and "reason=over_time" in out
