"""The OpenAI-compatible simulator: routes, the chat completion endpoint, fault execution.

Every request's fate (rate limit, directive faults, server-wide fault rates, wrong answer)
is decided the moment it arrives, logged to the request log at once, then carried out; so a
client killed while waiting still leaves its request in the log, and a benchmark can count
exactly what the server did. Waiting is always ``asyncio.sleep`` (or waiting for the client
to leave): hundreds of slow requests cost nothing but memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import math
import os
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_llmbench.sim.agent import AGENT_MODES, Reply, agent_reply
from pytest_llmbench.sim.faults import (
    Directive,
    DirectiveError,
    RateWindow,
    fraction,
    message_text,
    parse_directives,
    request_key,
    strip_directives,
)
from pytest_llmbench.sim.httpproto import Connection, Request
from pytest_llmbench.sim.model import respond
from pytest_llmbench.sim.programs import PROGRAMS

log = logging.getLogger("pytest_llmbench.sim.server")

MODELS = ("sim",)
"""Listed by ``GET /v1/models``; requests may name any model."""

MAX_STREAM_PIECES = 16

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 408: "timeout",
                409: "conflict_error", 422: "invalid_request_error", 429: "rate_limit_error"}
_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded", 404: "not_found"}
_PIECE_RE = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """Server-wide settings (the command-line options of ``python -m pytest_llmbench.sim``)."""

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.0
    """Seconds before every answer."""
    jitter: float = 0.0
    """Up to this many seconds more, uniformly drawn per request."""
    error_rate: float = 0.0
    """Fraction of distinct conversations answered wrongly (chosen by hash + seed)."""
    hang_rate: float = 0.0
    """Fraction of distinct conversations never answered (chosen by hash + seed)."""
    fail_rate: float = 0.0
    """Probability of an immediate 500 for each request (random, seeded)."""
    rpm: int | None = None
    """Requests admitted per sliding 60 s window; beyond it 429 with Retry-After."""
    require_key: str | None = field(default=None, repr=False)
    """API key required as ``Authorization: Bearer KEY`` (never logged or shown)."""
    request_log: str | None = None
    """Append one JSON line per chat request, written when the request arrives."""
    seed: int = 0
    parent_pid: int | None = None
    """Exit when this process is no longer our parent (it died): no orphaned servers."""


@dataclass
class _Plan:
    """What the server does with one chat request, decided on arrival."""

    faults: list[str] = field(default_factory=list)
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    """Seconds before the first byte of the response."""
    stall: float = 0.0
    reset: bool = False
    hang: bool = False
    no_finish: bool = False
    wrong: bool = False


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    """An OpenAI-style error object."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error")
    error = {"message": message, "type": kind, "param": None,
             "code": code or _ERROR_CODES.get(status)}
    return json.dumps({"error": error}).encode()


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(timestamp: float) -> str:
    """An IMF-fixdate (RFC 9110), e.g. ``Sun, 06 Nov 1994 08:49:37 GMT``; seconds round up
    so the date is never earlier than asked (``email.utils`` costs 10 ms of start-up)."""
    t = time.gmtime(math.ceil(timestamp))
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


def _directive_plan(now: float, d: Directive) -> _Plan:
    """The faults a directive asks for (it applies to this request)."""
    plan = _Plan()
    if d.fail is not None:
        plan.faults.append(f"fail={d.fail}")
        plan.status, plan.message = d.fail, f"simulated failure (fail={d.fail})"
        if d.retry_after is not None:
            plan.headers["Retry-After"] = f"{d.retry_after:g}"
        if d.retry_after_ms is not None:
            plan.headers["retry-after-ms"] = str(d.retry_after_ms)
        if d.retry_after_date is not None:
            plan.headers["Retry-After"] = http_date(now + d.retry_after_date)
    elif d.reset:
        plan.faults.append("reset")
        plan.reset = True
    elif d.hang:
        plan.faults.append("hang")
        plan.hang = True
    if d.latency is not None:
        plan.faults.append(f"latency={d.latency:g}")
    for name in ("slow_first_token", "stall"):
        value = getattr(d, name)
        if value is not None:
            plan.faults.append(f"{name}={value:g}")
    plan.stall = d.stall or 0.0
    plan.no_finish, plan.wrong = d.no_finish, d.wrong
    if d.no_finish:
        plan.faults.append("no_finish")
    if d.wrong:
        plan.faults.append("wrong")
    return plan


