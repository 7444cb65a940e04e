"""coord/cgroup.py with real cgroups (skipped where this process may not create any)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_llmbench.coord import cgroup, proc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

#: A tree that hides: a setsid'd sleeper with no environment (and its child), plus a child.
HIDE = "setsid sh -c 'sleep 1000 & exec sleep 1000' & exec sleep 1000"


def _base(v2: bool) -> cgroup.Cgroup:
    v2_mount, v1_mount = cgroup._mounts()
    mount = v2_mount if v2 else v1_mount
    own = cgroup._own_path(v2) if mount is not None else None
    if mount is None or own is None or not os.access(mount / own.lstrip("/"), os.W_OK):
        pytest.skip(f"no writable cgroup {'v2' if v2 else 'v1 pids'} hierarchy here")
    parent = cgroup.Cgroup(mount / own.lstrip("/"), v2=v2)
    base = parent.child(f"llmbench-{os.getpid()}-{proc.process_start_time(os.getpid())}")
    assert base is not None
    return base


@pytest.mark.parametrize("v2", [True, False], ids=["v2", "v1-pids"])
def test_killing_a_cgroup_kills_everything_in_it(v2: bool) -> None:
    base = _base(v2)
    group = base.child("item")
    assert group is not None
    try:
        run = subprocess.Popen(["sh", "-c", HIDE], env={}, preexec_fn=group.enter)  # noqa: PLW1509 - the test's own child
        deadline = time.monotonic() + 10
        while len(group.pids()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        members = group.pids()
        assert run.pid in members
        assert group.kill() >= members and group.pids() == set()
        assert run.wait(timeout=10) == -signal.SIGKILL
        assert not [p for p in members if proc.pid_alive(p)]
    finally:
        assert base.remove()
    assert not base.path.exists()


def test_a_dead_creators_cgroups_are_swept(tmp_path: Path) -> None:
    base = _base(True)
    parent = cgroup.Cgroup(base.path.parent, v2=True)
    base.remove()
    gone = subprocess.run(["true"], check=True)  # a pid that no longer exists
    del gone
    stale = parent.child("llmbench-999999999-1")
    assert stale is not None and stale.child("h1") is not None
    cgroup.sweep_stale(parent)
    assert not stale.path.exists()


def test_switched_off_no_cgroup_is_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cgroup.ENV_SWITCH, "0")
    assert not cgroup.available() and cgroup.create_base() is None
