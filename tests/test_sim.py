"""The simulator: a real server subprocess on 127.0.0.1, spoken to with http.client, raw
sockets and the ``openai`` SDK; its rule-based model; and the example suites it must pass.

Timing assertions are lower bounds the server guarantees (it sleeps at least that long) or
generous upper bounds; nothing depends on the machine being fast.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.sim import KEY_ENV, SimServer, SimStartError
from pytest_llmbench.sim.faults import (
    DirectiveError,
    RateWindow,
    fraction,
    parse_directives,
    request_key,
    strip_directives,
)
from pytest_llmbench.sim.model import GENERIC_ANSWER, respond
from pytest_llmbench.sim.programs import PROGRAMS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SUITES = REPO / "example_suites"
MY_SUITES = ("arithmetic", "extraction", "multiple_choice", "instructions", "faults")


# --- helpers ------------------------------------------------------------------------------


def user(text: str, tag: str | None = None) -> list[dict[str, str]]:
    """One user message; ``tag`` adds a system message that makes the conversation unique
    (``times=N`` counts per conversation) without changing what the model reads."""
    system = [] if tag is None else [{"role": "system", "content": tag}]
    return [*system, {"role": "user", "content": text}]


def port_of(server: SimServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1].split("/")[0])


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The SSE events of a streamed body: parsed JSON chunks, and "[DONE]"."""
        out: list[Any] = []
        for block in self.body.decode().split("\n\n"):
            if block.strip():
                assert block.startswith("data: "), block
                data = block[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


def request(server: SimServer, method: str, path: str, body: Any = None, *,
            headers: dict[str, str] | None = None, timeout: float = 10.0,
            conn: http.client.HTTPConnection | None = None) -> Reply:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=timeout)
    try:
        data = None if body is None else (body if isinstance(body, bytes)
                                          else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                         **(headers or {})})
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        if own:
            conn.close()


def chat(server: SimServer, text: str, *, stream: bool = False, model: str = "sim",
         tag: str | None = None, **kw: Any) -> Reply:
    body = {"model": model, "messages": user(text, tag), "stream": stream,
            **kw.pop("extra", {})}
    return request(server, "POST", "/v1/chat/completions", body, **kw)


def stream_text(events: list[Any]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or ""
                   for e in events if isinstance(e, dict) and e["choices"])


def raw_post(port: int, text: str, *, stream: bool = False,
             tag: str | None = None) -> socket.socket:
    """Send a chat request on a raw socket and return the socket (response unread)."""
    body = json.dumps({"model": "sim", "messages": user(text, tag), "stream": stream}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                 b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return sock


def spec_key(model: str, messages: list[dict[str, str]]) -> str:
    """The request log key as docs/simulator.md defines it (computed independently)."""
    canonical = json.dumps({"model": model, "messages": messages}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    log_path = tmp_path_factory.mktemp("sim") / "requests.jsonl"
    with SimServer.start(request_log=log_path) as srv:
        yield srv


@pytest.fixture
def uniq(request: pytest.FixtureRequest) -> str:
    """Text unique to the test: ``times=N`` counts per conversation over the server's life."""
    return f"You are a test: {request.node.name}."


def log_entries(server: SimServer, text: str, tag: str | None) -> list[dict[str, Any]]:
    """Request log lines whose conversation is ``user(text, tag)`` for model ``sim``."""
    key = spec_key("sim", user(text, tag))
    return [e for e in server.requests() if e["key"] == key]


# --- basic endpoints ----------------------------------------------------------------------


def test_health_models_and_unknown_routes(server: SimServer) -> None:
    health = request(server, "GET", "/health")
    assert (health.status, health.body) == (200, b"ok")
    models = request(server, "GET", "/v1/models")
    assert models.status == 200
    assert [m["id"] for m in models.json()["data"]] == ["sim", "sim-1"]
    assert request(server, "GET", "/v1/models/any-name").json()["id"] == "any-name"
    missing = request(server, "GET", "/v2/nothing")
    assert missing.status == 404
    assert set(missing.json()["error"]) >= {"message", "type", "code"}
    assert request(server, "GET", "/v1/chat/completions").status == 405


def test_bad_requests_are_400(server: SimServer) -> None:
    assert request(server, "POST", "/v1/chat/completions", b"{not json").status == 400
    assert request(server, "POST", "/v1/chat/completions", {"model": "sim"}).status == 400
    reply = request(server, "POST", "/v1/chat/completions",
                    {"model": "sim", "messages": user("hi"), "max_tokens": 0})
    assert reply.status == 400 and reply.json()["error"]["type"] == "invalid_request_error"


def test_chunked_request_body_is_refused(server: SimServer) -> None:
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=5)
    with sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 501 ")


def test_chat_with_http_client(server: SimServer, uniq: str) -> None:
    text = "What is 12 + 7?"
    reply = chat(server, text, model="my-model", tag=uniq)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    data = reply.json()
    assert data["object"] == "chat.completion" and data["id"] and data["created"] > 0
    assert data["model"] == "my-model"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "19"}
    assert choice["finish_reason"] == "stop"
    words = len(text.split()) + len(uniq.split())
    assert data["usage"] == {"prompt_tokens": words, "completion_tokens": 1,
                             "total_tokens": words + 1}