def _truncate(text: str, max_words: int) -> str | None:
    """``text`` cut after ``max_words`` words, or ``None`` if it is not longer."""
    if len(text.split()) <= max_words:
        return None
    match = re.match(rf"\s*(?:\S+\s+){{{max_words}}}", text)
    return None if match is None else match.group(0).rstrip()


class SimApp:
    """The request handler: holds the server's state (counts, rate window, log, RNGs)."""

    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.counts: collections.Counter[str] = collections.Counter()
        self.window = RateWindow(options.rpm) if options.rpm else None
        self._jitter_rng = random.Random(f"jitter:{options.seed}")
        self._fail_rng = random.Random(f"fail:{options.seed}")
        self._ids = 0
        self._log_fd: int | None = None
        if options.request_log:
            self._log_fd = os.open(options.request_log,
                                   os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._key = options.require_key.encode() if options.require_key else None

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    # -- routing ---------------------------------------------------------------------------

    async def handle(self, req: Request, conn: Connection) -> None:
        path = req.path.rstrip("/") or "/"
        if path == "/health":
            conn.respond(200, b"ok", content_type="text/plain")
            return
        if path in ("/v1/chat/completions", "/chat/completions"):
            if req.method != "POST":
                conn.respond(405, error_body(405, "use POST"), headers={"Allow": "POST"})
                return
            await self.chat(req, conn)
            return
        if path == "/v1/models" or path.startswith("/v1/models/"):
            if not self._authorized(req):
                conn.respond(401, error_body(401, "invalid or missing API key"))
                return
            name = path[len("/v1/models/"):] if path.startswith("/v1/models/") else ""
            conn.respond(200, json.dumps(self._model(name) if name else {
                "object": "list", "data": [self._model(m) for m in MODELS]}).encode())
            return
        conn.respond(404, error_body(404, f"no route for {req.method} {req.path}"))

    @staticmethod
    def _model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "pytest-llmbench"}

    def _authorized(self, req: Request) -> bool:
        if self._key is None:
            return True
        given = req.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self._key)

    def _log(self, now: float, key: str | None, model: Any, stream: bool, n: int | None,
             fault: str | None) -> None:
        if self._log_fd is None:
            return
        line = json.dumps({"t": round(now, 6), "key": key, "model": model, "stream": stream,
                           "n": n, "fault": fault}, ensure_ascii=False)
        os.write(self._log_fd, (line + "\n").encode())

    # -- the chat endpoint -----------------------------------------------------------------

    async def chat(self, req: Request, conn: Connection) -> None:
        now = time.time()
        body: Any = None
        with contextlib.suppress(ValueError):
            body = json.loads(req.body)
        stream = bool(body.get("stream")) if isinstance(body, dict) else False
        model = body.get("model") if isinstance(body, dict) else None
        if not self._authorized(req):
            self._log(now, None, model, stream, None, "unauthorized")
            conn.respond(401, error_body(401, "invalid or missing API key"))
            return
        problem = self._invalid(body)
        if problem:
            self._log(now, None, model, stream, None, "bad_request")
            conn.respond(400, error_body(400, problem))
            return
        messages = body["messages"]
        key = request_key(body["model"], messages)
        self.counts[key] += 1
        n = self.counts[key]
        last_user = next((message_text(m.get("content")) for m in reversed(messages)
                          if m.get("role") == "user"), "")
        try:
            directive = parse_directives(last_user)
            if directive.program is not None and directive.program not in PROGRAMS:
                raise DirectiveError(f"unknown sim program {directive.program!r}; known: "
                                     + ", ".join(sorted(PROGRAMS)))
            if directive.agent is not None and directive.agent not in AGENT_MODES:
                raise DirectiveError(f"unknown sim agent mode {directive.agent!r}; known: "
                                     + ", ".join(AGENT_MODES))
        except DirectiveError as exc:
            self._log(now, key, model, stream, n, "bad_directive")
            conn.respond(400, error_body(400, str(exc), "invalid_sim_directive"))
            return
        cleaned = [{"role": m.get("role"), "content": strip_directives(message_text(
            m.get("content")))} for m in messages]
        plan = self._plan(now, directive, n, cleaned)
        self._log(now, key, model, stream, n, " ".join(plan.faults) or None)
        log.info("chat key=%s n=%d stream=%s fault=%s", key, n, stream, plan.faults)
        await self._execute(plan, conn, body, directive, cleaned, stream)

    @staticmethod
    def _invalid(body: Any) -> str:
        if not isinstance(body, dict):
            return "the request body must be a JSON object"
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "'model' is required (a string)"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return "'messages' must be a non-empty array of {role, content} objects"
        if body.get("tools") is not None and not _valid_tools(body["tools"]):
            return "'tools' must be an array of {type: function, function: {name, parameters}}"
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or value < 1):
                return f"'{name}' must be a positive integer"
        return ""

    def _plan(self, now: float, d: Directive, n: int, cleaned: list[dict[str, Any]]) -> _Plan:
        """The request's fate, in the documented order: ``--rpm``, directive faults (within
        ``times``), server-wide hang/fail/error rates, then the latency."""
        limited = self._rate_limited(now)
        if limited is not None:
            return limited
        applies = not d.empty and (d.times is None or n <= d.times)
        plan = _directive_plan(now, d) if applies else _Plan()
        if plan.status != 200 or plan.reset or plan.hang:
            plan.delay = d.latency or 0.0  # errors come at once unless latency= is given
            return plan
        if self._server_faults(plan, cleaned):
            return plan
        if applies and d.latency is not None:
            plan.delay = d.latency
        else:
            opts = self.options
            plan.delay = opts.latency + (self._jitter_rng.uniform(0, opts.jitter)
                                         if opts.jitter else 0.0)
        if applies:
            plan.delay += d.slow_first_token or 0.0
        return plan

    def _rate_limited(self, now: float) -> _Plan | None:
        """A 429 plan when ``--rpm`` refuses the request, else None."""
        wait = self.window.admit(now) if self.window is not None else 0.0
        if not wait:
            return None
        return _Plan(faults=["rate_limit"], status=429,
                     message="rate limit reached (simulated --rpm)",
                     headers={"Retry-After": str(math.ceil(wait)),
                              "retry-after-ms": str(math.ceil(wait * 1000))})

    def _server_faults(self, plan: _Plan, cleaned: list[dict[str, Any]]) -> bool:
        """``--hang-rate``, ``--fail-rate`` (True: the plan is final), ``--error-rate``."""
        opts = self.options
        if opts.hang_rate and fraction("hang", opts.seed, cleaned) < opts.hang_rate:
            plan.faults.append("hang_rate")
            plan.hang = True
            return True
        if opts.fail_rate and self._fail_rng.random() < opts.fail_rate:
            plan.faults.append("fail_rate")
            plan.status, plan.message = 500, "simulated server error (--fail-rate)"
            return True
        if (not plan.wrong and opts.error_rate
                and fraction("error", opts.seed, cleaned) < opts.error_rate):
            plan.faults.append("error_rate")
            plan.wrong = True
        return False

    async def _execute(self, plan: _Plan, conn: Connection, body: dict[str, Any],
                       d: Directive, cleaned: list[dict[str, Any]], stream: bool) -> None:
        if plan.hang:
            await conn.wait_gone()
            conn.close_after = True
            return
        if plan.delay > 0:
            await asyncio.sleep(plan.delay)
        if plan.reset:
            conn.close_after = True
            conn.reset()
            return
        if plan.status != 200:
            conn.respond(plan.status, error_body(plan.status, plan.message),
                         headers=self._rate_headers(plan.headers))
            return
        reply = _reply(body, d, cleaned, plan.wrong)
        answer = reply.text
        finish: str | None = "tool_calls" if reply.tool_calls else "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit:
            cut = _truncate(answer, limit)
            if cut is not None:
                answer, finish = cut, "length"
        if plan.no_finish:
            finish = None
        prompt_tokens = sum(len(message_text(m.get("content")).split())
                            for m in body["messages"])
        completion_tokens = len(answer.split()) + sum(
            len(c["arguments"].split()) + 1 for c in reply.tool_calls)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        self._ids += 1
        head = {"id": f"chatcmpl-sim{os.getpid():x}{self._ids:08x}", "created": int(time.time()),
                "model": body["model"], "system_fingerprint": "sim"}
        calls = [{"id": f"call_{self._ids:x}_{i}", "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for i, c in enumerate(reply.tool_calls)]
        if stream:
            options = body.get("stream_options")
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            await self._stream(conn, head, answer, finish, usage if include_usage else None,
                               plan.stall, calls)
            return
        if plan.stall:
            await asyncio.sleep(plan.stall)
        message: dict[str, Any] = {"role": "assistant", "content": answer or None}
        if calls:
            message["tool_calls"] = calls
        else:
            message["content"] = answer
        data = {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": usage}
        conn.respond(200, json.dumps(data, ensure_ascii=False).encode(),
                     headers=self._rate_headers({}))

    def _rate_headers(self, headers: dict[str, str]) -> dict[str, str]:
        if self.window is not None:
            headers["x-ratelimit-limit-requests"] = str(self.window.rpm)
        return headers

    async def _stream(self, conn: Connection, head: dict[str, Any], answer: str,
                      finish: str | None, usage: dict[str, int] | None, stall: float,
                      calls: list[dict[str, Any]]) -> None:
        base = {**head, "object": "chat.completion.chunk"}

        def event(delta: dict[str, Any], reason: str | None) -> bytes:
            data = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason,
                                         "logprobs": None}]}
            return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

        pieces = _PIECE_RE.findall(answer)
        if len(pieces) > MAX_STREAM_PIECES:
            size = math.ceil(len(pieces) / MAX_STREAM_PIECES)
            pieces = ["".join(pieces[i:i + size]) for i in range(0, len(pieces), size)]
        events = [event({"role": "assistant", "content": ""}, None)]
        events.extend(event({"content": p}, None) for p in pieces)
        events.extend(_tool_call_events(calls, event))
        if finish is not None:
            events.append(event({}, finish))
        if usage is not None:
            events.append(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode()
                          + b"\n\n")
        events.append(b"data: [DONE]\n\n")
        conn.start_chunked(200, content_type="text/event-stream",
                           headers=self._rate_headers({"Cache-Control": "no-cache"}))
        if stall:
            conn.send_chunks(events[:2])  # the role chunk and the first piece
            await asyncio.sleep(stall)
            events = events[2:]
        conn.send_chunks(events, last=True)
        await conn.drain()


