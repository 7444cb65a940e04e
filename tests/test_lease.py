"""lease.py with real processes and real flocks: kill -9, over-time reclaim, two runs racing."""

from __future__ import annotations

import json
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_llmbench.coord import proc
from pytest_llmbench.coord.lease import LeaseManager, LeasePool, ReclaimEvent, find_reclaim
from pytest_llmbench.errors import LeaseTimeout

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

HOLDER = """
import subprocess, sys, time
from pytest_llmbench.coord.lease import LeasePool
root, name, slots, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
lease = LeasePool(root, name, slots, max_occupation=limit).acquire(timeout=10, label="holder")
child = subprocess.Popen(["sleep", "1000"])  # part of the holder's tree
print(lease.slot, child.pid, flush=True)
time.sleep(1000)
"""


def _env(token: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop(proc.TOKEN_ENV, None)
    if token:
        env[proc.TOKEN_ENV] = token
    return env


class Holder:
    """A process in its own session holding a lease of ``name`` (like an item child)."""

    def __init__(self, root: Path, name: str, slots: int = 1, limit: float = 900, token: str = ""):
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(root), name, str(slots), str(limit)],
            env=_env(token),
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.p.stdout is not None
        slot, child = self.p.stdout.readline().split()
        self.slot, self.child = int(slot), int(child)
        self.start_time = proc.process_start_time(self.p.pid)

    def close(self) -> None:
        proc.kill_tree(self.p.pid, grace=0.1)
        self.p.wait(timeout=10)
        assert self.p.stdout is not None
        self.p.stdout.close()


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[Callable[..., Holder]]:
    made: list[Holder] = []

    def make(name: str, **kw: object) -> Holder:
        made.append(Holder(tmp_path, name, **kw))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for h in made:
        h.close()
        if proc.pid_alive(h.child):  # orphaned by a kill -9 of the holder
            os.kill(h.child, signal.SIGKILL)


def _tagged(caplog: pytest.LogCaptureFixture, tag: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pytest_llmbench.coord.lease"
        and r.getMessage().startswith(tag)
        and r.levelno == logging.WARNING
    ]


@pytest.fixture(autouse=True)
def _warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pytest_llmbench.coord.lease")


def test_acquire_release_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool = LeasePool(tmp_path, "gpu", 2)
    a = pool.acquire()
    b = pool.acquire(label="b")
    assert {a.slot, b.slot} == {0, 1}
    side = json.loads(pool.sidecar_path(b.slot).read_text())
    assert side["pid"] == os.getpid() and side["label"] == "b"
    assert side["max_occupation"] == 900.0 and side["start_time"] == proc.process_start_time(
        os.getpid()
    )
    assert abs(side["acquired_at"] - time.time()) < 60 and b.acquired_at == side["acquired_at"]

    other = LeasePool(tmp_path, "gpu", 2)  # another handle on the same pool: same locks
    with pytest.raises(LeaseTimeout) as info:
        other.acquire(timeout=0.1)
    assert info.value.pool == "gpu"
    assert pickle.loads(pickle.dumps(info.value)).pool == "gpu"
    (msg,) = _tagged(caplog, "[ResourceTimeout]")
    assert msg.startswith("[ResourceTimeout] resource=gpu waited=")
    assert msg.count(f"{os.getpid()}:") == 2  # holders=[pid:held pid:held]

    a.release()
    a.release()  # idempotent
    assert a.released and not pool.sidecar_path(a.slot).exists()
    with other.acquire(timeout=0) as c:
        assert c.slot == a.slot and c.held_for() >= 0
        assert [s for s, _ in pool.holders()] == [0, 1]
    assert c.released
    b.release()
    assert pool.holders() == []
    assert _tagged(caplog, "[ForcedRelease]") == []  # clean releases are not reclaims


def test_waiting_acquirer_gets_slot_released_meanwhile(
    tmp_path: Path, holder: Callable[..., Holder]
) -> None:
    pool = LeasePool(tmp_path, "one", 1)
    h = holder("one")
    os.kill(h.p.pid, signal.SIGKILL)  # released by the kernel while we wait
    with pool.acquire(timeout=10) as lease:
        assert lease.slot == 0


def test_killed_holder_slot_reclaimed_at_next_acquire(
    tmp_path: Path, holder: Callable[..., Holder], caplog: pytest.LogCaptureFixture
) -> None:
    pool = LeasePool(tmp_path, "sbx", 1)
    h = holder("sbx")
    with pytest.raises(LeaseTimeout):
        pool.acquire(timeout=0.05)
    os.kill(h.p.pid, signal.SIGKILL)
    h.p.wait(timeout=5)
    assert proc.pid_alive(h.child)  # its `sleep` lives on but never inherited the lock fd
    lease = pool.acquire(timeout=5)
    (msg,) = _tagged(caplog, "[ForcedRelease]")
    assert msg.startswith(f"[ForcedRelease] resource=sbx slot=0 holder={h.p.pid} held=")
    assert "reason=dead" in msg
    assert pool.read_holder(0).pid == os.getpid()  # type: ignore[union-attr]
    lease.release()