def test_keep_alive_and_expect_continue(server: SimServer) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=5)
    try:
        for a in range(3):
            reply = request(server, "POST", "/v1/chat/completions",
                            {"model": "sim", "messages": user(f"What is {a} + 1?")}, conn=conn)
            assert reply.json()["choices"][0]["message"]["content"] == str(a + 1)
            assert reply.headers["Connection"] == "keep-alive"
        local = conn.sock.getsockname()
        request(server, "GET", "/health", conn=conn)
        assert conn.sock.getsockname() == local  # the same TCP connection throughout
    finally:
        conn.close()
    body = json.dumps({"model": "sim", "messages": user("What is 2 * 21?")}).encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue"
                     b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and b'"content": "42"' in data


def test_stream_with_http_client(server: SimServer, uniq: str) -> None:
    reply = chat(server, "Reply in uppercase: a simulated stream of words", stream=True,
                 tag=uniq)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Transfer-Encoding"] == "chunked"
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert stream_text(chunks) == "A SIMULATED STREAM OF WORDS"
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "stop" and reasons.count("stop") == 1 and reasons.count(None) == len(
        reasons) - 1
    assert len({c["id"] for c in chunks}) == 1


def test_openai_sdk(server: SimServer, uniq: str) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        done = client.chat.completions.create(
            model="sim", messages=user("Compute 6 * 7", uniq))
        assert done.choices[0].message.content == "42"
        assert done.choices[0].finish_reason == "stop"
        assert done.usage is not None and done.usage.completion_tokens == 1

        parts, reasons, usage = [], [], None
        stream = client.chat.completions.create(
            model="sim", messages=user("Sort these numbers ascending: 5, 2, 9", uniq),
            stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                reasons.append(chunk.choices[0].finish_reason)
            else:
                usage = chunk.usage
        assert "".join(parts).startswith("2, 5, 9")
        assert reasons[-1] == "stop"
        assert usage is not None and usage.completion_tokens == len("".join(parts).split())
        assert [m.id for m in client.models.list()] == ["sim", "sim-1"]

        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="sim", messages=user("hi [[sim:fail=429 retry_after=0.2]]", uniq))
        assert info.value.response.headers["retry-after"] == "0.2"
        assert info.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(
                model="sim", messages=user("hi [[sim:reset=1]]", uniq))


