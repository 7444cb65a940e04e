"""proc.py against real process trees: escaped sessions, SIGTERM-deaf loops, fork bombs."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.coord import proc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


def _env(token: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop(proc.TOKEN_ENV, None)
    if token is not None:
        env[proc.TOKEN_ENV] = token
    return env


def _holders_independent(token: str) -> list[int]:
    """Processes with ``token`` in environ or name, found without the code under test."""
    needle = f"{proc.TOKEN_ENV}={token}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
            if stat[stat.rfind(b")") + 2 :].split()[0] in (b"Z", b"X"):
                continue
            comm = Path(f"/proc/{name}/comm").read_text().strip()
            env = Path(f"/proc/{name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env or comm == proc.comm_tag(token):
            found.append(int(name))
    return found


def _group_members(pgid: int) -> list[int]:
    return [p for p, i in proc.scan().items() if i.pgrp == pgid and i.alive]


@pytest.fixture
def token() -> Iterator[str]:
    """A fresh item token; anything still carrying it at teardown is SIGKILLed."""
    tok = secrets.token_hex(8)
    yield tok
    for _ in range(200):  # repeated: a survivor may still be forking
        left = [p for p in _holders_independent(tok) if p != os.getpid()]
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


class Spawned:
    """A python child in its own session that prints lines; always waited for."""

    def __init__(
        self,
        code: str,
        *,
        token: str | None = None,
        args: list[str] | None = None,
        session: bool = True,
    ) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *(args or [])],
            env=_env(token),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=session,
        )

    def line(self) -> str:
        assert self.p.stdout is not None
        return self.p.stdout.readline().strip()

    def exit_code(self) -> int:
        """Wait for a natural exit."""
        self.p.wait(timeout=10)
        return self.close()

    def close(self) -> int:
        if self.p.poll() is None:
            self.p.kill()
        rc = self.p.wait(timeout=10)
        assert self.p.stdout is not None
        self.p.stdout.close()
        return rc


Spawn = Callable[..., Spawned]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Factory of :class:`Spawned` children, all killed and waited for at teardown."""
    made: list[Spawned] = []

    def make(code: str, **kw: Any) -> Spawned:
        made.append(Spawned(code, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_stat_parsing_and_liveness() -> None:
    me = proc.read_stat(os.getpid())
    assert me is not None and me.alive and me.ppid == os.getppid()
    assert me.pgrp == os.getpgrp()
    assert proc.process_start_time(os.getpid()) == me.start_time
    assert proc.pid_alive(os.getpid(), me.start_time)
    assert not proc.pid_alive(os.getpid(), me.start_time + 1)  # "reused" pid
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    while proc.pid_alive(p.pid):  # exits, then lingers as a zombie until waited
        time.sleep(0.01)
    assert proc.read_stat(p.pid) is not None  # zombie still listed...
    assert not proc.pid_alive(p.pid)  # ...but not alive
    p.wait()
    assert proc.process_start_time(p.pid) is None
    assert proc.read_stat(-1) is None and proc.read_stat(0) is None


def test_parse_stat_with_parenthesis_in_name() -> None:
    raw = b"42 (a) b (c)) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n"
    info = proc._parse_stat(42, raw)
    assert info is not None
    assert (info.comm, info.state, info.ppid, info.pgrp, info.start_time) == (
        "a) b (c)",
        "S",
        1,
        42,
        777,
    )


def test_sigterm_ignoring_python_loop_is_sigkilled(spawn: Spawn) -> None:
    s = spawn("""
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        while True:
            pass
    """)
    assert s.line() == "ready"
    t0 = time.monotonic()
    signalled = proc.kill_tree(s.p.pid, grace=0.2)
    assert s.p.wait(timeout=5) == -signal.SIGKILL
    assert s.p.pid in signalled
    assert time.monotonic() - t0 < 5


def test_sleep_in_own_group_dies_on_sigterm_without_waiting(spawn: Spawn) -> None:
    s = spawn("""
        import subprocess
        child = subprocess.Popen(["sleep", "1000"])
        print(child.pid, flush=True)
        child.wait()
    """)
    sleeper = int(s.line())
    assert proc.read_stat(sleeper).pgrp == s.p.pid  # type: ignore[union-attr]
    assert proc.descendants(s.p.pid) == [sleeper]
    t0 = time.monotonic()
    signalled = proc.kill_tree(s.p.pid, grace=30)
    assert time.monotonic() - t0 < 10  # did not sit out the 30 s grace
    assert s.p.wait(timeout=5) == -signal.SIGTERM
    assert sleeper in signalled and not proc.pid_alive(sleeper)


def test_setsid_escapees_found_by_token(spawn: Spawn, token: str) -> None:
    # The item starts `setsid sleep 1000` and a double-forked os.setsid() loop that ignores
    # SIGTERM; both leave the group, and the double fork also leaves the tree.
    s = spawn(
        """
        import os, signal, subprocess, time
        a = subprocess.Popen(["setsid", "sleep", "1000"])
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.write(w, b"go")
                while True:
                    time.sleep(0.01)
            os._exit(0)
        os.read(r, 2)
        while os.getpgid(a.pid) == os.getpgrp():  # setsid(1) has not run yet
            time.sleep(0.01)
        print(a.pid, flush=True)
        while True:
            time.sleep(1)
        """,
        token=token,
    )
    setsid_sleep = int(s.line())
    holders = proc.pids_with_token(token)
    escaped = [p for p in holders if proc.read_stat(p).sid != s.p.pid]  # type: ignore[union-attr]
    assert setsid_sleep in escaped and len(escaped) == 2
    orphan = next(p for p in escaped if p != setsid_sleep)
    assert orphan not in proc.descendants(s.p.pid)  # only the token can find it
    assert sorted(holders) == sorted(_holders_independent(token))

    signalled = proc.kill_tree(s.p.pid, token=token, grace=0.3)
    assert set(escaped) <= set(signalled)
    assert _holders_independent(token) == []
    assert s.close() == -signal.SIGTERM


def test_without_token_escapees_survive(spawn: Spawn, token: str) -> None:
    """The token is what catches an escaped orphan (the fixture cleans it up)."""
    s = spawn(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(1000)
            os._exit(0)
        time.sleep(1000)
        """,
        token=token,
    )
    orphan = int(s.line())
    proc.kill_tree(s.p.pid, grace=0.3)
    assert s.close() == -signal.SIGTERM
    assert proc.pid_alive(orphan)
    proc.kill_tree(orphan, token=token, grace=0.3)
    assert not proc.pid_alive(orphan)


def test_forked_descendants_found_by_process_name(spawn: Spawn, token: str) -> None:
    # Like the engine: the token is set after start (no exec), so /proc/PID/environ lacks
    # it; the name set by tag_process is what a double-forked pure-Python daemon keeps.
    s = spawn(
        """
        import os, signal, sys, time
        from pytest_llmbench.coord import proc
        os.setpgid(0, 0)
        proc.tag_process(sys.argv[1])
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print(os.getpid(), flush=True)
                while True:
                    time.sleep(0.01)
            os._exit(0)
        time.sleep(1000)
        """,
        args=[token],
        session=False,  # the script makes its own group, as the engine's child does
    )
    daemon = int(s.line())
    info = proc.read_stat(daemon)
    assert info is not None and info.comm == proc.comm_tag(token)
    assert info.sid != os.getsid(s.p.pid) and info.ppid != s.p.pid  # out of session and tree
    assert f"{proc.TOKEN_ENV}={token}".encode() not in Path(f"/proc/{daemon}/environ").read_bytes()
    assert daemon in proc.pids_with_token(token)
    signalled = proc.kill_tree(s.p.pid, token=token, grace=0.2)
    assert daemon in signalled and not proc.pid_alive(daemon)
    assert s.close() == -signal.SIGTERM


def test_gil_holding_c_call_needs_sigkill(spawn: Spawn) -> None:
    # A thread sleeps inside libc through PyDLL, which keeps the GIL; the main thread gets
    # SIGTERM but can never run its Python handler (it needs the GIL), so only SIGKILL works.
    s = spawn("""
        import ctypes, signal, sys, threading
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        def hold():
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            print("ready", flush=True)
            ctypes.PyDLL(None).sleep(1000)
        t = threading.Thread(target=hold)
        t.start()
        t.join()
    """)
    assert s.line() == "ready"
    time.sleep(0.05)  # let the thread enter sleep() with the GIL held
    proc.kill_tree(s.p.pid, grace=0.3)
    assert s.p.wait(timeout=5) == -signal.SIGKILL


def test_python_handler_gets_its_chance(spawn: Spawn) -> None:
    s = spawn("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))
        print("ready", flush=True)
        time.sleep(1000)
    """)
    assert s.line() == "ready"
    proc.kill_tree(s.p.pid, grace=5)
    assert s.p.wait(timeout=5) == 3


def test_fork_bomb_leaves_nothing(spawn: Spawn, token: str, tmp_path: Path) -> None:
    limit = 200
    s = spawn(
        """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        slots, limit = sys.argv[1], int(sys.argv[2])
        def claim():
            for n in range(limit):
                try:
                    os.close(os.open(f"{slots}/{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    return n
                except FileExistsError:
                    pass
            return None
        print("ready", flush=True)
        while True:
            n = claim()
            if n is None:
                break
            if os.fork() == 0:
                os.closerange(3, 100)
                sys.stdout = open(os.devnull, "w")
                if n % 3 == 0:
                    os.setsid()  # escape the group; the token still marks it
            time.sleep(0.1)
        while True:
            time.sleep(0.01)
        """,
        token=token,
        args=[str(tmp_path), str(limit)],
    )
    assert s.line() == "ready"
    while len(list(tmp_path.iterdir())) < 40:  # kill while it is still spawning
        time.sleep(0.005)
    proc.kill_tree(s.p.pid, token=token, grace=0.05)
    assert _holders_independent(token) == []
    assert _group_members(s.p.pid) == []
    spawned = len(list(tmp_path.iterdir()))
    time.sleep(0.1)
    assert len(list(tmp_path.iterdir())) == spawned  # nobody is left to fork
    assert s.close() == -signal.SIGKILL


def test_never_signals_caller_parent_or_their_groups(spawn: Spawn) -> None:
    # Sandboxed: a launcher in its own session runs the probe, so a broken guard could only
    # kill the sandbox, which the asserts would see.
    probe = textwrap.dedent("""
        import json, os, subprocess
        from pytest_llmbench.coord import proc
        sib = subprocess.Popen(["sleep", "1000"])
        out = {
            "self": proc.kill_tree(os.getpid(), grace=0.1),
            "parent": proc.kill_tree(os.getppid(), grace=0.1),
            "zero": proc.kill_tree(0, grace=0.1),
            "minus": proc.kill_tree(-1, grace=0.1),
            "group0": proc.kill_tree(999999999, pgid=0, grace=0.1),
            "group-1": proc.kill_tree(999999999, pgid=-1, grace=0.1),
            "own_group": proc.kill_tree(999999999, pgid=os.getpgrp(), grace=0.1),
            "sibling_alive": proc.pid_alive(sib.pid),
            "parent_alive": proc.pid_alive(os.getppid()),
        }
        sib.kill()
        sib.wait()
        print(json.dumps(out), flush=True)
    """)
    s = spawn(
        """
        import subprocess, sys
        r = subprocess.run([sys.executable, "-c", sys.argv[1]], capture_output=True, text=True)
        print(r.returncode, r.stdout.strip(), flush=True)
        """,
        args=[probe],
    )
    rc, _, payload = s.line().partition(" ")
    assert rc == "0"
    out = json.loads(payload)
    assert out.pop("sibling_alive") and out.pop("parent_alive")
    assert out == dict.fromkeys(out, [])
    assert s.exit_code() == 0


def test_subreaper_adopts_orphans_and_reap_collects_them(spawn: Spawn) -> None:
    s = spawn("""
        import json, os, signal
        from pytest_llmbench.coord import proc
        ok = proc.set_child_subreaper()
        r, w = os.pipe()
        mid = os.fork()
        if mid == 0:
            gc = os.fork()
            if gc == 0:
                os.execvp("sleep", ["sleep", "1000"])
            os.write(w, str(gc).encode())
            os._exit(0)
        gc = int(os.read(r, 32))
        os.waitpid(mid, 0)
        adopted = proc.read_stat(gc).ppid == os.getpid()
        killed = proc.kill_tree(gc, grace=1)
        status = proc.reap(killed)
        print(json.dumps({
            "ok": ok, "adopted": adopted, "gc": gc, "killed": killed,
            "sig": os.WTERMSIG(status[gc]) if gc in status else None,
            "again": proc.reap([gc, os.getpid()]),
        }), flush=True)
    """)
    out = json.loads(s.line())
    assert out["ok"] and out["adopted"]
    assert out["killed"] == [out["gc"]]
    assert out["sig"] == signal.SIGTERM
    assert out["again"] == {}
    assert s.exit_code() == 0


def test_group_exists(spawn: Spawn) -> None:
    s = spawn("""
        print("ready", flush=True)
        import time; time.sleep(1000)
    """)
    assert s.line() == "ready"
    assert proc.group_exists(s.p.pid)
    assert not proc.group_exists(0) and not proc.group_exists(-1)
    proc.kill_tree(s.p.pid, grace=1)
    assert proc.group_exists(s.p.pid)  # an unreaped zombie is still a member
    s.close()
    assert not proc.group_exists(s.p.pid)


def test_nothing_to_kill_is_cheap() -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    p.wait()
    t0 = time.monotonic()
    assert proc.kill_tree(p.pid) == []
    assert time.monotonic() - t0 < 2  # no grace wait when nothing is alive


HEADLESS = """
import ctypes, threading, time
threading.Thread(target=time.sleep, args=(1000,)).start()
print("ready", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_process_whose_main_thread_exited_is_alive_and_is_killed() -> None:
    """Its leader shows ``Z`` while a thread runs on: alive, and killed with its tree."""
    p = subprocess.Popen([sys.executable, "-c", HEADLESS], stdout=subprocess.PIPE,
                         start_new_session=True)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 10
    while (info := proc.read_stat(p.pid)) is not None and info.state != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert info is not None and info.alive and proc.pid_alive(p.pid)
    assert p.pid in proc.kill_tree(p.pid, grace=0.1)
    assert p.wait(timeout=10) in (-signal.SIGTERM, -signal.SIGKILL)
    p.stdout.close()
