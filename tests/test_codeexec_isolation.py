"""Issue 13 attacks on the sandbox, as root and as an unprivileged user of their own.

A program must not read files beside the suite, a ``.env`` in the rootdir, the store, the
project or another run's files; must not forge a HumanEval pass; must not leave files in the
host's /tmp, /var/tmp or /dev/shm; and (with cgroups) its whole tree shares one memory cap.
The attacks are in ``sandbox_attacks.py`` so that the unprivileged run (a separate Python
under ``setpriv``) uses the very same programs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sandbox_attacks as attacks  # type: ignore[import-not-found]

from pytest_llmbench.records import ScoreRequest
from pytest_llmbench.scoring.codeexec import judge, probe_isolation

REPO = Path(__file__).resolve().parent.parent
ISO = probe_isolation()
SANDBOX_USER = "llmbench-sbx"
needs_root_fs = pytest.mark.skipif(not ISO.own_root, reason="no mount namespace on this kernel")


def plant(tmp_path: Path) -> list[str]:
    """Secrets where issue 13 found programs reading them: beside the suite, the rootdir's
    ``.env``, the store, plus the project's own files."""
    (tmp_path / "suite.toml").write_text('extra = { tests = [{ stdout = "42" }] }\n')
    (tmp_path / "beside.txt").write_text("PLANTED-BESIDE\n")
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-planted\n")
    store = tmp_path / ".llmbench" / "store"
    store.mkdir(parents=True)
    (store / "results.jsonl").write_text('{"answer": "planted"}\n')
    for path in tmp_path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp_path.chmod(0o755)
    return [str(tmp_path / n) for n in ("suite.toml", "beside.txt", ".env")] + [
        str(store / "results.jsonl"), str(REPO / "pyproject.toml"), "/etc/hostname"]


def check_reads(stdout: str, paths: list[str]) -> None:
    lines = stdout.splitlines()
    assert len(lines) == len(paths), stdout
    assert all(line.startswith("hidden") for line in lines), stdout


def check_attacks(facts: dict[str, object], paths: list[str]) -> None:
    check_reads(str(facts["read_files"]), paths)
    assert str(facts["other_run"]).startswith("found 0 "), facts["other_run"]
    forged, forged_exit = facts["forged"], facts["forged_exit"]
    assert isinstance(forged, dict) and isinstance(forged_exit, dict)
    assert forged["verdict"] == "WA", forged
    assert forged_exit["verdict"] == "RE", forged_exit
    litter = facts["litter"]
    assert isinstance(litter, dict)
    assert litter["left"] == [], litter
    written = int(litter["stdout"].split("written_mb")[1])
    assert "stopped 28" in litter["stdout"] and written <= 8, litter  # ENOSPC at the 8 MiB cap


# --- as the test process (root in CI) ------------------------------------------------------


@needs_root_fs
def test_program_cannot_read_suite_env_store_or_project(tmp_path: Path) -> None:
    paths = plant(tmp_path)
    check_reads(attacks.read_files(paths), paths)


@needs_root_fs
def test_program_cannot_find_another_runs_files() -> None:
    out = attacks.other_run()
    assert out.startswith("found 0 "), out


def test_forged_marker_does_not_pass() -> None:
    assert attacks.forged_marker(False)["verdict"] == "WA"
    assert attacks.forged_marker(True)["verdict"] == "RE"  # exited 0 before check()


def test_the_right_answer_still_passes_the_harness() -> None:
    req = ScoreRequest(answer="```python\ndef add(x, y):\n    return x + y\n```", expected=None,
                       options={"time_limit": 10},
                       extra={"test": attacks.TEST, "entry_point": "add"})
    s = judge(req, lease=None)
    assert s.details["verdict"] == "OK", s.explanation


@needs_root_fs
def test_nothing_is_left_in_tmp_var_tmp_dev_shm_and_disk_is_capped() -> None:
    facts = attacks.litter(8)
    assert facts["left"] == []
    assert "stopped 28" in facts["stdout"], facts  # ENOSPC
    assert int(facts["stdout"].split("written_mb")[1]) <= 8


WRITER = """
import os
for path in ("/usr/llmbench-probe", "/etc/llmbench-probe", "/llmbench-probe"):
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as exc:
        print("refused", exc.errno)
print(sorted(os.listdir("/tmp")), os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"])
"""


@needs_root_fs
def test_toolchain_is_read_only_and_tmp_starts_empty() -> None:
    s = judge(ScoreRequest(answer=f"```python\n{WRITER}\n```", expected=None,
                           options={"time_limit": 10}, extra={"tests": [{"stdout": ""}]}),
              lease=None)
    lines = s.details["tests"][0]["stdout_head"].splitlines()
    assert lines[0] == "refused 30", lines  # EROFS: the toolchain is a read-only bind
    if ISO.switch_user:  # the tmpfs's own directories belong to root, not to the run's uid
        assert lines[1].startswith("refused") and lines[2].startswith("refused"), lines
    assert lines[3] == "[] /work /work /tmp", lines


def test_details_show_the_isolation_that_applied() -> None:
    s = judge(ScoreRequest(answer="```python\nprint(1)\n```", expected=None,
                           options={"time_limit": 10}, extra={"tests": [{"stdout": "1"}]}),
              lease=None)
    assert s.details["isolation"] == ISO.to_dict()
    assert set(s.details["isolation"]) == {"process_cap", "network", "filesystem", "tree_limits"}


