"""Tests of pytest_llmbench.providers.api: the policy pieces directly, the call over real HTTP.

The HTTP tests talk to the project's simulator on 127.0.0.1 (fault directives in the last
user message), or, for what the simulator cannot do (dribbling bytes, TLS, proxies), to
small real servers defined here.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import logging
import random
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from pytest_llmbench.engine.runner import Job, execute
from pytest_llmbench.errors import APIError, APITimeoutError, LLMBenchError
from pytest_llmbench.providers import api as api_module
from pytest_llmbench.providers.api import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    backoff_delay,
    chat,
    parse_retry_after,
)
from pytest_llmbench.providers.base import ChatRequest
from pytest_llmbench.providers.openai_compat import OpenAIProvider, parse_endpoint, proxy_for
from pytest_llmbench.records import (
    Attempt,
    Case,
    Completion,
    Deadlines,
    ItemResult,
    Message,
    ModelSpec,
    ScorerSpec,
)
from pytest_llmbench.sim.control import SimServer

KEY = "sk-test-SECRET-0123456789"
USER = [{"role": "user", "content": "What is 2 + 3?"}]


def spec(base_url: str, *, name: str = "m1", model: str = "sim-1", **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, model=model, base_url=base_url, **kw)


# --- policy pieces (no network) ---------------------------------------------------------


def test_backoff_is_full_jitter_with_doubling_ceiling_and_cap() -> None:
    ceilings = [min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1)) for n in range(1, 8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    expected_rng = random.Random(7)
    rng = random.Random(7)
    for n, ceiling in enumerate(ceilings, start=1):
        assert backoff_delay(n, rng) == expected_rng.uniform(0.0, ceiling)
    draws = [backoff_delay(3, random.Random(s)) for s in range(200)]
    assert all(0.0 <= d <= 2.0 for d in draws)
    assert max(draws) > 1.5 and min(draws) < 0.5  # jitter spreads over the whole range


def test_retry_after_seconds_ms_precedence_and_garbage() -> None:
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    assert parse_retry_after({"Retry-After": "5", "retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"Retry-After": "5", "Retry-After-Ms": "junk"}) == 5.0
    assert parse_retry_after({"Retry-After": "3600"}) == 3600.0  # chat() judges it
    assert parse_retry_after({"Retry-After": "-3"}) == 0.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({"Retry-After": "nan"}) is None
    assert parse_retry_after({}) is None


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    ahead = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": ahead}, now=now) == pytest.approx(30.0)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"Retry-After": past}, now=now) == 0.0
    far = email.utils.formatdate(now + 7200, usegmt=True)
    assert parse_retry_after({"Retry-After": far}, now=now) == pytest.approx(7200.0)


def test_retry_after_reads_http_message_case_insensitively() -> None:
    msg = http.client.HTTPMessage()
    msg["RETRY-AFTER-MS"] = "1500"
    assert parse_retry_after(msg) == 1.5


def test_endpoint_keeps_query_and_hides_credentials() -> None:
    ep = parse_endpoint("https://user:pw@res.openai.azure.com/openai/deployments/d1/"
                        "?api-version=2024-06-01")
    assert ep.azure and ep.scheme == "https" and ep.port == 443
    assert ep.query == (("api-version", "2024-06-01"),)
    assert ep.base == "https://user:pw@res.openai.azure.com/openai/deployments/d1"
    assert ep.display == "https://res.openai.azure.com/openai/deployments/d1"
    plain = parse_endpoint("http://127.0.0.1:8000/v1/")
    assert (plain.host, plain.port, plain.base, plain.azure) == (
        "127.0.0.1", 8000, "http://127.0.0.1:8000/v1", False)
    assert not parse_endpoint("https://openai.azure.com.evil.example/v1").azure
    for bad in ("sim", "ftp://x/v1", "http://host:99999/v1", "http:///v1"):
        with pytest.raises(APIError) as info:
            parse_endpoint(bad)
        assert info.value.error_class == "bad_request"


def test_body_params_override_model_defaults_and_none_drops() -> None:
    model = spec("http://127.0.0.1:1/v1", params={"temperature": 0.7, "max_tokens": 50,
                                                  "top_p": 0.9}, stream=True)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    body = OpenAIProvider().build_body(ChatRequest(
        model=model, messages=USER, params={"temperature": 0.0, "top_p": None}, tools=tools,
        tool_choice="auto"))
    assert body == {"model": "sim-1", "messages": USER, "temperature": 0.0, "max_tokens": 50,
                    "stream": True, "stream_options": {"include_usage": True},
                    "tools": tools, "tool_choice": "auto"}
    own = OpenAIProvider().build_body(ChatRequest(
        model=model, messages=USER, params={"stream_options": {"include_usage": False}}))
    assert own["stream_options"] == {"include_usage": False}  # the suite's choice wins
    plain = OpenAIProvider().build_body(ChatRequest(model=spec("http://h/v1"), messages=USER))
    assert plain == {"model": "sim-1", "messages": USER, "stream": False}


def test_proxy_selection_and_no_proxy() -> None:
    env = {"https_proxy": "http://u%40x:p%3Aw@proxy.corp:3128", "HTTP_PROXY": "proxy.corp:8080",
           "no_proxy": "internal.corp, .lan,api.example:8443,10.0.0.0/8"}
    assert proxy_for(parse_endpoint("https://api.openai.com/v1"), env) == (
        "http://u%40x:p%3Aw@proxy.corp:3128")
    assert proxy_for(parse_endpoint("http://models.example/v1"), env) == (
        "http://proxy.corp:8080")
    for direct in ("https://internal.corp/v1", "https://a.b.internal.corp/v1",
                   "http://box.lan/v1", "https://api.example:8443/v1",
                   "http://10.1.2.3:8000/v1",  # CIDR
                   "http://127.0.0.1:8000/v1", "http://localhost:8000/v1"):
        assert proxy_for(parse_endpoint(direct), env) is None, direct
    assert proxy_for(parse_endpoint("http://11.1.2.3/v1"), env) is not None  # outside the range
    assert proxy_for(parse_endpoint("https://api.example/v1"), env) is not None  # other port
    assert proxy_for(parse_endpoint("https://x.example/v1"), {**env, "NO_PROXY": "*",
                                                               "no_proxy": "*"}) is None
    assert proxy_for(parse_endpoint("https://x.example/v1"),
                     {"https_proxy": "socks5://p:1080"}) == "socks5://p:1080"


def test_no_attempt_once_task_deadline_has_passed() -> None:
    attempts: list[Attempt] = []
    with pytest.raises(APITimeoutError, match="task deadline of 5 s reached before attempt 1") \
            as info:
        chat(spec("http://127.0.0.1:9/v1"), USER, deadlines=Deadlines(task_timeout=5),
             task_deadline=time.monotonic() + 0.01, on_attempt=attempts.append, env={})
    assert attempts == []
    assert info.value.error_class == "task_timeout"


class NoTimeLimiter:
    """A rate limiter whose next grant would come after the task deadline."""

    def before_request(self, model: ModelSpec, est_tokens: int, *,
                       deadline: float | None = None) -> None:
        raise LLMBenchError("the next request grant is 9.00 s away, past the deadline")

    def on_response(self, model: ModelSpec, status: int, retry_after: float | None,
                    tokens: int) -> None:
        raise AssertionError("no attempt was made")


def test_rate_limit_grant_past_the_task_deadline_is_rate_limited() -> None:
    with pytest.raises(APIError) as info:
        chat(spec("http://127.0.0.1:9/v1"), USER, deadlines=Deadlines(task_timeout=5),
             task_deadline=time.monotonic() + 5, limiter=NoTimeLimiter(), env={})
    assert info.value.error_class == "rate_limited"
    assert "no grant for attempt 1 before the task deadline of 5 s" in str(info.value)
    assert "9.00 s away" in str(info.value)


def test_connection_refused_names_url_and_hint() -> None:
    with socket.socket() as probe:  # a port with (almost surely) nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    attempts: list[Attempt] = []
    waits: list[float] = []
    with pytest.raises(APIError) as info:
        chat(spec(f"http://127.0.0.1:{port}/v1"), USER, deadlines=Deadlines(api_retries=2),
             api_key=KEY, on_attempt=attempts.append, rng=random.Random(1), sleep=waits.append,
             env={})
    err = info.value
    assert err.error_class == "connection_error"
    assert f"http://127.0.0.1:{port}/v1" in str(err) and "3 attempts failed" in str(err)
    assert "--llmbench-model" in str(err) and KEY not in str(err)
    assert [a.outcome for a in attempts] == ["connection_error"] * 3
    rng = random.Random(1)
    assert waits == [rng.uniform(0, 0.5), rng.uniform(0, 1.0)]
    assert [a.wait for a in attempts] == [*waits, 0.0]


# --- over real HTTP to the simulator ----------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    log_path = tmp_path_factory.mktemp("sim") / "requests.jsonl"
    server = SimServer.start(require_key=KEY, request_log=log_path)
    yield server
    server.stop()


@pytest.fixture
def conv(request: pytest.FixtureRequest) -> Callable[[str], list[Message]]:
    """Messages unique to the test (the simulator counts ``times=N`` per conversation)."""

    def make(user: str) -> list[Message]:
        return [{"role": "system", "content": f"You are a calculator ({request.node.name})."},
                {"role": "user", "content": user}]

    return make


class Calls:
    """Runs ``chat`` against a server and keeps what it saw: attempts, sleeps, requests."""

    def __init__(self, server: SimServer) -> None:
        self.server = server
        self.attempts: list[Attempt] = []
        self.sleeps: list[float] = []
        self._seen = len(server.requests())

    def new_requests(self) -> list[dict[str, Any]]:
        return self.server.requests()[self._seen:]

    def chat(self, messages: list[Message], *, stream: bool = False, real_sleep: bool = False,
             api_timeout: float = 5.0, retries: int = 2, task_timeout: float = 600.0,
             **kw: Any) -> Completion:
        model = spec(self.server.base_url, name="sim", model="sim", stream=stream)
        kw.setdefault("api_key", KEY)
        kw.setdefault("rng", random.Random(3))
        return chat(model, messages, deadlines=Deadlines(api_timeout=api_timeout,
                                                         api_retries=retries,
                                                         task_timeout=task_timeout),
                    on_attempt=self.attempts.append, env={}, label="tests::item",
                    sleep=time.sleep if real_sleep else self.sleeps.append, **kw)

    @property
    def outcomes(self) -> list[str]:
        return [a.outcome for a in self.attempts]


@pytest.fixture
def calls(sim: SimServer) -> Calls:
    return Calls(sim)


def test_plain_answer(calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 2 + 3?"))
    assert (got.text, got.finish_reason, got.model) == ("5", "stop", "sim")
    assert got.prompt_tokens > 0 and got.completion_tokens == 1
    assert got.latency == calls.attempts[0].duration > 0
    assert calls.outcomes == ["ok"] and calls.attempts[0].status == 200
    assert len(calls.new_requests()) == 1


def test_streaming_answer_with_usage(calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 6 * 7?"), stream=True,
                     params={"stream_options": {"include_usage": True}})
    assert (got.text, got.finish_reason) == ("42", "stop")
    assert got.completion_tokens == 1 and got.prompt_tokens > 0
    assert [r["stream"] for r in calls.new_requests()] == [True]


def test_azure_style_query_string_is_kept(calls: Calls,
                                          conv: Callable[[str], list[Message]]) -> None:
    model = spec(calls.server.base_url + "?api-version=2024-06-01", name="sim", model="sim")
    got = chat(model, conv("What is 2 + 3?"), deadlines=Deadlines(), api_key=KEY, env={})
    assert got.text == "5"


def test_401_is_tried_once_and_the_key_never_shows(
        calls: Calls, conv: Callable[[str], list[Message]],
        caplog: pytest.LogCaptureFixture) -> None:
    wrong = "sk-wrong-KEY-abcdef987654"
    with caplog.at_level(logging.DEBUG), pytest.raises(APIError) as info:
        calls.chat(conv("What is 2 + 3?"), api_key=wrong)
    err = info.value
    assert err.error_class == "auth_error" and err.status == 401
    assert "1 attempt failed" in str(err) and "not retried" in str(err)
    assert calls.outcomes == ["auth_error"] and calls.sleeps == []
    assert [r["fault"] for r in calls.new_requests()] == ["unauthorized"]
    texts = [str(err), repr(err), *map(str, err.args), *(r.getMessage() for r in caplog.records),
             *(a.error for a in calls.attempts)]
    assert not [t for t in texts if wrong in t or KEY in t]


@pytest.mark.parametrize(("status", "error_class"), [
    (400, "bad_request"), (403, "auth_error"), (404, "bad_request"), (422, "bad_request")])
def test_client_errors_are_never_retried(calls: Calls, conv: Callable[[str], list[Message]],
                                         status: int, error_class: str) -> None:
    with pytest.raises(APIError) as info:
        calls.chat(conv(f"What is 2 + 3? [[sim:fail={status}]]"))
    assert info.value.error_class == error_class and info.value.status == status
    assert len(calls.new_requests()) == 1 and calls.sleeps == []


def test_429_retry_after_is_waited_out(calls: Calls,
                                       conv: Callable[[str], list[Message]]) -> None:
    started = time.monotonic()
    got = calls.chat(conv("What is 2 + 3? [[sim:fail=429 retry_after=1 times=1]]"),
                     real_sleep=True)
    elapsed = time.monotonic() - started
    assert got.text == "5"
    assert calls.outcomes == ["rate_limited", "ok"]
    assert calls.attempts[0].status == 429 and calls.attempts[0].wait == 1.0
    assert 0.9 <= elapsed < 3.0
    assert calls.attempts[1].started >= calls.attempts[0].started + 0.9


def test_retry_after_ms_takes_precedence(calls: Calls,
                                         conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 2 + 3? [[sim:fail=429 retry_after=30 retry_after_ms=200 "
                          "times=1]]"))
    assert got.text == "5" and calls.sleeps == [0.2]
    assert calls.attempts[0].wait == 0.2


def test_retry_after_http_date_sets_the_wait(calls: Calls,
                                             conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 2 + 3? [[sim:fail=503 retry_after_date=5 times=1]]"))
    assert got.text == "5" and calls.outcomes == ["server_error", "ok"]
    assert len(calls.sleeps) == 1 and 3.5 <= calls.sleeps[0] <= 6.0  # 1 s date resolution


def test_500_then_success_with_jittered_backoff(calls: Calls,
                                                conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 2 + 3? [[sim:fail=500 times=2]]"), rng=random.Random(11))
    assert got.text == "5"
    assert calls.outcomes == ["server_error", "server_error", "ok"]
    rng = random.Random(11)
    assert calls.sleeps == [rng.uniform(0, 0.5), rng.uniform(0, 1.0)]
    assert [a.wait for a in calls.attempts] == [*calls.sleeps, 0.0]
    assert len(calls.new_requests()) == 3


def test_server_errors_exhaust_retries(calls: Calls,
                                       conv: Callable[[str], list[Message]]) -> None:
    with pytest.raises(APIError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:fail=503]]"), retries=2)
    msg = str(info.value)
    assert info.value.error_class == "api_error" and info.value.status == 503
    assert msg.startswith(f"model 'sim' at {calls.server.base_url}: 3 attempts failed; "
                          "last: HTTP 503 Service Unavailable")
    assert len(calls.new_requests()) == 3


def test_reset_then_success(calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 6 * 7? [[sim:reset=1 times=1]]"))
    assert got.text == "42" and calls.outcomes == ["connection_error", "ok"]


def test_hang_times_out_every_attempt(calls: Calls, conv: Callable[[str], list[Message]],
                                      caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "pytest_llmbench.providers.api"), \
            pytest.raises(APITimeoutError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:hang=1]]"), api_timeout=0.5, retries=1)
    assert time.monotonic() - started < 3.0
    assert info.value.error_class == "api_timeout"
    assert "2 attempts failed; last: timed out after 0.50 s" in str(info.value)
    assert calls.outcomes == ["timeout", "timeout"]
    assert all(0.45 <= a.duration < 1.0 for a in calls.attempts)
    lines = [r.getMessage() for r in caplog.records]
    timeouts = [m for m in lines if m.startswith("[APITimeout]")]
    assert len(timeouts) == 2
    assert "model=sim attempt=2/2 timeout=0.50s label=tests::item" in timeouts[1]
    assert [m for m in lines if m.startswith("[Retry]")] == [
        f"[Retry] model=sim attempt=1/2 outcome=timeout status=None "
        f"wait={calls.sleeps[0]:.2f}s label=tests::item"]
    assert len(calls.new_requests()) == 2


def test_task_deadline_caps_the_attempt(calls: Calls, conv: Callable[[str], list[Message]],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The capped attempt's timeout is the task deadline firing: task_timeout, no retry."""
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "pytest_llmbench.providers.api"), \
            pytest.raises(APITimeoutError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:hang=1]]"), api_timeout=30, retries=3,
                   task_timeout=1.0, task_deadline=started + 1.0)
    assert time.monotonic() - started < 3.0
    assert calls.outcomes == ["timeout"] and calls.attempts[0].duration < 1.5
    assert calls.sleeps == [] and calls.attempts[0].wait == 0.0
    assert len(calls.new_requests()) == 1
    err = info.value
    assert err.error_class == "task_timeout"
    assert "1 attempt failed; last: timed out after" in str(err)
    assert "task deadline of 1 s exceeded during attempt 1 (attempt timeout capped to " in str(err)
    assert "below api_timeout 30 s)" in str(err)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("[APITimeout]") and m.endswith("(capped by the task deadline)")
               for m in lines)
    assert [m for m in lines if m.startswith("[Retry]")] == [
        "[Retry] model=sim attempt=1/4 outcome=timeout status=None "
        f"{str(err).rsplit('; ', 1)[1]} label=tests::item"]