async def serve(options: SimOptions, ready: Callable[[str], None]) -> None:
    """Run the server until SIGTERM/SIGINT (or the parent's death); ``ready(base_url)`` is
    called once the socket listens."""
    loop = asyncio.get_running_loop()
    app = SimApp(options)
    connections: set[Connection] = set()
    server = await loop.create_server(lambda: Connection(app.handle, connections),
                                      options.host, options.port, backlog=4096,
                                      reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    host = options.host if ":" not in options.host else f"[{options.host}]"
    watcher = None
    if options.parent_pid is not None:
        watcher = loop.create_task(_watch_parent(options.parent_pid, stop))
    ready(f"http://{host}:{port}/v1")
    try:
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        server.close()
        for conn in list(connections):
            conn.abort()
        await asyncio.sleep(0)  # let connection_lost callbacks cancel the handlers
        app.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.warning("parent process %d is gone: stopping", parent_pid)
    stop.set()


def _valid_tools(tools: Any) -> bool:
    """An array of OpenAI function tools (what the agent reads of them is there)."""
    return isinstance(tools, list) and all(
        isinstance(t, dict) and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
        and isinstance(t["function"].get("parameters", {}), dict) for t in tools)


def _reply(body: dict[str, Any], d: Directive, cleaned: list[dict[str, Any]],
           wrong: bool) -> Reply:
    """What the simulated model says: a literal answer, a program, the agent's next step
    (when the request offers tools), or the rule-based model's answer."""
    if d.answer is not None:
        return Reply(text=d.answer)
    if d.program is not None:
        return Reply(text=PROGRAMS[d.program])
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        reply = agent_reply(body["messages"], tools, d.agent)
        if reply is not None:
            return reply
    return Reply(text=respond(cleaned, wrong=wrong))


def _tool_call_events(calls: list[dict[str, Any]],
                      event: Callable[[dict[str, Any], str | None], bytes]) -> list[bytes]:
    """Tool calls as streamed deltas: id and name first, then the arguments in two pieces
    (clients must join them by ``index``)."""
    events = []
    for i, call in enumerate(calls):
        args = call["function"]["arguments"]
        half = len(args) // 2
        events.append(event({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                             "function": {"name": call["function"]["name"],
                                                          "arguments": ""}}]}, None))
        for piece in (args[:half], args[half:]):
            events.append(event({"tool_calls": [{"index": i, "function": {"arguments": piece}}]},
                                None))
    return events
