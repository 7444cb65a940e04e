"""The shared circuit breaker (coord/breaker.py): real files, real flocks, real processes."""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from pytest_llmbench.coord.breaker import BreakerPolicy, CircuitBreaker
from pytest_llmbench.errors import EndpointDown

URL = "http://127.0.0.1:9/v1"


def _fail(root: str, n: int) -> None:
    br = CircuitBreaker(Path(root), BreakerPolicy(threshold=6, cooldown=60))
    for _ in range(n):
        try:
            br.allow(URL)
        except EndpointDown:
            return
        br.record(URL, ok=False, error="connection refused")


def test_opens_after_threshold_consecutive_failures_and_refuses(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=3, cooldown=60))
    caplog.set_level(logging.WARNING, "pytest_llmbench.coord.breaker")
    for _ in range(2):
        assert br.allow(URL) is False
        br.record(URL, ok=False, error="HTTP 503")
    assert br.state(URL).state == "closed"
    br.allow(URL)
    br.record(URL, ok=False, error="HTTP 503")
    assert br.state(URL).state == "open"
    assert "[CircuitOpen]" in caplog.text and "3 consecutive failures" in caplog.text
    with pytest.raises(EndpointDown) as info:
        br.allow(URL)
    assert info.value.error_class == "endpoint_down" and URL in str(info.value)
    assert br.state(URL).refused == 1
    # another endpoint is not affected
    assert br.allow("http://127.0.0.1:10/v1") is False


def test_a_success_resets_the_count(tmp_path: Path) -> None:
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=3, cooldown=60))
    for ok in (False, False, True, False, False):
        br.allow(URL)
        br.record(URL, ok=ok)
    assert br.state(URL).state == "closed"


def test_after_the_cooldown_one_probe_decides(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pytest_llmbench.coord.breaker")
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=1, cooldown=0.2))
    br.allow(URL)
    br.record(URL, ok=False)
    with pytest.raises(EndpointDown):
        br.allow(URL)
    time.sleep(0.3)
    assert br.allow(URL) is True  # this caller probes
    with pytest.raises(EndpointDown):
        br.allow(URL)  # everyone else still refused while the probe runs
    br.record(URL, ok=False)  # the probe failed: open for another cool-down
    assert br.state(URL).state == "open"
    with pytest.raises(EndpointDown):
        br.allow(URL)
    time.sleep(0.3)
    assert br.allow(URL) is True
    br.record(URL, ok=True)
    assert br.state(URL).state == "closed"
    assert br.allow(URL) is False
    assert "[CircuitClosed]" in caplog.text


def test_a_probe_whose_holder_vanished_is_given_to_another_caller(tmp_path: Path) -> None:
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=1, cooldown=0.05, probe_timeout=0.2))
    br.allow(URL)
    br.record(URL, ok=False)
    time.sleep(0.1)
    assert br.allow(URL) is True  # and its holder is never heard of again
    with pytest.raises(EndpointDown):
        br.allow(URL)
    time.sleep(0.25)
    assert br.allow(URL) is True


def test_failures_from_several_processes_add_up(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_fail, args=(str(tmp_path), 3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=6, cooldown=60))
    st = br.state(URL)
    assert st.state == "open" and st.failures == 6 and st.opens == 1


def test_a_torn_state_file_starts_over(tmp_path: Path) -> None:
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=1, cooldown=60))
    br.allow(URL)
    br.record(URL, ok=False)
    (state_file,) = (tmp_path / "breakers").iterdir()
    state_file.write_bytes(b'{"state": "op')
    assert br.allow(URL) is False


def test_a_closed_breaker_grants_and_counts_success_without_its_lock(tmp_path: Path) -> None:
    """The usual state (closed, nothing counted) is read without the lock: every attempt
    of every item took it twice, a queue at 128 items in flight. Anything else still
    waits for it."""
    br = CircuitBreaker(tmp_path, BreakerPolicy(threshold=2, cooldown=60))
    assert br.allow(URL) is False  # the first use writes the state (under the lock)
    (state_file,) = (tmp_path / "breakers").iterdir()
    other = os.open(state_file, os.O_RDWR)  # another open file: its flock excludes ours
    fcntl.flock(other, fcntl.LOCK_EX)
    done: list[str] = []

    def calls() -> None:
        assert br.allow(URL) is False
        br.record(URL, ok=True)
        done.append("calm")
        br.record(URL, ok=False, error="refused")  # a failure counts: under the lock
        done.append("counted")

    thread = threading.Thread(target=calls, daemon=True)
    try:
        thread.start()
        thread.join(5)
        assert done == ["calm"]  # granted and recorded while the lock was held elsewhere
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    thread.join(5)
    assert done == ["calm", "counted"]
    assert br.state(URL).failures == 1
    assert br.allow(URL) is False  # one failure counted: not calm, the locked path grants


def test_fallbacks_resolve_to_declared_models() -> None:
    from pytest_llmbench.config import declared_models, parse_breaker

    declared = declared_models({"models": {
        "main": {"model": "m", "base_url": "http://a/v1", "fallbacks": ["backup"]},
        "backup": {"model": "m", "base_url": "http://b/v1"},
    }}, "pyproject.toml")
    assert [f.base_url for f in declared["main"].fallbacks] == ["http://b/v1"]
    assert parse_breaker({"breaker": {"threshold": 3, "cooldown": 2.5}}, "x") == (3, 2.5)


@pytest.mark.parametrize(("config", "message"), [
    ({"models": {"main": {"fallbacks": ["nope"]}}}, "models.main.fallbacks: ['nope'] not declared"),
    ({"models": {"main": {"fallbacks": "backup"}}}, "expected a list of declared model names"),
    ({"breaker": {"threshold": 0}}, "breaker.threshold: must be at least 1"),
    ({"breaker": {"cooldwn": 1}}, "breaker: unknown key(s) ['cooldwn']"),
])
def test_bad_breaker_config_names_the_key(config: dict[str, object], message: str) -> None:
    from pytest_llmbench.config import declared_models, parse_breaker
    from pytest_llmbench.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        declared_models(config, "pyproject.toml")
        parse_breaker(config, "pyproject.toml")
    assert message in str(info.value)
