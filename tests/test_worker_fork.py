"""xdist workers forked from the worker template (pytest_llmbench/workers/).

The launcher and the template are driven directly with real processes (a fork, a fresh
interpreter, a kill), then through pytest with real xdist workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llmbench.workers import controller
from pytest_llmbench.workers.template import BOOTSTRAP

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


_PROCS: list[subprocess.Popen[bytes]] = []


@pytest.fixture
def template() -> Iterator[controller.WorkerTemplate]:
    started = controller.WorkerTemplate()
    yield started
    started.close()
    for proc in _PROCS:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
    _PROCS.clear()


def launch(template: controller.WorkerTemplate, program: str, *, env: dict[str, str] | None = None,
           flags: tuple[str, ...] = ("-u",), ignore: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """The launcher as execnet starts it: ``PYTHON -S -I launch.py SOCKET -u -c BOOTSTRAP``,
    then the bootstrap's one line on its standard input."""
    argv = [sys.executable, "-S", "-I", str(controller.LAUNCHER), template.path, *flags, "-c", BOOTSTRAP]
    def dispositions() -> None:
        # As from an interactive shell, whatever this test process inherited (CI may run it
        # as a background job, with SIGINT ignored), then ``ignore``.
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN if sig in ignore else signal.SIG_DFL)

    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                            preexec_fn=dispositions)
    _PROCS.append(proc)
    assert proc.stdin is not None
    proc.stdin.write((repr(program) + "\n").encode())
    proc.stdin.flush()
    return proc


def first_line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().decode().strip()


def gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


REPORT = ("import os, sys; print(os.getpid(), os.getppid(), os.getcwd(), os.environ.get('MARK'),"
          " 'pytest' in sys.modules, sys.argv, flush=True)")


def test_a_worker_is_forked_from_the_template_with_the_launchers_cwd_and_environment(
    template: controller.WorkerTemplate, tmp_path: Path
) -> None:
    env = dict(os.environ, MARK="from-the-launcher")
    proc = subprocess.Popen(
        [sys.executable, "-S", "-I", str(controller.LAUNCHER), template.path, "-u", "-c", BOOTSTRAP],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=tmp_path)
    _PROCS.append(proc)
    assert proc.stdin is not None
    proc.stdin.write((repr(REPORT) + "\n").encode())
    proc.stdin.flush()
    pid, ppid, cwd, mark, has_pytest, argv = first_line(proc).split(" ", 5)
    assert proc.wait(timeout=30) == 0
    assert int(pid) != proc.pid  # not the launcher become Python: a fork of the template
    assert int(ppid) == template.process.pid
    assert (cwd, mark, has_pytest, argv) == (str(tmp_path), "from-the-launcher", "True", "['-c']")


def test_the_workers_exit_status_and_signal_are_the_launchers(template: controller.WorkerTemplate) -> None:
    assert launch(template, "raise SystemExit(7)").wait(timeout=30) == 7
    assert launch(template, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)").wait(
        timeout=30) == -signal.SIGTERM
    failed = launch(template, "1/0")
    assert failed.wait(timeout=30) == 1  # an uncaught error: traceback on stderr, status 1


ENDING = """
import atexit, sys, threading, time
sys.stdout = open(1, "w", buffering=1 << 16, closefd=False)  # flushed only at the end
atexit.register(lambda: print("atexit ran"))
def late():
    time.sleep(0.3)
    print("thread done")
threading.Thread(target=late).start()
print("main done")
raise SystemExit(CODE)
"""


@pytest.mark.parametrize(("code", "status"), [("5", 5), ("None", 0), ("'bye'", 1)])
def test_a_worker_ends_as_an_interpreter_would(template: controller.WorkerTemplate,
                                               code: str, status: int) -> None:
    """A forked worker skips only the teardown of its objects at its end: its non-daemon
    threads are waited for, its atexit handlers run, its buffered output is flushed, and
    its status follows ``SystemExit``'s rules."""
    proc = launch(template, ENDING.replace("CODE", code))
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    assert proc.wait(timeout=30) == status
    assert out.split() == ["main", "done", "thread", "done", "atexit", "ran"]


def test_a_worker_inherits_the_platform_answer_xdist_asks_for(template: controller.WorkerTemplate) -> None:
    """xdist's worker reports ``platform.platform()``: computed once in the template (it
    reads the interpreter's binary and runs ``uname -p``), not in every worker."""
    program = ("import platform, subprocess; calls = []; real = subprocess.Popen.__init__\n"
               "def spy(self, *a, **k):\n    calls.append(a); real(self, *a, **k)\n"
               "subprocess.Popen.__init__ = spy\n"
               "print(platform.platform() != '', len(calls), flush=True)")
    assert first_line(launch(template, program)) == "True 0"


