"""The SDK side of the OpenAI-compatible provider: clients, one attempt, its classification.

Kept apart from ``openai_compat.py`` so that choosing the provider (in the pytest process,
at collection) does not import the ``openai`` SDK (~0.8 s of CPU): only the processes that
send requests import this module (the fork server's warm-up, before it forks the hosts;
the pytest process before it forks an item itself, or when the ``llm`` fixture calls).
See ``openai_compat.py`` for what the provider does.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import httpx2
import openai

from pytest_llmbench.errors import APIError, AttemptFailure, classify_status
from pytest_llmbench.providers import answers, wire
from pytest_llmbench.providers.base import ChatRequest, parse_retry_after
from pytest_llmbench.providers.endpoint import (
    Endpoint,
    default_ssl_context,
    parse_endpoint,
    proxy_display,
    proxy_for,
)
from pytest_llmbench.records import Completion, ModelSpec
from pytest_llmbench.scrub import scrub

_READ_SIZE = 65536
_ERROR_BODY_MAX = 65536


@cache
def _plain_context() -> ssl.SSLContext:
    """For plain-HTTP endpoints: never used to verify anything, and free to build."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class _Clients:
    """This process's SDK clients, one per endpoint, key and connection settings: an item
    host keeps its connections alive from one item to the next, and the items sharing it
    (threads) build one client, not one each."""

    def __init__(self) -> None:
        self._by_ident: dict[tuple[Any, ...], openai.OpenAI] = {}
        self._lock = threading.Lock()

    def get(self, ident: tuple[Any, ...], build: Callable[[], openai.OpenAI]) -> openai.OpenAI:
        cached = self._by_ident.get(ident)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._by_ident.get(ident)
            if cached is None:
                cached = self._by_ident[ident] = build()
            return cached

    def reset(self) -> None:
        """Forget every client. Also after a fork: a forked process must not share its
        parent's kept-alive connections (both would read the same socket), nor a lock
        another thread held at the fork (never released in the child)."""
        self._by_ident = {}
        self._lock = threading.Lock()


_clients = _Clients()
os.register_at_fork(after_in_child=_clients.reset)


def _client(request: ChatRequest, ep: Endpoint, proxy: str | None) -> openai.OpenAI:
    model, key = request.model, request.api_key
    context = request.ssl_context
    if context is None:
        tls = ep.scheme == "https" or (proxy or "").startswith("https:")
        context = default_ssl_context() if tls else _plain_context()
    headers = tuple(sorted(model.headers.items()))
    ident = (ep.base, ep.query, key, model.api_version, headers, proxy, context,
             model.max_connections)
    return _clients.get(ident, lambda: _new_client(model, key, ep, proxy, context))


def _new_client(model: ModelSpec, key: str | None, ep: Endpoint, proxy: str | None,
                context: ssl.SSLContext) -> openai.OpenAI:
    proxy_arg: httpx2.Proxy | None = None
    if proxy:
        try:
            proxy_arg = httpx2.Proxy(proxy, ssl_context=context if proxy.startswith("https:")
                                     else None)
        except (ValueError, TypeError) as exc:  # never echo the URL: it may hold a password
            raise APIError(f"unusable {ep.scheme}_proxy setting ({type(exc).__name__}); "
                           f"set no_proxy={ep.host} to bypass it", "connection_error") from None
    limit = model.max_connections or 100
    try:
        transport = httpx2.HTTPTransport(verify=context, proxy=proxy_arg, trust_env=False,
                                         limits=httpx2.Limits(max_connections=limit,
                                                              max_keepalive_connections=limit))
    except ImportError as exc:  # socks5:// without socksio
        raise APIError(f"{ep.scheme}_proxy: {exc}", "connection_error") from None
    http = httpx2.Client(transport=wire.install(transport), trust_env=False, timeout=None,
                         follow_redirects=False)
    common: dict[str, Any] = {
        # No key: no Authorization header (a local server), not the SDK's "missing key".
        "api_key": key or "", "_enforce_credentials": False,
        "base_url": ep.base, "http_client": http, "max_retries": 0,
        "default_query": dict(ep.query) or None,
        "default_headers": dict(model.headers),
    }
    if model.api_version or ep.azure:
        version = model.api_version or dict(ep.query).get("api-version")
        if not version:
            raise APIError(f"model {model.name!r}: Azure OpenAI needs api_version in the "
                           "model's config (e.g. api_version = \"2024-06-01\")", "bad_request")
        common["default_query"] = {k: v for k, v in ep.query if k != "api-version"} or None
        client: openai.OpenAI = openai.AzureOpenAI(
            api_version=version, **common)
    else:
        client = openai.OpenAI(**common)
    return client