def test_monitor_tick_cleans_dead_holder(tmp_path: Path, holder: Callable[..., Holder]) -> None:
    pool = LeasePool(tmp_path, "sbx", 2)
    h = holder("sbx", slots=2)
    assert pool.monitor_tick() == []  # alive and within its limit
    os.kill(h.p.pid, signal.SIGKILL)
    h.p.wait(timeout=5)
    (event,) = pool.monitor_tick()
    assert (event.reason, event.holder, event.slot, event.killed) == ("dead", h.p.pid, h.slot, ())
    assert not pool.sidecar_path(h.slot).exists()
    assert pool.monitor_tick() == []


def test_lock_lost_by_live_holder_is_reported_abandoned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = LeasePool(tmp_path, "lost", 1)
    lease = pool.acquire()
    os.close(lease._fd)  # type: ignore[arg-type]  # the kernel drops the flock with it
    lease._fd = None
    (event,) = pool.monitor_tick()
    assert (event.reason, event.holder) == ("abandoned", os.getpid())
    assert _tagged(caplog, "[ForcedRelease]")[0].endswith("reason=abandoned")


def test_over_time_holder_tree_killed_by_monitor(
    tmp_path: Path, holder: Callable[..., Holder], caplog: pytest.LogCaptureFixture
) -> None:
    token = secrets.token_hex(8)
    pool = LeasePool(tmp_path, "vm", 1)  # our own limit is irrelevant: the holder's counts
    h = holder("vm", limit=1.0, token=token)
    assert pool.monitor_tick() == [] and proc.pid_alive(h.p.pid)  # not over time yet
    acquired = pool.read_holder(0).acquired_at  # type: ignore[union-attr]
    time.sleep(max(0.0, acquired + 1.05 - time.time()))

    (event,) = pool.monitor_tick()
    assert (event.reason, event.holder, event.slot, event.limit) == ("over_time", h.p.pid, 0, 1.0)
    assert event.held > 1.0 and event.label == "holder" and event.token == token
    assert {h.p.pid, h.child} <= set(event.killed)
    assert h.p.wait(timeout=5) in (-signal.SIGTERM, -signal.SIGKILL)
    assert not proc.pid_alive(h.child)
    (timeout_msg,) = _tagged(caplog, "[ResourceTimeout]")
    assert timeout_msg.startswith(f"[ResourceTimeout] resource=vm slot=0 holder={h.p.pid} held=")
    assert "limit=1s" in timeout_msg
    (release_msg,) = _tagged(caplog, "[ForcedRelease]")
    assert release_msg.startswith(f"[ForcedRelease] resource=vm slot=0 holder={h.p.pid}")
    assert release_msg.endswith("reason=over_time")

    pool.acquire(timeout=0).release()  # the slot is free again
    assert find_reclaim(tmp_path, token=token) == event
    assert find_reclaim(tmp_path, pid=h.p.pid, start_time=h.start_time) is None  # keyed by token
    assert find_reclaim(tmp_path, token="nobody") is None


WATCHER = """
import os, signal, sys, time
from pytest_llmbench.coord.lease import LeasePool, find_reclaim
root, seen, token = sys.argv[1], sys.argv[2], sys.argv[3]

def on_term(*_):
    with open(seen, "w") as fh:
        fh.write("recorded" if find_reclaim(root, token=token) else "missing")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
lease = LeasePool(root, "vm", 1, max_occupation=0.5).acquire(timeout=10, label="watcher")
print(lease.slot, flush=True)
time.sleep(1000)
"""