def test_max_tokens_truncates_with_finish_reason_length(server: SimServer, uniq: str) -> None:
    reply = chat(server, "Repeat 'ha' 10 times separated by spaces", tag=uniq,
                 extra={"max_tokens": 3})
    choice = reply.json()["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == ("ha ha ha", "length")


# --- directives ---------------------------------------------------------------------------


def test_fail_directive_sets_status_and_retry_headers(server: SimServer, uniq: str) -> None:
    reply = chat(server, "hi [[sim:fail=429 retry_after=0.2]]", tag=uniq)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "0.2"
    assert reply.headers["retry-after-ms"] is None
    error = reply.json()["error"]
    assert error["type"] == "rate_limit_error" and error["message"]
    assert error["code"] == "rate_limit_exceeded"

    reply = chat(server, "hi [[sim:fail=503 retry_after_ms=150]]", tag=uniq)
    assert (reply.status, reply.headers["retry-after-ms"]) == (503, "150")
    assert reply.json()["error"]["type"] == "server_error"

    before = time.time()
    reply = chat(server, "hi [[sim:fail=429 retry_after_date=5]]", tag=uniq)
    when = email.utils.parsedate_to_datetime(reply.headers["Retry-After"]).timestamp()
    assert before + 4 <= when <= before + 7
    assert chat(server, "hi [[sim:fail=418]]", tag=uniq).status == 418


def test_times_counts_per_conversation(server: SimServer, uniq: str) -> None:
    text = "What is 40 + 2? [[sim:fail=500 times=2]]"
    statuses = [chat(server, text, tag=uniq).status for _ in range(2)]
    other_model = chat(server, text, model="other", tag=uniq)  # another key: its own count
    third = chat(server, text, tag=uniq)
    assert statuses == [500, 500] and other_model.status == 500
    assert third.status == 200 and third.json()["choices"][0]["message"]["content"] == "42"
    entries = log_entries(server, text, uniq)
    assert [(e["n"], e["fault"]) for e in entries] == [(1, "fail=500"), (2, "fail=500"),
                                                       (3, None)]


def test_reset_gives_connection_error(server: SimServer, uniq: str) -> None:
    text = "What is 1 + 1? [[sim:reset=1 times=1]]"
    with pytest.raises(ConnectionError):
        chat(server, text, tag=uniq)
    assert chat(server, text, tag=uniq).json()["choices"][0]["message"]["content"] == "2"
    assert [e["fault"] for e in log_entries(server, text, uniq)] == ["reset", None]


def test_hang_gives_client_timeout_and_is_logged_on_arrival(server: SimServer,
                                                            uniq: str) -> None:
    text = "What is 2 + 2? [[sim:hang=1]]"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        chat(server, text, timeout=1.0, tag=uniq)
    assert time.monotonic() - started < 5
    # A raw request that is never answered is already in the log while it waits.
    sock = raw_post(port_of(server), text, tag=uniq)
    with sock:
        entries = wait_for(lambda: [e for e in log_entries(server, text, uniq) if e["n"] == 2])
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
    entry = entries[0]
    assert entry["fault"] == "hang" and entry["model"] == "sim" and entry["stream"] is False
    assert abs(entry["t"] - time.time()) < 30
    assert chat(server, "What is 3 + 3?", tag=uniq).status == 200  # still responsive


def test_request_log_fields(server: SimServer, uniq: str) -> None:
    text = "What is 5 + 5?"
    chat(server, text, stream=True, tag=uniq)
    chat(server, text, stream=True, tag=uniq)
    entries = log_entries(server, text, uniq)
    assert [e["n"] for e in entries] == [1, 2]
    assert set(entries[0]) == {"t", "key", "model", "stream", "n", "fault"}
    assert entries[0]["key"] == request_key("sim", user(text, uniq)) == spec_key("sim", user(text, uniq))
    assert entries[0]["stream"] is True and entries[0]["fault"] is None


def test_slow_first_token_delays_the_first_byte(server: SimServer, uniq: str) -> None:
    for stream in (False, True):
        sock = raw_post(port_of(server), "What is 9 + 9? [[sim:slow_first_token=0.5]]",
                        stream=stream, tag=uniq)
        with sock:
            started = time.monotonic()
            first = sock.recv(1)
            waited = time.monotonic() - started
        assert first == b"H" and 0.45 <= waited < 10


def test_stall_pauses_a_stream_after_the_first_chunk(server: SimServer, uniq: str) -> None:
    sock = raw_post(port_of(server), "Reply in uppercase: one two three [[sim:stall=0.6]]",
                    stream=True, tag=uniq)
    data, first_content, done = b"", None, None
    with sock:
        while done is None:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended early"
            data += chunk
            if first_content is None and re.search(rb'"content": "[^"]+"', data):
                first_content = time.monotonic()
            if b"data: [DONE]" in data:
                done = time.monotonic()
    assert first_content is not None and 0.55 <= done - first_content < 10
    body = Reply(200, http.client.HTTPMessage(), _dechunk(data)).events()
    assert stream_text(body[:-1]) == "ONE TWO THREE"

    started = time.monotonic()
    reply = chat(server, "What is 1 + 2? [[sim:stall=0.5]]", tag=uniq)
    assert reply.json()["choices"][0]["message"]["content"] == "3"
    assert time.monotonic() - started >= 0.45


def _dechunk(raw: bytes) -> bytes:
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = b""
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]


