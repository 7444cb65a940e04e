"""ratelimit.py with real processes, real flocks and real HTTP to the simulator.

Windows are shrunk (``SharedLimiter(window=...)``) so that minute-long behaviour fits in
seconds; every bound asserted is the exact one the module documents, computed from its
formulas, not a timing guess.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.coord.ratelimit import (
    BURST_FRACTION,
    INCREASE,
    JITTER_FRACTION,
    RateLimitWait,
    SharedLimiter,
    endpoint_key,
)
from pytest_llmbench.errors import LLMBenchError
from pytest_llmbench.records import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
LOGGER = "pytest_llmbench.coord.ratelimit"

# One script, several roles; it prints one JSON line. Times are time.monotonic(), which is
# one clock for every process of the machine.
WORKER = r"""
import fcntl, http.client, json, os, sys, threading, time
from pathlib import Path
from urllib.parse import urlsplit
from pytest_llmbench.records import ModelSpec
from pytest_llmbench.coord.ratelimit import RateLimitWait, SharedLimiter

cfg = json.loads(sys.argv[1])
lim = SharedLimiter(Path(cfg["root"]), window=cfg["window"])
model = ModelSpec(**cfg["model"])
role, end = cfg["role"], cfg.get("end", 0.0)
if cfg.get("start"):
    time.sleep(max(0.0, cfg["start"] - time.monotonic()))