def test_the_reclaim_is_recorded_before_the_holder_is_killed(tmp_path: Path) -> None:
    """The engine looks for the record as soon as its item dies: written after the kill, it
    was sometimes not there yet, and the item was reported ``crashed``, not ``lease_timeout``.
    The holder looks for it when the monitor's SIGTERM arrives."""
    token = secrets.token_hex(8)
    seen = tmp_path / "seen"
    run = subprocess.Popen([sys.executable, "-c", WATCHER, str(tmp_path), str(seen), token],
                           env=_env(token), stdout=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "0"
        pool = LeasePool(tmp_path, "vm", 1)
        acquired = pool.read_holder(0).acquired_at  # type: ignore[union-attr]
        time.sleep(max(0.0, acquired + 0.55 - time.time()))  # its own guard acts 1 s later
        (event,) = pool.monitor_tick()
        assert event.reason == "over_time" and event.holder == run.pid
        assert run.wait(timeout=10) == 0  # its SIGTERM handler ran
        assert seen.read_text() == "recorded"
        assert find_reclaim(tmp_path, token=token) == event  # rewritten with the killed pids
        assert run.pid in event.killed
    finally:
        proc.kill_tree(run.pid, grace=0.1)
        run.wait(timeout=10)
        assert run.stdout is not None
        run.stdout.close()


def test_waiting_acquirer_reclaims_over_time_holder(
    tmp_path: Path, holder: Callable[..., Holder], caplog: pytest.LogCaptureFixture
) -> None:
    pool = LeasePool(tmp_path, "vm", 1)
    h = holder("vm", limit=0.5)
    with pool.acquire(timeout=20):
        pass
    assert h.p.wait(timeout=5) < 0
    assert any(m.endswith("reason=over_time") for m in _tagged(caplog, "[ForcedRelease]"))
    reclaim = find_reclaim(tmp_path, pid=h.p.pid, start_time=h.start_time)
    assert reclaim is not None and reclaim.reason == "over_time"


def test_holder_in_monitoring_process_is_logged_not_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = LeasePool(tmp_path, "self", 1, max_occupation=0.05)
    with pool.acquire() as lease:
        time.sleep(0.1)
        assert pool.monitor_tick() == []
        assert pool.monitor_tick() == []
        (msg,) = _tagged(caplog, "[ResourceTimeout]")  # logged once, not every tick
        assert f"holder={os.getpid()}" in msg and "not killed" in msg
        assert not lease.released and pool.holders()[0][1].pid == os.getpid()  # type: ignore[union-attr]


def test_release_in_forked_copy_keeps_owner_lease(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import os, sys
        from pytest_llmbench.errors import LeaseTimeout
        from pytest_llmbench.coord.lease import LeasePool
        pool = LeasePool(sys.argv[1], "f", 1)
        lease = pool.acquire()
        pid = os.fork()
        if pid == 0:
            lease.release()  # the child's copy: must not unlock the parent's lease
            os._exit(0)
        os.waitpid(pid, 0)
        try:
            LeasePool(sys.argv[1], "f", 1).acquire(timeout=0)
            print("stolen")
        except LeaseTimeout:
            print("still held")
        lease.release()
        LeasePool(sys.argv[1], "f", 1).acquire(timeout=0).release()
        print("ok")
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.split() == ["still", "held", "ok"], out.stderr


HAMMER = """
import fcntl, os, random, sys, threading, time
from pytest_llmbench.coord.lease import LeasePool
root, slots, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pool = LeasePool(root, "shared", slots)
counter, logf = os.path.join(root, "counter"), os.path.join(root, "log")
go = os.path.join(root, "go")
open(os.path.join(root, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(go):
    time.sleep(0.001)

def bump(delta, what, slot):
    # The counter and the log are updated together under their own flock, so the log is a
    # total order of acquire/release events with the number held after each.
    fd = os.open(counter, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        n = int(os.pread(fd, 32, 0) or b"0") + delta
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(n).encode(), 0)
        with open(logf, "a") as f:
            f.write(f"{what} {time.time():.6f} {os.getpid()} {threading.get_ident()} {slot} {n}\\n")
    finally:
        os.close(fd)

def halfway():
    # Every thread of both runs meets here, holding no lease: each run's first lease is then
    # taken before the other's last one, however the machine schedules the two processes.
    open(os.path.join(root, f"half-{os.getpid()}-{threading.get_ident()}"), "w").close()
    give_up = time.monotonic() + 60
    while len([n for n in os.listdir(root) if n.startswith("half-")]) < 2 * threads:
        if time.monotonic() > give_up:
            sys.exit("the other run never got halfway")
        time.sleep(0.001)

def work():
    for i in range(rounds):
        if i == rounds // 2:
            halfway()
        with pool.acquire(timeout=60) as lease:
            bump(+1, "acquire", lease.slot)
            time.sleep(random.uniform(0.002, 0.008))  # the time spent under the lease
            bump(-1, "release", lease.slot)

ts = [threading.Thread(target=work) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
"""


@pytest.mark.parametrize("slots", [2, 3])
def test_two_concurrent_runs_never_exceed_pool(tmp_path: Path, slots: int) -> None:
    """Two independent runs, 3 threads each, share a pool: never more than ``slots`` held.

    The pool of 3 is the control: the same counter reaches 3 there, so it would see a
    pool of 2 over-granting.
    """
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, str(tmp_path), str(slots), "3", "20"], env=_env()
        )
        for _ in range(2)
    ]
    give_up = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < give_up:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both are past their start-up
    assert [r.wait(timeout=120) for r in runs] == [0, 0]

    lines = [ln.split() for ln in (tmp_path / "log").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 3 * 20
    held, slot_owner, peak = 0, {}, 0
    for what, _t, pid, tid, slot, n in lines:
        held += 1 if what == "acquire" else -1
        assert int(n) == held  # the counter and the replay agree
        peak = max(peak, held)
        if what == "acquire":
            assert slot not in slot_owner, f"slot {slot} granted twice"
            slot_owner[slot] = (pid, tid)
        else:
            assert slot_owner.pop(slot) == (pid, tid)
    assert peak == slots  # never more, and the pool was fully used
    assert held == 0 and (tmp_path / "counter").read_text() == "0"
    pids = {pid for _, _, pid, *_ in lines}
    assert pids == {str(r.pid) for r in runs}  # both runs got leases
    first_end = min(max(float(t) for _, t, p, *_ in lines if p == pid) for pid in pids)
    last_start = max(min(float(t) for _, t, p, *_ in lines if p == pid) for pid in pids)
    assert last_start < first_end  # the runs really overlapped (they met halfway)


def test_manager(tmp_path: Path) -> None:
    manager = LeaseManager(tmp_path, {"sandbox": 2, "gpu": 1}, max_occupation=30)
    assert manager.names == ["gpu", "sandbox"]
    assert manager.pool("sandbox").slots == 2 and manager.pool("gpu").max_occupation == 30
    with pytest.raises(KeyError, match=r"unknown resource pool 'tpu' \(known: gpu, sandbox\)"):
        manager.pool("tpu")
    with pytest.raises(KeyError, match="tpu"):
        manager.acquire("tpu")
    with manager.acquire("gpu", timeout=0, label="x") as lease:
        assert lease.pool.name == "gpu" and lease.label == "x"
        with pytest.raises(LeaseTimeout):
            manager.acquire("gpu", timeout=0)
    assert manager.monitor_tick() == []
    assert LeaseManager(tmp_path, {}).names == []


@pytest.mark.parametrize(
    ("name", "slots", "limit"), [("a/b", 1, 1.0), ("", 1, 1.0), ("ok", 0, 1.0), ("ok", 1, 0.0)]
)
def test_pool_validation(tmp_path: Path, name: str, slots: int, limit: float) -> None:
    with pytest.raises(ValueError):
        LeasePool(tmp_path, name, slots, max_occupation=limit)


def test_reclaim_event_round_trip() -> None:
    event = ReclaimEvent(
        resource="vm", slot=1, holder=42, held=3.5, reason="over_time", limit=1.0, killed=(42, 43)
    )
    assert ReclaimEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event


LEASE_TESTS = """
import fcntl, os, random, time
import pytest

def bump(root, delta, what, slot):
    fd = os.open(os.path.join(root, "counter"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        n = int(os.pread(fd, 32, 0) or b"0") + delta
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(n).encode(), 0)
        with open(os.path.join(root, "log"), "a") as f:
            f.write(f"{what} {time.time():.6f} {os.getpid()} {slot} {n}\\n")
    finally:
        os.close(fd)

@pytest.mark.parametrize("i", range(10))
def test_under_lease(llm_lease, i):
    root = os.path.dirname(__file__)
    with llm_lease("shared", timeout=60) as lease:
        bump(root, +1, "acquire", lease.slot)
        time.sleep(random.uniform(0.02, 0.06))
        bump(root, -1, "release", lease.slot)
"""


def test_two_concurrent_pytest_runs_share_a_pool_of_two(tmp_path: Path) -> None:
    """Two pytest runs, each ``-n 2``, on one store: 4 workers contend for ``shared = 2``;
    every acquisition is recorded, and at no moment are 3 leases held."""
    (tmp_path / "test_leases.py").write_text(LEASE_TESTS)
    (tmp_path / "pyproject.toml").write_text("[tool.llmbench.resources]\nshared = 2\n")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "2",
           "test_leases.py", f"--rootdir={tmp_path}"]
    runs = [subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=120)[0] for r in runs]
    for run, out in zip(runs, outs, strict=True):
        assert run.returncode == 0 and "10 passed" in out, out[-2000:]
    lines = [ln.split() for ln in (tmp_path / "log").read_text().splitlines()]
    assert len(lines) == 2 * 2 * 10
    held, peak, owner = 0, 0, {}
    for what, _t, pid, slot, n in lines:
        held += 1 if what == "acquire" else -1
        assert int(n) == held
        peak = max(peak, held)
        if what == "acquire":
            assert slot not in owner, f"slot {slot} granted twice"
            owner[slot] = pid
        else:
            assert owner.pop(slot) == pid
    assert peak == 2, "the pool was never fully used, or over-granted"
    assert len({pid for _, _, pid, *_ in lines}) >= 3  # workers of both runs took leases