def test_latency_directive(server: SimServer, uniq: str) -> None:
    started = time.monotonic()
    reply = chat(server, "What is 4 * 4? [[sim:latency=0.4]]", tag=uniq)
    assert reply.json()["choices"][0]["message"]["content"] == "16"
    assert 0.35 <= time.monotonic() - started < 10
    assert log_entries(server, "What is 4 * 4? [[sim:latency=0.4]]", uniq)[0]["fault"] == (
        "latency=0.4")


def test_no_finish(server: SimServer, uniq: str) -> None:
    text = "What is 8 + 8? [[sim:no_finish=1]]"
    events = chat(server, text, stream=True, tag=uniq).events()
    assert events[-1] == "[DONE]" and stream_text(events[:-1]) == "16"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert chat(server, text, tag=uniq).json()["choices"][0]["finish_reason"] is None

    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as client:
        reasons = [c.choices[0].finish_reason for c in client.chat.completions.create(
            model="sim", messages=user(text, uniq), stream=True) if c.choices]
    assert reasons and reasons == [None] * len(reasons)


def test_wrong_answer_program_and_bad_directives(server: SimServer, uniq: str) -> None:
    def content(text: str) -> str:
        return str(chat(server, text, tag=uniq).json()["choices"][0]["message"]["content"])

    assert content("What is 12 + 7? [[sim:wrong=1]]") == "20"
    assert content("What is 12 + 7? [[sim:answer=forty%20two]]") == "forty two"
    assert content("Write hello. [[sim:program=hello]]") == PROGRAMS["hello"]
    for bad in ("program=no-such-program", "colour=blue", "latency=-1", "fail=200", "hang"):
        reply = chat(server, f"hi [[sim:{bad}]]", tag=uniq)
        assert reply.status == 400, bad
        assert reply.json()["error"]["code"] == "invalid_sim_directive"


def test_directive_only_read_from_the_last_user_message(server: SimServer, uniq: str) -> None:
    messages = [{"role": "system", "content": uniq},
                {"role": "user", "content": "What is 1 + 1? [[sim:fail=500]]"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "Multiply that by 21."}]
    reply = request(server, "POST", "/v1/chat/completions", {"model": "sim",
                                                             "messages": messages})
    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == "42"


# --- server-wide options --------------------------------------------------------------------


def test_rpm_quota_is_exact(tmp_path: Path) -> None:
    log_path = tmp_path / "req.jsonl"
    with SimServer.start(rpm=3, request_log=log_path) as srv:
        replies = [chat(srv, f"What is {i} + 1?") for i in range(6)]
    assert [r.status for r in replies] == [200, 200, 200, 429, 429, 429]
    limited = replies[3]
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert 0 < int(limited.headers["retry-after-ms"]) <= 60_000
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert [e["fault"] for e in srv.requests()] == [None] * 3 + ["rate_limit"] * 3