# --- reading the answer --------------------------------------------------------------------


def _body_chunks(response: httpx2.Response, guard: wire.Guard) -> Iterator[bytes]:
    """The decoded body (gzip, deflate...), the decoded bytes capped too (a small gzip body
    may inflate to gigabytes)."""
    size = 0
    for chunk in response.iter_bytes(_READ_SIZE):
        size += len(chunk)
        if size > guard.cap:
            guard.too_large = True
            raise answers.too_large(guard.cap)
        yield chunk


def _read_stream(response: httpx2.Response, guard: wire.Guard, model: str,
                 key: str | None) -> Completion:
    from openai._streaming import SSEDecoder

    answer = answers.StreamAnswer(model, guard.cap, (key,))
    for event in SSEDecoder().iter_bytes(_body_chunks(response, guard)):
        data = event.data.strip()
        if not data:
            continue
        if data == "[DONE]":
            break
        answer.add(answers.load_json(data, "a stream event", key))
    return answer.completion()


def _error_detail(response: httpx2.Response, key: str | None) -> str:
    try:
        raw = response.content[:_ERROR_BODY_MAX]
    except (httpx2.HTTPError, RuntimeError):  # not read (streamed) or cut: no detail
        return ""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err:
            text = str(err)
    text = scrub(" ".join(text.split()), key)
    return scrub(text[:300], key) + ("..." if len(text) > 300 else "")


def _retry_after(response: httpx2.Response) -> float | None:
    return parse_retry_after(dict(response.headers))


def _status_failure(exc: openai.APIStatusError, key: str | None) -> AttemptFailure:
    response = exc.response
    status = response.status_code
    detail = _error_detail(response, key)
    outcome, retryable = classify_status(status)
    error = f"HTTP {status} {response.reason_phrase}".rstrip() + (f": {detail}" if detail else "")
    if 300 <= status < 400:
        error += " (redirects are not followed; check the base URL)"
    return AttemptFailure(outcome, error, retryable, status, _retry_after(response))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _connection_failure(exc: BaseException, ep: Endpoint, proxy: str | None,
                        key: str | None, *, streaming: bool, got_status: bool) -> AttemptFailure:
    """An exception below HTTP (connect, TLS, reset, cut body) as an attempt outcome."""
    chain = list(_causes(exc))
    if any(isinstance(e, (httpx2.TimeoutException, TimeoutError)) for e in chain):
        return AttemptFailure("timeout", "", True)
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return AttemptFailure("connection_error",
                                  f"TLS certificate rejected: {e.verify_message}", False)
    refused = any(isinstance(e, ConnectionRefusedError) for e in chain)
    if refused and proxy:
        return AttemptFailure("connection_error",
                              f"the proxy {proxy_display(proxy)} refused the connection "
                              f"(from {ep.scheme}_proxy/all_proxy; set no_proxy={ep.host} "
                              "to bypass it)", True)
    if refused:
        return AttemptFailure("connection_error", "connection refused", True)
    for e in chain:
        if isinstance(e, OSError) and type(e).__name__ == "gaierror":
            return AttemptFailure("connection_error",
                                  f"cannot resolve host {ep.host!r}: {e.strerror}", True)
        if type(e).__name__ == "ProxyError":
            return AttemptFailure("connection_error",
                                  f"the proxy {proxy_display(proxy or '')} failed: "
                                  f"{scrub(str(e)[:200], key)}", True)
    if streaming:
        return AttemptFailure("truncated", f"stream cut: {type(chain[-1]).__name__}", True)
    if not got_status and any("without sending a response" in str(e) for e in chain):
        return AttemptFailure("connection_error",
                              "server closed the connection without a response", True)
    what = "response body cut short" if got_status else "connection failed"
    return AttemptFailure("connection_error",
                          f"{what} ({scrub(str(chain[-1])[:200], key) or type(chain[-1]).__name__})",
                          True)