def counter(delta):
    # In-flight count under a separate lock, updated while the slot is held.
    with open(cfg["counter"], "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        cur, top = (int(x) for x in (fh.read().split() or ["0", "0"]))
        cur += delta
        top = max(top, cur)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{cur} {top}")

out = {}
if role == "grants":
    grants = []
    while True:
        try:
            lim.before_request(model, 0, deadline=end)
        except RateLimitWait:
            break
        grants.append(lim.grant_time())
        lim.on_response(model, 200, None, 0)
    out["grants"] = grants
elif role == "count":
    for _ in range(cfg["n"]):
        lim.before_request(model, 0)
        lim.on_response(model, 200, None, 0)
elif role == "inflight":
    n = 0
    while True:
        try:
            lim.before_request(model, 0, deadline=end)
        except RateLimitWait:
            break
        counter(+1)
        time.sleep(cfg["hold"])
        counter(-1)
        lim.on_response(model, 200, None, 0)
        n += 1
    out["n"] = n
elif role == "throttle":
    lim.before_request(model, 0)
    out["before"] = time.monotonic()
    lim.on_response(model, 429, cfg["retry_after"], 0)
    out["after"] = time.monotonic()
elif role == "hold":
    lim.before_request(model, 0)
    print(json.dumps({"held": True}), flush=True)
    time.sleep(1000)
elif role == "http":
    url = urlsplit(model.base_url)
    statuses = []
    body = json.dumps({"model": model.model, "max_tokens": 16,
                       "messages": [{"role": "user", "content": "What is 2 + 2?"}]})
    def client():
        while True:
            try:
                lim.before_request(model, 40, deadline=end)
            except RateLimitWait:
                return
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            try:
                conn.request("POST", url.path + "/chat/completions", body,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError:
                lim.on_response(model, 0, None, 0)
                statuses.append(0)
                continue
            finally:
                conn.close()
            ra = resp.getheader("Retry-After")
            tokens = 0
            if resp.status == 200:
                tokens = json.loads(data)["usage"]["total_tokens"]
            lim.on_response(model, resp.status, float(ra) if ra else None, tokens)
            statuses.append(resp.status)
    threads = [threading.Thread(target=client) for _ in range(cfg["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["statuses"] = statuses
print(json.dumps(out), flush=True)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def _spawn(cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _results(procs: list[subprocess.Popen[str]], timeout: float = 60) -> list[dict[str, Any]]:
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _model(name: str = "m", **limits: Any) -> ModelSpec:
    return ModelSpec(name=name, model=f"{name}-model", base_url="http://127.0.0.1:9/v1",
                     **limits)


def _cfg(root: Path, model: ModelSpec, role: str, window: float, **extra: Any) -> dict[str, Any]:
    limits = {k: getattr(model, k) for k in ("rpm", "tpm", "max_connections")}
    return {"root": str(root), "window": window, "role": role,
            "model": {"name": model.name, "model": model.model, "base_url": model.base_url,
                      **limits}, **extra}


def _max_in_window(times: list[float], length: float) -> int:
    """Largest number of ``times`` in any closed interval of ``length``."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - length:
            j += 1
        best = max(best, i - j + 1)
    return best


# --- the request bound ------------------------------------------------------------------------


def test_grants_from_three_processes_never_exceed_the_quota_in_any_window(tmp_path: Path) -> None:
    window, quota = 3.0, 60  # "60 rpm" per 3 s: 20 requests/s, 1/20 of the real scale
    model = _model(rpm=quota)
    start = time.monotonic() + 2.5  # interpreters start meanwhile (slowly on a loaded machine)
    cfg = _cfg(tmp_path, model, "grants", window, start=start, end=start + 3.3)
    results = _results([_spawn(cfg) for _ in range(3)])
    grants = [g for r in results for g in r["grants"]]

    # The documented parameters: burst C, interval T, tolerance tau, jitter allowance J.
    jitter = window * JITTER_FRACTION
    burst = max(1, math.floor(quota * window * BURST_FRACTION / window))
    interval = (window + jitter) / (quota + 1 - burst - 1e-6)
    tau = (burst - 1) * interval
    assert burst == 2
    # Exact: no interval of W + J seconds holds more than the quota, so no W-second window
    # at the server does either, even if requests arrive up to J late.
    assert _max_in_window(grants, window + jitter - 1e-9) <= quota
    # Short windows: at most the burst on top of the rate (GCRA's bound).
    assert _max_in_window(grants, 1.0) <= math.floor((1.0 + tau) / interval) + 1
    # And the quota is used: >= 90 % of it over the first window.
    assert sum(start <= g < start + window for g in grants) >= 0.9 * quota
    # All three processes were served (arrival order, not one process hogging).
    assert all(r["grants"] for r in results)
    # Two grants may share an instant (a process that read the clock before taking the lock
    # gets the grant the one before it got), never more than the burst.
    assert max(collections.Counter(grants).values()) <= burst


def test_concurrent_updates_from_many_processes_are_never_lost(tmp_path: Path) -> None:
    """Every grant is counted in the shared state: the read-modify-write is atomic."""
    # A rate nobody reaches (an unlimited model takes no lock at all: below): nobody
    # sleeps, the processes hammer the lock.
    model = _model(rpm=10**12)
    start = time.monotonic() + 1.0
    cfg = _cfg(tmp_path, model, "count", 1e6, start=start, n=400)
    _results([_spawn(cfg) for _ in range(4)])
    # A window of 1e6 s makes the decay over the test negligible (< 1e-4).
    assert SharedLimiter(tmp_path, window=1e6).state(model).recent_grants == pytest.approx(
        1600, rel=1e-4)


def test_an_unlimited_model_reads_the_shared_state_without_writing_it(tmp_path: Path) -> None:
    """No rpm, tpm or connection cap: each request only checks for a shared Retry-After,
    a read without the lock; the state file is written by the first request alone."""
    model = _model()
    lim = SharedLimiter(tmp_path, window=60)
    lim.before_request(model, 0)
    lim.on_response(model, 200, None, 0)
    (state,) = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size >= 1024]
    before = (state.stat().st_mtime_ns, state.read_bytes())
    for _ in range(20):
        lim.before_request(model, 0)
        lim.on_response(model, 200, None, 0)
    assert (state.stat().st_mtime_ns, state.read_bytes()) == before


# --- Retry-After, shared ----------------------------------------------------------------------


def test_retry_after_reported_by_one_process_blocks_every_other(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    model, other = _model("blocked", rpm=6000), _model("other", rpm=6000)
    [res] = _results([_spawn(_cfg(tmp_path, model, "throttle", 60.0, retry_after=1.0))])
    lim = SharedLimiter(tmp_path)
    state = lim.state(model)
    assert res["before"] + 1.0 <= state.blocked_until <= res["after"] + 1.0
    assert state.blocked_by not in (None, os.getpid())

    # A caller whose deadline comes before the end of the block fails at once, holding nothing.
    t0 = time.monotonic()
    with pytest.raises(RateLimitWait) as info:
        lim.before_request(model, 0, deadline=t0 + 0.2)
    assert info.value.reason == "retry-after" and info.value.wait > 0.2
    assert lim.grant_time() is None
    # Another endpoint is not held back by it.
    lim.before_request(other, 0, deadline=time.monotonic() + 0.2)
    lim.on_response(other, 200, None, 0)

    lim.before_request(model, 0)
    returned = time.monotonic()
    assert res["before"] + 1.0 <= returned < res["after"] + 5.0
    lim.on_response(model, 200, None, 0)
    assert any("model=blocked waiting" in r.getMessage()
               and "(Retry-After from another process)" in r.getMessage()
               for r in caplog.records)


def test_a_request_already_reserved_rechecks_a_block_set_while_it_slept(tmp_path: Path) -> None:
    # rpm 60 per minute: burst 2, then one grant per ~1.03 s.
    model = _model(rpm=60)
    sleeper, reporter = SharedLimiter(tmp_path), SharedLimiter(tmp_path)
    reporter.before_request(model, 0)  # in flight until its 429 below
    sleeper.before_request(model, 0)  # the burst is used up
    sleeper.on_response(model, 200, None, 0)
    returned: list[float] = []

    def third() -> None:
        sleeper.before_request(model, 0)  # reserved ~1 s ahead, sleeps outside the lock
        returned.append(time.monotonic())
        sleeper.on_response(model, 200, None, 0)

    thread = threading.Thread(target=third)
    thread.start()
    time.sleep(0.2)
    reported = time.monotonic()
    reporter.on_response(model, 429, 2.0, 0)
    thread.join(30)
    assert returned and returned[0] >= reported + 2.0


# --- AIMD --------------------------------------------------------------------------------------


def test_429_halves_the_shared_rate_once_per_burst_floors_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    window, quota = 0.1, 30  # 300 requests/s keeps the recovery loop short
    model = _model(rpm=quota)
    a, b = SharedLimiter(tmp_path, window=window), SharedLimiter(tmp_path, window=window)
    assert a.state(model).rpm == quota and a.state(model).scale == 1.0

    a.before_request(model, 0)
    b.before_request(model, 0)  # both reserved before the cut: one burst
    a.on_response(model, 429, 0.0, 0)
    assert b.state(model).rpm == pytest.approx(quota / 2)
    b.on_response(model, 429, 0.0, 0)
    assert a.state(model).rpm == pytest.approx(quota / 2)  # not cut twice
    assert any("model=m 429: rate 30 -> 15 rpm" in r.getMessage() for r in caplog.records)

    # A request reserved after the cut cuts again; the floor is 1 per 10 s (per window) or 5 %.
    floor = max(0.05, window / 10 / quota)
    for expected in (quota / 4, quota / 8, quota / 16, quota * floor, quota * floor):
        a.before_request(model, 0)
        a.on_response(model, 429, 0.0, 0)
        assert a.state(model).rpm == pytest.approx(max(expected, quota * floor))

    # Additive increase: 2/3 request per window per success, shared, up to the configured rate.
    rate = a.state(model).rpm
    assert rate is not None
    successes = 0
    while rate < quota:
        limiter = (a, b)[successes % 2]
        limiter.before_request(model, 0, deadline=time.monotonic() + 5)
        limiter.on_response(model, 200, None, 0)
        successes += 1
        new = a.state(model).rpm
        assert new is not None and new == pytest.approx(min(quota, rate + INCREASE))
        rate = new
    assert successes == math.ceil((quota - quota * floor) / INCREASE - 1e-9)
    assert any("model=m recovered to 30 rpm" in r.getMessage() for r in caplog.records)


def test_without_a_configured_rpm_a_429_only_blocks_for_its_retry_after(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    model = _model()  # no limits at all
    lim = SharedLimiter(tmp_path, window=1.0)
    for _ in range(20):
        lim.before_request(model, 0)
        lim.on_response(model, 200, None, 0)
    lim.before_request(model, 0)
    lim.on_response(model, 429, 0.3, 0)
    state = lim.state(model)
    # no rate is guessed: it stays unlimited, at full scale
    assert state.rpm is None and state.learned_rpm is None and state.scale == 1.0
    assert not any("429: rate" in r.getMessage() for r in caplog.records)
    # but everyone waits out the Retry-After
    with pytest.raises(RateLimitWait) as info:
        lim.before_request(model, 0, deadline=time.monotonic() + 0.05)
    assert info.value.reason == "retry-after"
    start = time.monotonic()
    lim.before_request(model, 0, deadline=time.monotonic() + 5)
    assert time.monotonic() - start >= 0.15
    lim.on_response(model, 200, None, 0)


# --- tokens per minute ---------------------------------------------------------------------------


def test_tokens_are_charged_by_estimate_then_corrected_by_usage(tmp_path: Path) -> None:
    window, tpm = 3.0, 300  # per token: 3.05 / (300 * 29/30) s; burst 10 tokens
    model = _model(tpm=tpm)
    lim = SharedLimiter(tmp_path, window=window)
    per_token = (window + window * JITTER_FRACTION) / (tpm * (1 - BURST_FRACTION))
    lim.before_request(model, 100)  # a request bigger than the burst still goes (overdraft)
    lim.on_response(model, 200, None, 100)
    with pytest.raises(RateLimitWait) as info:  # the next one waits ~(100 - 10) tokens
        lim.before_request(model, 100, deadline=time.monotonic() + 0.5)
    assert info.value.reason == "token"
    assert info.value.wait == pytest.approx(90 * per_token, abs=0.05)

    other = _model("refund", tpm=tpm)
    lim.before_request(other, 100)
    lim.on_response(other, 200, None, 10)  # used 10 of the 100 estimated: 90 refunded
    lim.before_request(other, 100, deadline=time.monotonic() + 0.5)
    lim.on_response(other, 200, None, 10)


# --- connections ---------------------------------------------------------------------------------


def test_max_connections_holds_across_processes(tmp_path: Path) -> None:
    model = _model(max_connections=2)
    counter = tmp_path / "inflight"
    start = time.monotonic() + 1.0
    cfg = _cfg(tmp_path, model, "inflight", 60.0, start=start, end=start + 1.5, hold=0.02,
               counter=str(counter))
    results = _results([_spawn(cfg) for _ in range(3)])
    current, top = (int(x) for x in counter.read_text().split())
    assert current == 0
    assert top == 2  # the limit was reached, never passed
    assert all(r["n"] > 0 for r in results)
    # Serialised to 2 at a time: at most 2 * 1.5 s / 20 ms requests in all.
    assert sum(r["n"] for r in results) <= 2 * 1.5 / 0.02 + 3


def test_a_killed_holder_frees_its_slot_and_slot_releases_on_exceptions(tmp_path: Path) -> None:
    model = _model(max_connections=1)
    holder = _spawn(_cfg(tmp_path, model, "hold", 60.0))
    try:
        assert holder.stdout is not None
        assert json.loads(holder.stdout.readline()) == {"held": True}
        lim = SharedLimiter(tmp_path)
        with pytest.raises(RateLimitWait) as info:
            lim.before_request(model, 0, deadline=time.monotonic() + 0.2)
        assert info.value.reason == "connection"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.communicate()
    lim.before_request(model, 0, deadline=time.monotonic() + 5)
    lim.on_response(model, 0, None, 0)  # no response (timeout): still releases

    with pytest.raises(ZeroDivisionError), lim.slot(model, deadline=time.monotonic() + 5):
        _ = 1 / 0
    other = SharedLimiter(tmp_path)  # own descriptors: as exclusive as another process
    with other.slot(model, deadline=time.monotonic() + 0.2):
        with pytest.raises(RateLimitWait):
            lim.before_request(model, 0, deadline=time.monotonic() + 0.1)
        assert lim.grant_time() is None


def test_a_forked_child_does_not_share_its_parents_locks(tmp_path: Path) -> None:
    """flock belongs to the open file description: a child must open its own."""
    model = _model(max_connections=1)
    lim = SharedLimiter(tmp_path)
    lim.before_request(model, 0)  # the parent holds the only slot
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            lim.before_request(model, 0, deadline=time.monotonic() + 0.2)
        except RateLimitWait:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    lim.on_response(model, 200, None, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- odds and ends ------------------------------------------------------------------------------


def test_rate_limit_wait_pickles_and_is_an_llmbench_error() -> None:
    err = pickle.loads(pickle.dumps(RateLimitWait("gpt", 1.5, "token")))
    assert isinstance(err, RateLimitWait) and isinstance(err, LLMBenchError)
    assert (err.model, err.wait, err.reason) == ("gpt", 1.5, "token")
    assert "1.50 s" in str(err)


def test_a_corrupt_state_file_is_logged_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = _model(rpm=600)
    path = tmp_path / "limits" / f"{endpoint_key(model)}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"v": 1, "tat": ')
    lim = SharedLimiter(tmp_path)
    lim.before_request(model, 0)
    lim.on_response(model, 200, None, 0)
    assert "unreadable limit state" in caplog.text
    assert json.loads(path.read_text())["v"] == 1
    assert endpoint_key(model) != endpoint_key(_model("x", rpm=600))
    assert len(endpoint_key(model)) == 16


# --- against the simulator ----------------------------------------------------------------------


@pytest.mark.slow
def test_four_processes_stay_under_the_simulators_quota(tmp_path: Path) -> None:
    from pytest_llmbench.sim.control import SimServer

    quota, seconds = 120, 10.0
    server = SimServer.start(rpm=quota, request_log=tmp_path / "requests.jsonl")
    try:
        model = ModelSpec(name="sim", model="sim-model", base_url=server.base_url, rpm=quota)
        start = time.monotonic() + 1.0
        cfg = _cfg(tmp_path / "state", model, "http", 60.0, start=start,
                   end=start + seconds, threads=3)
        results = _results([_spawn(cfg) for _ in range(4)])
        log = server.requests()
    finally:
        server.stop()
    statuses = [s for r in results for s in r["statuses"]]
    faults = [e["fault"] for e in log]
    assert len(log) == len(statuses)
    assert statuses.count(429) == 0 and "rate_limit" not in faults
    # >= 90 % of the quota's share of the run (20 requests in 10 s at 120 rpm).
    assert statuses.count(200) >= 0.9 * quota * seconds / 60