def test_the_worker_has_the_signal_dispositions_a_fresh_interpreter_would(
    template: controller.WorkerTemplate,
) -> None:
    """Ignored where the launcher found them ignored (``nohup``, a shell's background job),
    default elsewhere; Ctrl-C a ``KeyboardInterrupt``, not the template's ``SIG_IGN``."""
    program = ("import signal; g = signal.getsignal; print(g(signal.SIGINT) is signal.default_int_handler,"
               " g(signal.SIGHUP) == signal.SIG_IGN, g(signal.SIGTERM) == signal.SIG_DFL,"
               " g(signal.SIGCHLD) == signal.SIG_DFL, flush=True)")
    assert first_line(launch(template, program)) == "True False True True"
    assert first_line(launch(template, program, ignore=(signal.SIGHUP,))) == "True True True True"
    program = "import signal; print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)"
    assert first_line(launch(template, program, ignore=(signal.SIGINT,))) == "True"


def test_killing_the_launcher_kills_its_worker(template: controller.WorkerTemplate) -> None:
    """execnet kills a gateway's process (the launcher): the worker must not live on."""
    proc = launch(template, "import os, time; print(os.getpid(), flush=True); time.sleep(600)")
    worker = int(first_line(proc))
    assert worker != proc.pid
    proc.kill()
    proc.wait(timeout=10)
    assert gone(worker)


def test_a_launcher_gone_before_its_answer_still_takes_its_worker_with_it(
    template: controller.WorkerTemplate,
) -> None:
    """A launcher killed right after the fork, before the template could answer ``started``:
    the template's answer then fails, and the worker must die all the same (CI once caught
    a worker left running that way, under load)."""
    import json
    import socket
    import struct

    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    program = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"
    os.write(stdin_w, (repr(program) + "\n").encode())
    payload = json.dumps({"argv": ["-u", "-c", BOOTSTRAP], "cwd": os.getcwd(),
                          "env": dict(os.environ), "ignored": [], "sent": time.monotonic()}).encode()
    end = time.monotonic() + 30
    while not os.path.exists(template.path) and time.monotonic() < end:
        time.sleep(0.01)  # the template binds its socket once its interpreter is up
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(template.path)
        socket.send_fds(sock, [struct.pack("!Q", len(payload))], [stdin_r, stdout_w, 2])
        sock.sendall(payload)
        assert sock.recv(8) == b"forking\n"
    for fd in (stdin_r, stdout_w):
        os.close(fd)
    with os.fdopen(stdout_r) as out:
        line = out.readline()  # its pid, or nothing: killed before it could print it
    if line:
        assert gone(int(line))
    # (End of file without a line: every holder of the pipe's other end, the worker, ended.)
    os.close(stdin_w)
    template.process.stdin.close()  # type: ignore[union-attr]
    assert template.process.wait(timeout=10) == 0  # no worker left to wait for