def test_task_deadline_caps_a_later_attempt(calls: Calls,
                                            conv: Callable[[str], list[Message]]) -> None:
    """First attempt: a genuine api_timeout; the retry is capped by the task deadline and its
    timeout is the task deadline firing."""
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:hang=1]]"), api_timeout=0.4, retries=3,
                   task_timeout=0.7, task_deadline=started + 0.7, rng=random.Random(1))
    assert calls.outcomes == ["timeout", "timeout"]
    assert info.value.error_class == "task_timeout"
    assert "2 attempts failed" in str(info.value)
    assert "exceeded during attempt 2 (attempt timeout capped to" in str(info.value)
    assert calls.attempts[1].duration < 0.4


def test_no_task_time_left_for_a_retry_is_task_timeout(
        calls: Calls, conv: Callable[[str], list[Message]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncapped attempt times out with less than MIN_ATTEMPT_TIME of task time left: no
    backoff, no further attempt, and the task layer is what ended the call.

    The attempt must start with at least ``api_timeout`` left (else it is capped, another
    ending) and end with less than MIN_ATTEMPT_TIME left: a window as wide as
    MIN_ATTEMPT_TIME, raised here to 0.4 s. At its 0.05 s the request's set-up on a loaded
    CI machine (three suites on 2 cores) took longer than the window and capped the
    attempt."""
    monkeypatch.setattr(api_module, "MIN_ATTEMPT_TIME", 0.4)
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:hang=1]]"), api_timeout=0.5, retries=2,
                   task_timeout=0.8, task_deadline=started + 0.8)
    assert calls.outcomes == ["timeout"] and calls.sleeps == []
    assert len(calls.new_requests()) == 1
    assert info.value.error_class == "task_timeout"
    assert "task deadline of 0.8 s reached after attempt 1, not retried" in str(info.value)


def test_api_timeout_with_task_time_to_spare_stays_api_timeout(
        calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    started = time.monotonic()
    with pytest.raises(APITimeoutError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:hang=1]]"), api_timeout=1.0, retries=0,
                   task_timeout=30, task_deadline=started + 30)
    assert time.monotonic() - started < 3.0
    assert calls.outcomes == ["timeout"]
    assert info.value.error_class == "api_timeout"
    assert "1 attempt failed; last: timed out after 1.00 s" in str(info.value)
    assert "task deadline" not in str(info.value)


def test_retry_after_past_the_task_deadline_fails_now(
        calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    started = time.monotonic()
    with pytest.raises(APIError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:fail=429 retry_after=20]]"),
                   task_deadline=started + 5.0)
    assert calls.sleeps == [] and time.monotonic() - started < 2.0
    assert info.value.error_class == "rate_limited" and info.value.status == 429
    assert "asked to wait 20 s (Retry-After), past the task deadline" in str(info.value)
    assert [(a.outcome, a.wait) for a in calls.attempts] == [("rate_limited", 0.0)]


def test_stream_without_finish_reason_is_truncated(
        calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    with pytest.raises(APIError) as info:
        calls.chat(conv("What is 2 + 3? [[sim:no_finish=1]]"), stream=True, retries=2)
    assert info.value.error_class == "truncated"
    assert calls.outcomes == ["truncated"] * 3 and len(calls.new_requests()) == 3


def test_slow_first_token_under_the_timeout(calls: Calls,
                                            conv: Callable[[str], list[Message]]) -> None:
    got = calls.chat(conv("What is 2 + 3? [[sim:slow_first_token=0.5]]"), stream=True,
                     api_timeout=2.0)
    assert got.text == "5" and got.latency >= 0.45 and calls.outcomes == ["ok"]


def test_stall_mid_stream_past_the_timeout(calls: Calls,
                                           conv: Callable[[str], list[Message]]) -> None:
    with pytest.raises(APITimeoutError):
        calls.chat(conv("What is 2 + 3? [[sim:stall=3]]"), stream=True, api_timeout=0.5,
                   retries=0)
    assert calls.outcomes == ["timeout"] and calls.attempts[0].duration < 1.0


class RecordingLimiter:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def before_request(self, model: ModelSpec, est_tokens: int, *, deadline: float | None = None) -> None:
        self.events.append(("before", model.name, est_tokens > 0))

    def on_response(self, model: ModelSpec, status: int, retry_after: float | None,
                    tokens: int) -> None:
        self.events.append(("after", status, retry_after, tokens > 0))


def test_limiter_is_called_around_each_attempt(
        calls: Calls, conv: Callable[[str], list[Message]]) -> None:
    limiter = RecordingLimiter()
    calls.chat(conv("What is 2 + 3? [[sim:fail=429 retry_after_ms=10 times=1]]"),
               limiter=limiter)
    assert limiter.events == [("before", "sim", True), ("after", 429, 0.01, False),
                              ("before", "sim", True), ("after", 200, None, True)]


def run_item(sim: SimServer, user: str, deadlines: Deadlines, task_left: float) -> ItemResult:
    """``runner.execute`` in this process (what an item's child does), no engine around it."""
    case = Case(suite_path="s.toml", suite_name="s", prompt_id="p", instance_id="0",
                turns=(({"role": "user", "content": user},),), expected="5",
                scorer=ScorerSpec(name="numeric"))
    job = Job(key="k", nodeid="s.toml::p[0]", identity={}, case=case, api_key=KEY,
              model=spec(sim.base_url, name="sim", model="sim"), deadlines=deadlines)
    return execute(job, lambda kind, data: None, task_deadline=time.monotonic() + task_left)


def test_item_whose_capped_attempt_times_out_is_a_task_timeout(sim: SimServer) -> None:
    """The child's own capped timeout (it may beat the engine's kill) reports the task layer,
    with the elapsed time counted from the task's start like the kill path does."""
    # the task started 0.2 s before the item's code ran (fork + setup)
    result = run_item(sim, "What is 2 + 3? [[sim:hang=1]] (runner task)",
                      Deadlines(api_timeout=30, api_retries=2, task_timeout=1.2), 1.0)
    assert result.status == "error"
    assert (result.error_class, result.deadline_layer) == ("task_timeout", "task")
    assert "task deadline of 1.2 s exceeded during attempt 1" in result.error
    assert [a["outcome"] for a in result.attempts] == ["timeout"]
    assert 1.2 <= result.elapsed < 2.0


def test_item_whose_attempt_hits_api_timeout_stays_in_the_api_layer(sim: SimServer) -> None:
    result = run_item(sim, "What is 2 + 3? [[sim:hang=1]] (runner api)",
                      Deadlines(api_timeout=0.5, api_retries=0, task_timeout=30), 30)
    assert (result.error_class, result.deadline_layer) == ("api_timeout", "api")
    assert 0.5 <= result.elapsed < 2.0


# --- small real servers for what the simulator does not do ------------------------------


def read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP request from ``conn``: (head without the blank line, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


class ThreadedServer:
    """Accepts on 127.0.0.1 and runs ``handle(conn)`` in a thread per connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self._handle = handle
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self._handle(conn)

    def close(self) -> None:
        self.stopping.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() on Linux; close() does not
        self.sock.close()
        self._thread.join(5)


ANSWER = (b'{"model":"fake","choices":[{"index":0,"message":{"role":"assistant",'
          b'"content":"fine"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
          b'"completion_tokens":1}}')


class FakeUpstream(ThreadedServer):
    """Behaves by the first path segment: ``/json``, ``/dribble`` (Content-Length body, one
    byte every 0.05 s), ``/garbage`` (200, not JSON), ``/echo`` (401 whose body repeats
    the request's headers, key included). Keeps every request head."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        head, _ = read_request(conn)
        text = head.decode("latin-1")
        self.heads.append(text)
        mode = text.split(" ")[1].lstrip("/").split("/")[0]
        if mode == "dribble":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            for _ in range(1000):
                if self.stopping.wait(0.05):
                    return
                conn.sendall(b" ")
            return
        status, body = {"json": (b"200 OK", ANSWER), "garbage": (b"200 OK", b"<html>oops"),
                        "echo": (b"401 Unauthorized", text.encode())}[mode]
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n"
                     b"Connection: close\r\n\r\n" + body)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


def test_dribbling_server_cannot_stretch_the_attempt(
        fake: FakeUpstream, caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[Attempt] = []
    started = time.monotonic()
    with caplog.at_level(logging.INFO, "pytest_llmbench.providers.api"), \
            pytest.raises(APITimeoutError) as info:
        chat(spec(f"http://127.0.0.1:{fake.port}/dribble/v1"), USER,
             deadlines=Deadlines(api_timeout=0.4, api_retries=1), on_attempt=attempts.append,
             sleep=lambda s: None, label="t::dribble", env={})
    assert time.monotonic() - started < 2.0
    assert info.value.error_class == "api_timeout"
    assert [a.outcome for a in attempts] == ["timeout", "timeout"]
    assert all(a.duration < 0.9 for a in attempts)
    timeouts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[APITimeout]")]
    assert len(timeouts) == 2
    assert timeouts[0] == "[APITimeout] model=m1 attempt=1/2 timeout=0.40s label=t::dribble"


def test_invalid_json_200_is_a_retryable_api_error(fake: FakeUpstream) -> None:
    attempts: list[Attempt] = []
    with pytest.raises(APIError) as info:
        chat(spec(f"http://127.0.0.1:{fake.port}/garbage/v1"), USER,
             deadlines=Deadlines(api_retries=1), on_attempt=attempts.append,
             sleep=lambda s: None, env={})
    assert info.value.error_class == "api_error"
    assert [a.outcome for a in attempts] == ["api_error", "api_error"]
    assert "invalid JSON" in str(info.value)


def test_key_echoed_by_the_server_is_scrubbed(fake: FakeUpstream) -> None:
    with pytest.raises(APIError) as info:
        chat(spec(f"http://127.0.0.1:{fake.port}/echo/v1"), USER, deadlines=Deadlines(),
             api_key=KEY, env={})
    assert info.value.error_class == "auth_error"
    assert "Bearer ***" in str(info.value) and KEY not in str(info.value)


# --- proxies and TLS (names under .invalid only ever reach the local proxy) ------------


class Proxy(ThreadedServer):
    """An HTTP proxy that sends every host to 127.0.0.1: absolute-form requests and CONNECT
    tunnels. Keeps each request head."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        super().__init__(self._proxy)

    def _proxy(self, client: socket.socket) -> None:
        head, body = read_request(client)
        text = head.decode("latin-1")
        self.heads.append(text)
        method, target, version = text.split("\r\n", 1)[0].split(" ")
        if method == "CONNECT":
            port = int(target.rsplit(":", 1)[1])
            upstream = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if body:
                upstream.sendall(body)
        else:
            parts = urlsplit(target)
            upstream = socket.create_connection(("127.0.0.1", parts.port or 80))
            origin = parts.path + (f"?{parts.query}" if parts.query else "")
            rest = head.split(b"\r\n", 1)[1]
            upstream.sendall(f"{method} {origin} {version}\r\n".encode() + rest + b"\r\n\r\n"
                             + body)
        with upstream:
            pipe(client, upstream)


def pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (plain sockets only)."""

    def copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    other = threading.Thread(target=copy, args=(b, a), daemon=True)
    other.start()
    copy(a, b)
    other.join(5)


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    server = Proxy()
    yield server
    server.close()


def test_http_proxy_gets_absolute_form_and_credentials(sim: SimServer, proxy: Proxy) -> None:
    port = urlsplit(sim.base_url).port
    env = {"http_proxy": f"http://bob:s3cret@127.0.0.1:{proxy.port}", "no_proxy": "other.lan"}
    model = spec(f"http://llmbench-sim.invalid:{port}/v1", name="sim", model="sim")
    assert proxy_for(parse_endpoint(model.base_url), env) is not None  # never direct
    got = chat(model, USER, deadlines=Deadlines(api_retries=0), api_key=KEY, env=env)
    assert got.text == "5"
    (head,) = proxy.heads
    assert head.startswith(f"POST http://llmbench-sim.invalid:{port}/v1/chat/completions ")
    assert "Proxy-Authorization: Basic Ym9iOnMzY3JldA==" in head


def test_azure_header_reaches_the_server(fake: FakeUpstream, proxy: Proxy) -> None:
    env = {"http_proxy": f"http://127.0.0.1:{proxy.port}"}
    model = spec(f"http://llmbench-test.openai.azure.com:{fake.port}/json/openai/deployments/"
                 "d1?api-version=2024-06-01")
    assert proxy_for(parse_endpoint(model.base_url), env) is not None  # never direct
    before = len(fake.heads)
    got = chat(model, USER, deadlines=Deadlines(api_retries=0), api_key=KEY, env=env)
    assert got.text == "fine"
    (head,) = fake.heads[before:]
    assert head.startswith("POST /json/openai/deployments/d1/chat/completions"
                           "?api-version=2024-06-01 HTTP/1.1")
    assert f"api-key: {KEY}" in head and "Authorization" not in head


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=llmbench-test", "-addext",
                    "subjectAltName=DNS:llmbench-sim.invalid,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


class TLSFront(ThreadedServer):
    """Terminates TLS and relays one request/response to the simulator (sequentially: an
    SSL socket must not be read and written from two threads)."""

    def __init__(self, cert: tuple[str, str], upstream_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(*cert)
        self.upstream_port = upstream_port
        super().__init__(self._relay)

    def _relay(self, raw: socket.socket) -> None:
        with self.context.wrap_socket(raw, server_side=True) as conn:
            head, body = read_request(conn)
            # one request per connection: the simulator closes it, and says so to the client
            head = b"\r\n".join(line for line in head.split(b"\r\n")
                                 if not line.lower().startswith(b"connection:"))
            head += b"\r\nConnection: close"
            with socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
                upstream.sendall(head + b"\r\n\r\n" + body)
                while data := upstream.recv(65536):
                    conn.sendall(data)


@pytest.fixture
def tls_front(tls_cert: tuple[str, str], sim: SimServer) -> Iterator[TLSFront]:
    port = urlsplit(sim.base_url).port
    assert port is not None
    server = TLSFront(tls_cert, port)
    yield server
    server.close()


def test_https_direct_and_streaming(tls_front: TLSFront, tls_cert: tuple[str, str]) -> None:
    context = ssl.create_default_context(cafile=tls_cert[0])
    for stream in (False, True):
        model = spec(f"https://127.0.0.1:{tls_front.port}/v1", name="sim", model="sim",
                     stream=stream)
        got = chat(model, USER, deadlines=Deadlines(api_retries=0), api_key=KEY,
                   ssl_context=context, env={})
        assert (got.text, got.finish_reason) == ("5", "stop")


def test_https_through_a_connect_tunnel(tls_front: TLSFront, tls_cert: tuple[str, str],
                                        proxy: Proxy) -> None:
    env = {"HTTPS_PROXY": f"127.0.0.1:{proxy.port}"}
    model = spec(f"https://llmbench-sim.invalid:{tls_front.port}/v1", name="sim", model="sim")
    assert proxy_for(parse_endpoint(model.base_url), env) is not None  # never direct
    got = chat(model, USER, deadlines=Deadlines(api_retries=0), api_key=KEY, env=env,
               ssl_context=ssl.create_default_context(cafile=tls_cert[0]))
    assert got.text == "5"
    (head,) = proxy.heads
    assert head.startswith(f"CONNECT llmbench-sim.invalid:{tls_front.port} HTTP/1.")
    assert KEY not in head  # the key travels inside the tunnel only


def test_untrusted_certificate_is_not_retried(tls_front: TLSFront) -> None:
    attempts: list[Attempt] = []
    with pytest.raises(APIError) as info:
        chat(spec(f"https://127.0.0.1:{tls_front.port}/v1"), USER,
             deadlines=Deadlines(api_retries=2), on_attempt=attempts.append, env={})
    assert info.value.error_class == "connection_error"
    assert "certificate" in str(info.value) and len(attempts) == 1
