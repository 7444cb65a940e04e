"""The OpenAI-compatible provider against loopback servers written here: what the SDK path
reads (gzip, content parts, tool calls, refusal, reasoning, logprobs, streams), the bounds
(answer size, malformed answers, Retry-After limits) and the proxies (refused, https://,
socks5://)."""

from __future__ import annotations

import contextlib
import gzip
import json
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from test_api import KEY, USER, ThreadedServer, read_request, spec, tls_cert  # noqa: F401

from pytest_llmbench.errors import APIError
from pytest_llmbench.providers.api import chat
from pytest_llmbench.records import Attempt, Completion, Deadlines, ModelSpec

Handler = Callable[[socket.socket, str, bytes], None]


def respond(conn: socket.socket, body: bytes, *, status: str = "200 OK",
            ctype: str = "application/json", headers: str = "") -> None:
    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                 f"\r\n{headers}Connection: close\r\n\r\n".encode() + body)


def sse(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode())
                   + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def choice_answer(message: Any, **extra: Any) -> bytes:
    return json.dumps({"model": "fake", "choices": [{"index": 0, "message": message,
                                                     "finish_reason": "stop", **extra}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()


class Scripted(ThreadedServer):
    """Answers each request by the first path segment, from ``routes``; keeps every
    request's head and JSON body."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.heads: list[str] = []
        self.bodies: list[Any] = []
        self.sent: dict[str, int] = {}
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket) -> None:
        head, body = read_request(conn)
        text = head.decode("latin-1")
        self.heads.append(text)
        with contextlib.suppress(ValueError):
            self.bodies.append(json.loads(body))
        route = text.split(" ")[1].lstrip("/").split("/")[0]
        self.routes[route](conn, text, body)

    def url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.port}/{route}/v1"


@pytest.fixture(scope="module")
def server() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.close()


def call(url: str, *, stream: bool = False, retries: int = 0, attempts: list[Attempt] | None = None,
         **kw: Any) -> Completion:
    model_kw = {k: kw.pop(k) for k in ("max_response_bytes", "max_retry_after") if k in kw}
    model = spec(url, stream=stream, **model_kw)
    kw.setdefault("env", {})
    return chat(model, USER, deadlines=Deadlines(api_timeout=5, api_retries=retries),
                on_attempt=(attempts if attempts is not None else []).append,
                sleep=lambda s: None, **kw)


# --- what is read ----------------------------------------------------------------------


def test_gzip_bodies_plain_and_streamed(server: Scripted) -> None:
    server.routes["gz"] = lambda c, h, b: respond(
        c, gzip.compress(choice_answer({"role": "assistant", "content": "zipped"})),
        headers="Content-Encoding: gzip\r\n")
    server.routes["gzs"] = lambda c, h, b: respond(c, gzip.compress(sse(
        {"choices": [{"index": 0, "delta": {"content": "zip"}}]},
        {"choices": [{"index": 0, "delta": {"content": "ped"}, "finish_reason": "stop"}]})),
        ctype="text/event-stream", headers="Content-Encoding: gzip\r\n")
    assert call(server.url("gz")).text == "zipped"
    assert call(server.url("gzs"), stream=True).text == "zipped"


def test_content_parts_tool_calls_refusal_reasoning_and_logprobs(server: Scripted) -> None:
    message = {"role": "assistant",
               "content": [{"type": "text", "text": "Let me "}, {"type": "text", "text": "add."}],
               "refusal": "no can do", "reasoning_content": "2 and 3 make 5",
               "tool_calls": [{"id": "c1", "type": "function",
                               "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
                              {"id": "c2", "type": "function",
                               "function": {"name": "log", "arguments": "{}"}}]}
    logprobs = {"content": [{"token": "5", "logprob": -0.01, "bytes": [53], "top_logprobs": []}],
                "refusal": None}
    server.routes["rich"] = lambda c, h, b: respond(c, choice_answer(message, logprobs=logprobs))
    got = call(server.url("rich"))
    assert got.text == "Let me add." and got.content_parts == tuple(message["content"])
    assert [(t.id, t.name, t.arguments) for t in got.tool_calls] == [
        ("c1", "add", '{"a": 2, "b": 3}'), ("c2", "log", "{}")]
    assert (got.refusal, got.reasoning) == ("no can do", "2 and 3 make 5")
    assert got.logprobs["content"][0]["token"] == "5"
    assert got.assistant_message()["tool_calls"][0] == {
        "id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}


def test_streamed_tool_call_deltas_are_merged_by_index_and_usage_is_asked_for(
        server: Scripted) -> None:
    def delta(d: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"model": "fake", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

    events = sse(
        delta({"role": "assistant", "reasoning_content": "need "}),
        delta({"reasoning_content": "tools"}),
        delta({"tool_calls": [{"index": 0, "id": "a", "type": "function",
                               "function": {"name": "add", "arguments": '{"a":'}}]}),
        delta({"tool_calls": [{"index": 1, "id": "b", "type": "function",
                               "function": {"name": "mul", "arguments": '{"x":'}}]}),
        delta({"tool_calls": [{"index": 0, "function": {"arguments": " 2}"}}]}),
        delta({"tool_calls": [{"index": 1, "function": {"arguments": " 7}"}}]}),
        delta({}, "tool_calls"),
        {"model": "fake", "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 9}})
    server.routes["tools"] = lambda c, h, b: respond(c, events, ctype="text/event-stream")
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    before = len(server.bodies)
    got = call(server.url("tools"), stream=True, tools=tools, tool_choice="auto")
    assert [(t.id, t.name, t.arguments) for t in got.tool_calls] == [
        ("a", "add", '{"a": 2}'), ("b", "mul", '{"x": 7}')]
    assert (got.finish_reason, got.reasoning, got.text) == ("tool_calls", "need tools", "")
    assert (got.prompt_tokens, got.completion_tokens) == (11, 9)
    (body,) = server.bodies[before:]
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


# --- bounds ----------------------------------------------------------------------------


def _endless(server: Scripted, name: str, head: bytes, piece: bytes) -> Handler:
    def send(conn: socket.socket, h: str, b: bytes) -> None:
        conn.sendall(head)
        sent = 0
        try:
            while sent < 400 * 2**20 and not server.stopping.is_set():
                conn.sendall(piece)
                sent += len(piece)
        except OSError:
            pass
        server.sent[name] = sent
    return send


@pytest.mark.parametrize("kind", ["body", "events", "gzip-bomb"])
def test_an_answer_over_the_cap_is_an_api_error_and_the_connection_is_dropped(
        server: Scripted, kind: str) -> None:
    chunk = b"x" * 65536
    if kind == "body":
        handler = _endless(server, kind, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 419430400\r\n\r\n", chunk)
    elif kind == "events":
        event = sse({"choices": [{"index": 0, "delta": {"content": "y" * 8000}}]}, done=False)
        handler = _endless(server, kind, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                           b"\r\n", event * 8)
    else:
        bomb = gzip.compress(b"0" * (64 * 2**20))  # 64 MiB of zeros in ~64 KiB
        handler = _endless(server, kind, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb),
                           bomb)
    server.routes[kind] = handler
    attempts: list[Attempt] = []
    started = time.monotonic()
    with pytest.raises(APIError) as info:
        call(server.url(kind), stream=kind == "events", retries=2, attempts=attempts,
             max_response_bytes=2**20)
    assert info.value.error_class == "api_error"
    assert "response too large" in str(info.value)
    assert [a.outcome for a in attempts] == ["api_error"]  # not retried: it would be again
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while kind not in server.sent and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.sent[kind] < 64 * 2**20  # the server could not go on: we hung up


MALFORMED = {
    "message-string": (choice_answer("just text"), "choices[0].message is a str"),
    "usage-text": (json.dumps({"choices": [{"index": 0, "message": {"content": "5"},
                                            "finish_reason": "stop"}],
                               "usage": {"prompt_tokens": "many"}}).encode(),
                   "usage.prompt_tokens is str"),
    "usage-huge": (json.dumps({"choices": [{"index": 0, "message": {"content": "5"},
                                            "finish_reason": "stop"}],
                               "usage": {"completion_tokens": 10**40}}).encode(),
                   "usage.completion_tokens is int"),
    "deep": (b'{"choices": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    "content-dict": (choice_answer({"content": {"text": "5"}}),
                     "choices[0].message.content is a dict"),
    "content-number": (choice_answer({"content": 5}), "choices[0].message.content is a int"),
    "not-json": (b"<html>oops", "invalid JSON in the HTTP 200 body"),
}
MALFORMED_STREAMS = {
    "delta-string": (sse({"choices": [{"index": 0, "delta": "5", "finish_reason": "stop"}]}),
                     "choices[0].delta is a str"),
    "delta-content-number": (sse({"choices": [{"index": 0, "delta": {"content": 5},
                                               "finish_reason": "stop"}]}),
                             "choices[0].delta.content is a int"),
    "event-not-object": (sse([1, 2]), "a stream event is a JSON list"),
}


@pytest.mark.parametrize("name", [*MALFORMED, *MALFORMED_STREAMS])
def test_malformed_answers_are_retried_api_errors_naming_the_problem(
        server: Scripted, name: str) -> None:
    stream = name in MALFORMED_STREAMS
    body, problem = (MALFORMED_STREAMS if stream else MALFORMED)[name]
    server.routes[name] = lambda c, h, b: respond(
        c, body, ctype="text/event-stream" if stream else "application/json")
    attempts: list[Attempt] = []
    with pytest.raises(APIError) as info:
        call(server.url(name), stream=stream, retries=1, attempts=attempts)
    assert info.value.error_class == "api_error", info.value
    assert problem in str(info.value)
    assert [a.outcome for a in attempts] == ["api_error", "api_error"]


class SharingLimiter:
    def __init__(self) -> None:
        self.shared: list[float | None] = []

    def before_request(self, model: ModelSpec, est_tokens: int, *,
                       deadline: float | None = None) -> None:
        pass

    def on_response(self, model: ModelSpec, status: int, retry_after: float | None,
                    tokens: int) -> None:
        self.shared.append(retry_after)


def test_retry_after_above_the_maximum_is_endpoint_down_and_not_shared(server: Scripted) -> None:
    server.routes["later"] = lambda c, h, b: respond(
        c, b'{"error": {"message": "come back in an hour"}}', status="429 Too Many Requests",
        headers="Retry-After: 3600\r\n")
    attempts: list[Attempt] = []
    limiter = SharingLimiter()
    started = time.monotonic()
    with pytest.raises(APIError) as info:
        call(server.url("later"), retries=3, attempts=attempts, limiter=limiter,
             max_retry_after=60.0, task_deadline=time.monotonic() + 600)
    assert time.monotonic() - started < 2
    assert info.value.error_class == "endpoint_down" and info.value.status == 429
    assert "asked to wait 3600 s (Retry-After), more than max_retry_after 60 s" in str(info.value)
    assert len(attempts) == 1 and limiter.shared == [None]


# --- proxies ---------------------------------------------------------------------------


def test_a_refused_proxy_is_named_not_the_server(server: Scripted) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(APIError) as info:
        call("http://llmbench-test.invalid/v1",
             env={"http_proxy": f"http://user:pw@127.0.0.1:{port}"})
    text = str(info.value)
    assert info.value.error_class == "connection_error"
    assert f"the proxy http://127.0.0.1:{port} refused the connection" in text
    assert "is the server" not in text and "pw" not in text


def pump(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways on one thread (an SSL socket must not be used from two)."""
    for s in (a, b):
        s.setblocking(False)
    while True:
        readable = [s for s in (a, b) if isinstance(s, ssl.SSLSocket) and s.pending()]
        if not readable:
            readable, _, _ = select.select([a, b], [], [], 10)
            if not readable:
                return
        for src in readable:
            dst = b if src is a else a
            try:
                data = src.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                return
            if not data:
                return
            dst.setblocking(True)
            dst.sendall(data)
            dst.setblocking(False)


class TunnelProxy(ThreadedServer):
    """A CONNECT proxy to 127.0.0.1, over TLS (``https://``) or as SOCKS5."""

    def __init__(self, mode: str, cert: tuple[str, str] | None = None) -> None:
        self.mode, self.targets = mode, []
        self.context: ssl.SSLContext | None = None
        if cert is not None:
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(*cert)
        super().__init__(self._serve_one)

    def _serve_one(self, raw: socket.socket) -> None:
        client = raw
        if self.context is not None:
            client = self.context.wrap_socket(raw, server_side=True)
        with client:
            self._tunnel(client)

    def _tunnel(self, client: socket.socket) -> None:
        if self.mode == "socks5":
            port = self._socks_handshake(client)
        else:
            head, _ = read_request(client)
            target = head.decode("latin-1").split(" ")[1]
            self.targets.append(target)
            port = int(target.rsplit(":", 1)[1])
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        with socket.create_connection(("127.0.0.1", port)) as upstream:
            pump(client, upstream)

    def _socks_handshake(self, conn: socket.socket) -> int:
        greeting = conn.recv(2)  # version, number of methods, then the methods
        conn.recv(greeting[1])
        conn.sendall(b"\x05\x00")
        _ver, _cmd, _, atyp = conn.recv(4)
        name = (conn.recv(conn.recv(1)[0]).decode() if atyp == 3  # a domain name
                else socket.inet_ntoa(conn.recv(4)))
        (port,) = struct.unpack("!H", conn.recv(2))
        self.targets.append(f"{name}:{port}")
        conn.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + struct.pack("!H", port))
        return port


def test_https_proxy_tunnels_tls_to_a_self_signed_server(
        server: Scripted, tls_cert: tuple[str, str]) -> None:  # noqa: F811
    from test_api import TLSFront

    server.routes["tls"] = lambda c, h, b: respond(c, choice_answer({"content": "tunnelled"}))
    front = TLSFront(tls_cert, server.port)
    proxy = TunnelProxy("https", tls_cert)
    try:
        context = ssl.create_default_context(cafile=tls_cert[0])
        got = call(f"https://llmbench-sim.invalid:{front.port}/tls/v1", ssl_context=context,
                   api_key=KEY, env={"https_proxy": f"https://127.0.0.1:{proxy.port}"})
        assert got.text == "tunnelled"
        assert proxy.targets == [f"llmbench-sim.invalid:{front.port}"]
    finally:
        proxy.close()
        front.close()


def test_socks5_proxy(server: Scripted) -> None:
    server.routes["socks"] = lambda c, h, b: respond(c, choice_answer({"content": "socked"}))
    proxy = TunnelProxy("socks5")
    try:
        got = call(f"http://llmbench-test.invalid:{server.port}/socks/v1",
                   env={"all_proxy": f"socks5://127.0.0.1:{proxy.port}"})
        assert got.text == "socked"
        assert proxy.targets == [f"llmbench-test.invalid:{server.port}"]
    finally:
        proxy.close()


# --- the wall deadline of an attempt ---------------------------------------------------


def _trickle(server: Scripted, payload: bytes, gap: float) -> Handler:
    def send(conn: socket.socket, h: str, b: bytes) -> None:
        for i in range(len(payload)):
            if server.stopping.wait(gap):
                return
            conn.sendall(payload[i:i + 1])
    return send


@pytest.mark.parametrize("where", ["head", "body", "stream", "tls-handshake"])
def test_no_attempt_outlives_its_deadline_however_the_server_trickles(
        server: Scripted, where: str) -> None:
    answer = choice_answer({"content": "late"})
    if where == "head":
        handler = _trickle(server, b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 400 + b"\r\n", 0.05)
    elif where == "body":
        handler = _trickle(server, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(answer) + answer, 0.05)
    elif where == "stream":
        handler = _trickle(server, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
                           + sse({"choices": [{"index": 0, "delta": {"content": "x"}}]}) * 50,
                           0.02)
    url = server.url(where)
    silent: ThreadedServer | None = None
    if where == "tls-handshake":  # accepts, never answers the ClientHello
        silent = ThreadedServer(lambda conn: silent.stopping.wait(30) if silent else None)
        url = f"https://127.0.0.1:{silent.port}/v1"
    else:
        server.routes[where] = handler
    attempts: list[Attempt] = []
    started = time.monotonic()
    try:
        with pytest.raises(APIError) as info:
            # the task deadline (1.5 s) is below api_timeout (5 s): it bounds the whole call
            call(url, stream=where == "stream", retries=3, attempts=attempts,
                 task_deadline=started + 1.5)
    finally:
        if silent is not None:
            silent.close()
    elapsed = time.monotonic() - started
    assert info.value.error_class == "task_timeout", info.value
    assert elapsed < 1.5 + 1.0, elapsed  # min(api_timeout, task time left) + at most 1 s
    assert len(attempts) == 1 and attempts[0].outcome == "timeout"


def test_memory_of_the_calling_process_stays_within_a_small_multiple_of_the_cap(
        server: Scripted) -> None:
    import subprocess
    import sys

    server.routes["small"] = lambda c, h, b: respond(c, choice_answer({"content": "ok"}))
    server.routes["huge"] = _endless(server, "huge", b"HTTP/1.1 200 OK\r\nContent-Type: "
                                     b"application/json\r\nContent-Length: 419430400\r\n\r\n",
                                     b"[" * 65536)
    cap = 8 * 2**20
    code = f"""
import resource, sys
from pytest_llmbench.errors import APIError
from pytest_llmbench.providers.api import chat
from pytest_llmbench.records import Deadlines, ModelSpec
def call(route, **kw):
    model = ModelSpec(name="m", model="m", base_url="{server.url('ROUTE')}".replace("ROUTE", route),
                      **kw)
    return chat(model, [{{"role": "user", "content": "hi"}}], deadlines=Deadlines(api_retries=0),
                env={{}})
call("small")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    call("huge", max_response_bytes={cap})
except APIError as exc:
    assert "response too large" in str(exc), exc
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 4 * cap, f"the process grew by {grown} bytes for a cap of {cap}"


def test_calls_reuse_the_processs_connection_to_an_endpoint() -> None:
    accepted: list[int] = []

    def serve(conn: socket.socket) -> None:
        accepted.append(1)
        while True:
            head, _ = read_request(conn)
            if not head:
                return
            body = choice_answer({"content": "again"})
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)

    server = ThreadedServer(serve)
    try:
        for _ in range(3):
            assert call(f"http://127.0.0.1:{server.port}/v1").text == "again"
        assert len(accepted) == 1  # kept alive between calls (and items of one host)
    finally:
        server.close()


def test_a_last_stream_chunk_without_a_delta_is_fine(server: Scripted) -> None:
    server.routes["nodelta"] = lambda c, h, b: respond(c, sse(
        {"choices": [{"index": 0, "delta": {"content": "fi"}}]},
        {"choices": [{"index": 0, "delta": {"content": "ne"}}]},
        {"choices": [{"index": 0, "finish_reason": "stop"}]}), ctype="text/event-stream")
    got = call(server.url("nodelta"), stream=True)
    assert (got.text, got.finish_reason) == ("fine", "stop")