TWELVE = """
import os, sys, time
held = 0
for i in range(12):
    if os.fork() == 0:
        try:
            block = bytearray(200 * 1024 * 1024)
            for j in range(0, len(block), 4096):
                block[j] = 1  # touch every page: resident, not just mapped
            os.write(1, b"held\\n")
            time.sleep(30)
        finally:
            os._exit(0)
time.sleep(4)
"""


@pytest.mark.skipif(ISO.tree_limits != "cgroup", reason="no writable memory/pids cgroups here")
def test_whole_tree_memory_cap_holds_for_twelve_children() -> None:
    s = judge(ScoreRequest(answer=f"```python\n{TWELVE}\n```", expected=None,
                           options={"time_limit": 3, "memory_mb": 256, "max_wall_factor": 1.0},
                           extra={"tests": [{"stdout": ""}]}), lease=None)
    test = s.details["tests"][0]
    held = test["stdout_head"].count("held")
    assert held <= 1, test  # 12 x 200 MiB never fit under 256 MiB together
    assert test["oom_kills"] >= 1, test
    assert test["tree_peak_memory_kb"] <= 256 * 1024, test


# --- as an unprivileged user of its own ----------------------------------------------------


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[tuple[list[str], Path]]:
    """``(command prefix, directory)`` to run a Python as a dedicated unprivileged user.

    As root (CI), the user ``llmbench-sbx`` is created if missing and the package is copied
    to a world-readable temp dir, so the test does not depend on where the checkout lives.
    Not root: the test process already is an unprivileged user.
    """
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if python3 is None or subprocess.run([python3, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                                         check=False).returncode:
        pytest.skip("no system python3 >= 3.10 for the unprivileged user")
    if os.geteuid() != 0:
        prefix = [python3]
    else:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is not installed")
        try:
            pwd.getpwnam(SANDBOX_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/usr/sbin/nologin", SANDBOX_USER], check=True)
        prefix = [setpriv, f"--reuid={SANDBOX_USER}", f"--regid={SANDBOX_USER}",
                  "--clear-groups", "--reset-env", python3]
    work = Path(tempfile.mkdtemp(prefix="llmbench-unpriv-"))
    try:
        shutil.copytree(REPO / "pytest_llmbench", work / "pytest_llmbench",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(Path(__file__).parent / "sandbox_attacks.py", work)
        for path in [work, *work.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield prefix, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.slow
def test_attacks_fail_as_an_unprivileged_user(unprivileged: tuple[list[str], Path]) -> None:
    prefix, work = unprivileged
    planted = Path(tempfile.mkdtemp(prefix="llmbench-planted-"))
    try:
        paths = plant(planted)
        env = {"PYTHONPATH": str(work), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
        done = subprocess.run([*prefix, str(work / "sandbox_attacks.py"), *paths], cwd=work,
                              env=env, capture_output=True, text=True, timeout=300, check=False)
    finally:
        shutil.rmtree(planted, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout)
    assert facts["uid"] != 0
    if facts["isolation"]["filesystem"] == "shared":
        pytest.skip(f"no user namespaces for unprivileged users here: {facts['isolation']}")
    assert facts["isolation"]["filesystem"] == "userns+mount-ns"
    check_attacks(facts, paths)


@pytest.mark.skipif(ISO.tree_limits != "cgroup", reason="no writable memory/pids cgroups here")
def test_leftovers_of_a_dead_runner_are_killed_by_the_next_run() -> None:
    from pytest_llmbench.scoring.codeexec import cgroup

    parents = cgroup.probe()
    assert parents is not None
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer exists: the "runner" that died
    orphan = subprocess.Popen(["sleep", "60"])
    stale = [parent / f"llmbench-{dead.pid}-stale" for parent in parents.values()]
    try:
        for path in stale:
            path.mkdir()
            (path / "cgroup.procs").write_text(str(orphan.pid))
        fresh = cgroup.RunCgroup.create("fresh", memory_bytes=0, pids=4)
        assert fresh is not None
        fresh.remove()
        assert orphan.wait(timeout=10) == -9  # killed by the next run's set-up
        cgroup.RunCgroup.create("again", memory_bytes=0, pids=4).remove()  # type: ignore[union-attr]
        assert not any(path.exists() for path in stale)
    finally:
        orphan.kill()
        orphan.wait()
        for path in stale:
            with contextlib.suppress(OSError):
                path.rmdir()


def test_root_plan_binds_the_toolchain_read_only_and_an_outside_interpreter(tmp_path: Path) -> None:
    from pytest_llmbench.scoring.codeexec import fsroot

    prefix = tmp_path / "opt-python"
    (prefix / "bin").mkdir(parents=True)
    plan = fsroot.plan_root([str(prefix), "/usr/lib", "/"], disk_mb=8, proc=False)
    sources = {b.source: b for b in plan.binds}
    assert fsroot.MS_RDONLY & sources["/usr"].flags and fsroot.MS_NOSUID & sources["/usr"].flags
    assert str(prefix) in sources  # outside /usr: bound too
    assert "/usr/lib" not in sources and "/" not in sources  # covered / never the host root
    assert not fsroot.MS_RDONLY & sources["/dev/null"].flags  # devices stay writable
    for path, text in plan.symlinks:  # merged /usr: /bin -> usr/bin and the like
        assert os.readlink(path) == text
    assert plan.size_bytes == 8 * 1024 * 1024
    assert plan.describe()["read_only"][0] == "/usr"