# --- one attempt -------------------------------------------------------------------------------


def send(request: ChatRequest, body: dict[str, Any], deadline: float) -> Completion:
    """One attempt of ``OpenAIProvider.send``."""
    ep = parse_endpoint(request.model.base_url)
    proxy = proxy_for(ep, os.environ if request.env is None else request.env)
    client = _client(request, ep, proxy)
    key = request.api_key
    headers: dict[str, Any] = dict(request.extra_headers)
    if not key:  # no key: no Authorization header (a local server), as the SDK allows
        headers.setdefault("Authorization", openai.Omit())
    guard = wire.Guard(deadline, request.model.max_response_bytes)
    streaming = got_status = False
    try:
        with wire.guarding(guard):
            timeout = max(0.001, deadline - time.monotonic())
            response = client.post(
                "/chat/completions", cast_to=httpx2.Response, body=body, stream=True,
                options={"timeout": timeout, "headers": headers})
            got_status = True
            try:
                ctype = response.headers.get("content-type", "").lower()
                if body.get("stream") and not ctype.startswith("application/json"):
                    streaming = True
                    return _read_stream(response, guard, request.model.model, key)
                data = answers.load_json(b"".join(_body_chunks(response, guard)),
                                         "the HTTP 200 body", key)
                return answers.completion_from_json(data, request.model.model, key)
            finally:
                response.close()
    except AttemptFailure:
        raise
    except openai.APIStatusError as exc:
        raise _status_failure(exc, key) from None
    except (openai.APIConnectionError, httpx2.HTTPError, OSError) as exc:
        if guard.too_large:
            raise answers.too_large(guard.cap) from None
        failure = _connection_failure(exc, ep, proxy, key, streaming=streaming,
                                      got_status=got_status)
        raise failure from None


def warm_up() -> None:
    """Run one request path through the SDK (to a loopback port nobody listens on), so the
    hosts forked after this inherit every lazy import instead of paying for it on their
    first item."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = ModelSpec(name="warm-up", model="warm-up", base_url=f"http://127.0.0.1:{port}/v1")
    request = ChatRequest(model=model, messages=[{"role": "user", "content": "-"}], env={})
    with contextlib.suppress(AttemptFailure):  # refused, as intended
        send(request, {"model": "warm-up", "messages": list(request.messages), "stream": False},
             time.monotonic() + 1.0)
    # pydantic builds a model's validators on its first construction (~50 ms of CPU for the
    # answer types): do it here once, not in every host on its first answer.
    call = {"index": 0, "id": "c", "type": "function",
            "function": {"name": "f", "arguments": "{}"}}
    usage = {"prompt_tokens": 1, "completion_tokens": 1}
    logprobs = {"content": [{"token": "a", "logprob": 0.0, "bytes": [97], "top_logprobs": []}]}
    answers.completion_from_json({"model": "m", "usage": usage, "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": logprobs, "message": {
            "role": "assistant", "content": "a", "refusal": None, "tool_calls": [call]}}]}, "m")
    stream = answers.StreamAnswer("m", 1 << 20, ())
    stream.add({"model": "m", "usage": usage, "choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": logprobs,
         "delta": {"role": "assistant", "content": "a", "tool_calls": [call]}}]})
    stream.completion()
    _clients.reset()  # a host builds its own (its connections are its own)