def test_a_request_its_launcher_may_have_given_up_on_is_refused(
    template: controller.WorkerTemplate,
) -> None:
    """A launcher waits ``GIVE_UP`` s for the first answer, then becomes an interpreter
    itself: the template must not fork a second one onto the same pipes. A request older
    than ``STALE`` (half that) is refused."""
    import json
    import socket
    import struct

    from pytest_llmbench.workers import launch
    from pytest_llmbench.workers import template as template_module

    assert template_module.STALE * 2 == launch.GIVE_UP
    payload = json.dumps({"argv": ["-u", "-c", BOOTSTRAP], "cwd": os.getcwd(), "env": dict(os.environ),
                          "ignored": [], "sent": time.monotonic() - template_module.STALE - 1}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(template.path)  # listening before the template's interpreter is up
        socket.send_fds(sock, [struct.pack("!Q", len(payload))], [0, 1, 2])
        sock.sendall(payload)
        assert sock.makefile("rb").readline() == b"fallback stale\n"


def test_a_launcher_the_template_cannot_serve_becomes_a_fresh_interpreter(
    template: controller.WorkerTemplate, tmp_path: Path
) -> None:
    program = "import os; print(os.getpid(), flush=True)"
    # An interpreter setting that differs from the template's: a fresh interpreter.
    changed = launch(template, program, env=dict(os.environ, PYTHONHASHSEED="123"))
    assert int(first_line(changed)) == changed.pid
    assert changed.wait(timeout=30) == 0
    # Flags the template does not know.
    flagged = launch(template, program, flags=("-u", "-O"))
    assert int(first_line(flagged)) == flagged.pid
    flagged.wait(timeout=30)
    # No template listening at all.
    template.close()
    alone = launch(template, program)
    assert int(first_line(alone)) == alone.pid
    assert alone.wait(timeout=30) == 0


def test_the_template_exits_when_told_and_its_workers_are_done(template: controller.WorkerTemplate) -> None:
    proc = launch(template, "import sys; sys.stdin.read()")  # runs until its stdin closes
    assert proc.stdin is not None
    template.process.stdin.close()  # type: ignore[union-attr]
    time.sleep(0.3)
    assert template.process.poll() is None  # a worker is still running
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    assert template.process.wait(timeout=10) == 0


def test_a_template_with_a_thread_refuses_and_launchers_start_fresh_interpreters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preloaded module that starts a thread (a fork would copy its locks, not the thread)."""
    (tmp_path / "threaded_mod.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    refusing = controller.WorkerTemplate(modules=["threaded_mod"])
    try:
        assert refusing.process.wait(timeout=30) == 3
        proc = launch(refusing, "import os; print(os.getpid(), flush=True)")
        assert int(first_line(proc)) == proc.pid
        assert proc.wait(timeout=30) == 0
    finally:
        refusing.close()
        for proc in _PROCS:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    pipe.close()
        _PROCS.clear()


@pytest.mark.parametrize(("spec", "forkable"), [
    ("popen", True), ("popen//env:A=1", True), ("popen//python=python3.12", False),
    ("popen//chdir=/tmp", False), ("ssh=host", False), ("socket=1.2.3.4:8888", False),
])
def test_only_plain_local_popen_specs_are_forked(spec: str, forkable: bool) -> None:
    assert controller.forkable(spec) is forkable


WHO_AM_I = """
    import os, pathlib

    def test_parent(worker_id):
        parent = pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        pathlib.Path(f"parent-{worker_id}").write_bytes(parent)

    def test_assertions_are_still_rewritten():
        value = 41
        assert value + 1 == 43
"""


def forked_parents(pytester: pytest.Pytester) -> list[bool]:
    files = sorted(pytester.path.glob("parent-gw*"))
    return [b"template.py" in f.read_bytes() for f in files]


@pytest.mark.parametrize(("args", "forked"), [
    (["--llmbench-worker-fork", "on"], True),
    ([], False),  # auto: two workers do not pay for the template
    (["-n", "4", "--llmbench-worker-fork", "off"], False),
])
def test_xdist_workers_fork_from_the_template_when_asked(
    pytester: pytest.Pytester, sim_env: str, args: list[str], forked: bool
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(test_who=WHO_AM_I)
    pytester.makefile(".toml", suite="""
        [suite]
        name = "s"
        scorer = "numeric"

        [[prompts]]
        id = "add"
        template = "What is {{a}} + {{b}}?"

        [[prompts.instances]]
        id = "i0"
        vars = { a = 2, b = 3 }
        expected = "5"
    """)
    workers = [] if "-n" in args else ["-n", "2"]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *workers, *args, timeout=120)
    result.assert_outcomes(passed=2, failed=1)
    # The test module's asserts are rewritten in a forked worker, and no plugin module was
    # imported before pytest could rewrite it (pytest would warn).
    result.stdout.fnmatch_lines(["*assert (41 + 1) == 43*"])
    result.stdout.no_fnmatch_line("*PytestAssertRewriteWarning*")
    assert forked_parents(pytester) and all(p is forked for p in forked_parents(pytester))


def test_a_bad_worker_fork_value_is_one_usage_error(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makeini("[pytest]\nllmbench_worker_fork = sometimes\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*llmbench_worker_fork: expected one of auto, on, off; got 'sometimes'*"])


def test_the_modules_pytest_will_rewrite_are_never_imported_ahead() -> None:
    """The pytest11 distributions' packages (xdist, this plugin...) are pytest's to import
    through its rewrite hook; the fallback reading (a pytest without the private helper)
    names at least as many."""
    from pytest_llmbench.workers import template

    names = template.rewritten_names()
    assert {"xdist", "pytest_llmbench"} <= names
    assert template._top_level("xdist/__init__.py") == "xdist"
    assert template._top_level("six.py") == "six"
    assert template._top_level("pytest_xdist-3.8.0.dist-info/METADATA") == ""
    assert template._top_level("../../bin/tool") == ""


PRELOADED = """
    import os, pathlib, sys

    WORKER = os.environ.get("PYTEST_XDIST_WORKER")
    if WORKER:  # at the conftest's import: what the worker had before its session began
        pathlib.Path(f"engine-{WORKER}").write_text(
            str("pytest_llmbench.engine.scheduler" in sys.modules))

    def pytest_configure(config):
        # What pytest does for this plugin installed from a wheel, before it loads plugins
        # (an editable install is marked only when the package is on sys.path): the
        # package is imported by then in a forked worker, and must not make pytest warn
        # that it cannot rewrite it. (Marked here, it is imported in either mode.)
        config.pluginmanager.rewrite_hook.mark_rewrite("pytest_llmbench")
"""


@pytest.mark.parametrize(("fork", "preloaded"), [("on", True), ("off", False)])
def test_a_forked_worker_has_this_plugins_modules_from_the_template(
    pytester: pytest.Pytester, sim_env: str, fork: str, preloaded: bool
) -> None:
    """The template imports this package's modules too (the engine's included), so each
    worker does not; pytest is told not to rewrite the package, so it does not warn."""
    pytest.importorskip("xdist")
    pytester.makeconftest(PRELOADED)
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--llmbench-worker-fork", fork,
        "-W", "error::pytest.PytestAssertRewriteWarning", timeout=120)
    result.assert_outcomes(passed=1)
    seen = [p.read_text() for p in sorted(pytester.path.glob("engine-gw*"))]
    assert seen == [str(preloaded)] * 2