def test_rate_window_admits_exactly_rpm_per_minute() -> None:
    window = RateWindow(2)
    assert window.admit(100.0) == 0.0 and window.admit(130.0) == 0.0
    assert window.admit(140.0) == pytest.approx(20.0)  # rejected: does not consume quota
    assert window.admit(160.5) == 0.0  # the request at 100 left the window
    assert window.admit(161.0) == pytest.approx(29.0)


def test_require_key_never_leaks(tmp_path: Path) -> None:
    key = "sk-sim-secret-7f3a9c"
    log_path = tmp_path / "req.jsonl"
    env = {**os.environ, KEY_ENV: key, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest_llmbench.sim", "--verbose", "--request-log",
         str(log_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert re.fullmatch(r"listening on http://127\.0\.0\.1:\d+/v1\n", line)
        assert key.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        srv = SimServer(proc, line.split()[-1], log_path)
        assert chat(srv, "What is 1 + 1?").status == 401
        bad = chat(srv, "What is 1 + 1?", headers={"Authorization": "Bearer wrong"})
        assert bad.status == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert key not in bad.body.decode()
        good = chat(srv, "What is 1 + 1?", headers={"Authorization": f"Bearer {key}"})
        assert good.status == 200
        assert request(srv, "GET", "/v1/models").status == 401
        assert request(srv, "GET", "/health").status == 200
        openai = pytest.importorskip("openai")
        with openai.OpenAI(base_url=srv.base_url, api_key=key, max_retries=0) as client:
            done = client.chat.completions.create(model="sim", messages=user("What is 2 + 2?"))
            assert done.choices[0].message.content == "4"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert b"chat key=" in err  # --verbose did log the requests...
    for text in (out, err, log_path.read_bytes()):
        assert key.encode() not in text  # ...but never the API key
    entries = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [e["fault"] for e in entries] == ["unauthorized", "unauthorized", None, None]


def test_simserver_passes_the_key_by_environment(tmp_path: Path) -> None:
    with SimServer.start(require_key="k-123") as srv:
        assert b"k-123" not in Path(f"/proc/{srv.process.pid}/cmdline").read_bytes()
        assert chat(srv, "What is 1 + 1?").status == 401
        ok = chat(srv, "What is 1 + 1?", headers={"Authorization": "Bearer k-123"})
        assert ok.status == 200


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_exits_cleanly_even_with_a_hanging_request(tmp_path: Path, sig: int) -> None:
    srv = SimServer.start(request_log=tmp_path / "req.jsonl")
    try:
        with raw_post(port_of(srv), "What is 1 + 1? [[sim:hang=1]]") as sock:
            wait_for(srv.requests)
            srv.process.send_signal(sig)
            assert srv.process.wait(10) == 0
            sock.settimeout(5)
            assert sock.recv(100) == b""  # closed without an answer
    finally:
        srv.stop()


def test_error_rate_is_deterministic_per_prompt_and_seed() -> None:
    prompts = [f"What is {i} + {i}?" for i in range(40)]

    def wrong_ones(seed: int, rate: float) -> set[int]:
        with SimServer.start(error_rate=rate, seed=seed) as srv:
            answers = [chat(srv, p).json()["choices"][0]["message"]["content"]
                       for p in prompts]
        return {i for i, a in enumerate(answers) if a != str(2 * i)}

    first, again, other = wrong_ones(1, 0.5), wrong_ones(1, 0.5), wrong_ones(2, 0.5)
    assert first == again
    assert 8 <= len(first) <= 32
    assert other != first
    expected = {i for i, p in enumerate(prompts) if fraction("error", 1, user(p)) < 0.5}
    assert first == expected


def test_hang_rate_and_fail_rate() -> None:
    seed = 5
    hanging = next(f"What is {i} + 1?" for i in range(100)
                   if fraction("hang", seed, user(f"What is {i} + 1?")) < 0.5)
    answering = next(f"What is {i} + 1?" for i in range(100)
                     if fraction("hang", seed, user(f"What is {i} + 1?")) >= 0.5)
    with SimServer.start(hang_rate=0.5, seed=seed) as srv:
        assert chat(srv, answering).status == 200
        with pytest.raises(TimeoutError):
            chat(srv, hanging, timeout=1.0)
    with SimServer.start(fail_rate=1.0) as srv:
        reply = chat(srv, "What is 1 + 1?")
        assert reply.status == 500 and reply.json()["error"]["type"] == "server_error"


def test_server_latency_is_asynchronous() -> None:
    """300 concurrent requests with 0.5 s latency finish together, not one after another."""

    async def one(port: int, i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({"model": "sim", "messages": user(f"What is {i} + 0?")}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data

    async def run(port: int) -> list[bytes]:
        return await asyncio.gather(*(one(port, i) for i in range(300)))

    with SimServer.start(latency=0.5, jitter=0.1) as srv:
        started = time.monotonic()
        results = asyncio.run(run(port_of(srv)))
        elapsed = time.monotonic() - started
    assert all(r.startswith(b"HTTP/1.1 200 ") for r in results)
    assert all(f'"content": "{i}"'.encode() in r for i, r in enumerate(results))
    assert elapsed < 20  # serial would take 150 s


def test_server_exits_when_its_parent_dies() -> None:
    code = ("import sys, time; from pytest_llmbench.sim import SimServer; "
            "s = SimServer.start(); print(s.process.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert parent.stdout is not None
        sim_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        wait_for(lambda: not Path(f"/proc/{sim_pid}").exists()
                 or "Z" in Path(f"/proc/{sim_pid}/stat").read_text().split(")")[1][:3],
                 timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()


def test_start_failure_is_reported() -> None:
    with SimServer.start() as srv, pytest.raises(SimStartError, match="exited"):
        SimServer.start(port=port_of(srv), stderr=subprocess.DEVNULL)


# --- directives and the model, without a server ---------------------------------------------


def test_parse_directives() -> None:
    d = parse_directives("Q? [[sim:fail=429 retry_after=0.5 times=2]] more [[sim:answer=a%20b]]")
    assert (d.fail, d.retry_after, d.times, d.answer) == (429, 0.5, 2, "a b")
    assert parse_directives("no directive").empty
    assert strip_directives("What is 1 + 1? [[sim:hang=1]]") == "What is 1 + 1?"
    for bad in ("[[sim:nope=1]]", "[[sim:times=-1]]", "[[sim:wrong=maybe]]", "[[sim:fail=x]]"):
        with pytest.raises(DirectiveError):
            parse_directives(bad)


@pytest.mark.parametrize(("question", "answer", "wrong"), [
    ("What is 12 + 7?", "19", "20"),
    ("Compute 6 * 7", "42", "43"),
    ("What is 100 / 4?", "25", "26"),
    ("What is 2 ** 10?", "1024", "1025"),
    ("What is (1.5 + 2) * 2?", "7", "8"),
    ("What is 7 / 2?", "3.5", "4.5"),
    ("What is 2^8?", "256", "257"),
    ("How much is 9 times 9?", "81", "82"),
    ("What is __import__('os').getcwd()?", GENERIC_ANSWER, "I do not know."),
    ("What is 9 ** 9 ** 9?", "I cannot compute that.", "I cannot compute that."),
    ("What is 1 / 0?", "I cannot compute that.", "I cannot compute that."),
    ("Extract the name and age as JSON from: Alice is 30 years old and lives in Paris.",
     '{"name": "Alice", "age": 30, "city": "Paris"}',
     '{"name": "Alice", "age": 31, "city": "Paris"}'),
    ("What is the capital of France?\nA) Berlin\nB) Paris\nC) Rome\nD) Madrid\n"
     "Answer with the letter.", "B", "C"),
    ("What is 6 * 7? A) 42 B) 48 C) 36 D) 49", "A", "B"),
    ("Reply in uppercase: hello", "HELLO", "HELLo"),
    ("Reverse the word: stressed", "desserts", "edsserts"),
    ("Reverse the words in: one two three", "three two one", "two three one"),
    ("Count the words in: the quick brown fox", "4", "5"),
    ("Repeat 'X' 3 times separated by spaces", "X X X", "X X X X"),
    ("Reply with exactly the word: banana", "banana", "ananab"),
    ("Sort these numbers ascending: 5, 2, 9", "2, 5, 9", "2, 9, 5"),
    ("What is the chemical symbol for gold?", "Au", "Ag"),
    ("What is the capital of Japan?", "Tokyo", "Ottawa"),
    ("Tell me a story.", GENERIC_ANSWER, "I do not know."),
])
def test_model_families(question: str, answer: str, wrong: str) -> None:
    assert respond(user(question)) == answer
    assert respond(user(question), wrong=True) == wrong


def test_model_multi_turn_reference() -> None:
    conversation = [*user("What is 3 + 4?"), {"role": "assistant", "content": "7"},
                    *user("Multiply that by 3.")]
    assert respond(conversation) == "21"
    conversation[-1] = {"role": "user", "content": "What is the result minus 10?"}
    assert respond(conversation) == "-3"


# --- the example suites ----------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
SUITE_KEYS = {"name", "description", "system", "scorer", "threshold", "repeats", "tags",
              "params", "deadlines", "extra"}
PROMPT_KEYS = {"id", "template", "messages", "turns", "system", "scorer", "threshold",
               "repeats", "tags", "params", "deadlines", "extra", "instances"}
INSTANCE_KEYS = {"id", "vars", "expected", "scorer", "threshold", "repeats", "tags", "params",
                 "deadlines", "extra"}


def render(text: str, variables: dict[str, Any]) -> str:
    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        assert name in variables, f"placeholder {{{{{name}}}}} has no value"
        v = variables[name]
        return ("true" if v else "false") if isinstance(v, bool) else str(v)

    return PLACEHOLDER.sub(value, text)


def suite_items(name: str) -> Iterator[tuple[str, list[list[dict[str, str]]], Any, dict[str, Any]]]:
    """(item id, rendered turns, expected, scorer spec {name, ...options}) per instance."""
    data = tomllib.loads((SUITES / f"{name}.toml").read_text())
    assert set(data) <= {"suite", "prompts"}
    suite = data.get("suite", {})
    assert set(suite) <= SUITE_KEYS, set(suite) - SUITE_KEYS
    for prompt in data["prompts"]:
        assert set(prompt) <= PROMPT_KEYS, set(prompt) - PROMPT_KEYS
        assert sum(k in prompt for k in ("template", "messages", "turns")) == 1
        for instance in prompt["instances"]:
            assert set(instance) <= INSTANCE_KEYS, set(instance) - INSTANCE_KEYS
            variables = instance.get("vars", {})
            system = prompt.get("system", suite.get("system"))
            first = [] if system is None else [{"role": "system",
                                                "content": render(system, variables)}]
            if "template" in prompt:
                turns = [first + user(render(prompt["template"], variables))]
            elif "turns" in prompt:
                turns = [first + user(render(prompt["turns"][0], variables))]
                turns += [user(render(t, variables)) for t in prompt["turns"][1:]]
            else:
                turns = [first + [{"role": m["role"], "content": render(m["content"], variables)}
                                  for m in prompt["messages"]]]
            scorer = instance.get("scorer", prompt.get("scorer", suite.get("scorer", "exact")))
            scorer = {"name": scorer} if isinstance(scorer, str) else dict(scorer)
            item = f"{name}::{prompt['id']}[{instance.get('id', '?')}]"
            yield item, turns, instance.get("expected"), scorer


def run_conversation(turns: list[list[dict[str, str]]]) -> str:
    """Feed the turns to the model as the plugin would: each answer goes back in."""
    messages: list[dict[str, str]] = []
    answer = ""
    for turn in turns:
        messages.extend(turn)
        assert parse_directives(turn[-1]["content"]) is not None  # directives must parse
        answer = respond(messages)
        messages.append({"role": "assistant", "content": answer})
    return answer


def judge(answer: str, expected: Any, scorer: dict[str, Any]) -> bool:
    """The scorers' semantics, as the suites intend them (docs/suites.md)."""
    name = scorer["name"]
    if name == "numeric":
        tolerance = float(scorer.get("tolerance", 1e-6))
        return abs(float(answer) - float(expected)) <= tolerance
    if name == "json":
        got = json.loads(answer)
        return all(bool(got.get(f) == expected[f]) for f in scorer["fields"])
    if name == "choice":
        return answer.strip() == str(expected)
    if name == "exact":
        return answer.strip() == str(expected).strip()
    if name == "normalized":
        def norm(s: str) -> str:
            return " ".join(s.casefold().split()).strip(" \"'.,;:!?")
        return norm(answer) == norm(str(expected))
    if name == "contains":
        return str(expected).casefold() in answer.casefold()
    if name == "regex":
        pattern = scorer.get("pattern", expected)
        if scorer.get("fullmatch"):
            return re.fullmatch(pattern, answer.strip()) is not None
        return re.search(pattern, answer) is not None
    raise AssertionError(f"unexpected scorer {name}")


def test_example_suites_pass_against_the_model() -> None:
    total = 0
    failures = []
    for name in MY_SUITES:
        for item, turns, expected, scorer in suite_items(name):
            total += 1
            answer = run_conversation(turns)
            if not judge(answer, expected, scorer):
                failures.append(f"{item}: {answer!r} vs {expected!r} ({scorer})")
            wrong = respond([m for t in turns for m in t], wrong=True)
            if len(turns) == 1 and judge_safely(wrong, expected, scorer):
                failures.append(f"{item}: the wrong answer {wrong!r} passes too")
    assert not failures, "\n".join(failures)
    assert total >= 100


def judge_safely(answer: str, expected: Any, scorer: dict[str, Any]) -> bool:
    try:
        return judge(answer, expected, scorer)
    except (ValueError, KeyError):
        return False


def test_example_suites_load_and_score_with_the_project_code() -> None:
    """The same check through the real loader and scorers, when they are importable."""
    suite_mod = pytest.importorskip("pytest_llmbench.collect.suite")
    scoring = pytest.importorskip("pytest_llmbench.scoring.resolve")
    from pytest_llmbench.records import ScoreRequest

    failures = []
    for name in MY_SUITES:
        loaded = suite_mod.load_suite(SUITES / f"{name}.toml", rootdir=REPO,
                                      scorer_check=scoring.validate_options)
        for case in loaded.cases:
            scoring.validate_options(case.scorer, case.expected)
            answer = run_conversation([list(t) for t in case.turns])
            scorer = scoring.resolve_scorer(case.scorer, rootdir=REPO)
            score, passed = scoring.run_scorer(scorer, ScoreRequest(
                answer=answer, expected=case.expected, options=case.scorer.options),
                case.scorer.threshold)
            if not passed:
                failures.append(f"{name}::{case.case_id}: {answer!r}: {score.explanation}")
    assert not failures, "\n".join(failures)


def test_fault_suite_recovers_within_two_retries(server: SimServer) -> None:
    """Every faults.toml item succeeds within 1 + 2 attempts against the real server."""
    for item, turns, expected, scorer in suite_items("faults"):
        messages = turns[0]
        body = {"model": f"retry-check-{item}", "messages": messages}
        for _attempt in range(3):
            try:
                reply = request(server, "POST", "/v1/chat/completions", body, timeout=5)
            except ConnectionError:
                continue
            if reply.status == 200:
                answer = reply.json()["choices"][0]["message"]["content"]
                assert judge(answer, expected, scorer), item
                break
            assert reply.status == 429 or reply.status >= 500, item
        else:
            raise AssertionError(f"{item} did not recover within 2 retries")
    hang_free = "\n".join((SUITES / f"{n}.toml").read_text() for n in MY_SUITES)
    assert "hang=1" not in hang_free and "no_finish" not in hang_free
