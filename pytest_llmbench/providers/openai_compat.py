"""The plugin's own provider: OpenAI-compatible endpoints through the official ``openai`` SDK.

One attempt = one ``POST {base_url}/chat/completions`` made by the SDK's client (``OpenAI``,
or ``AzureOpenAI`` when the model's config has ``api_version`` or its host is
``*.openai.azure.com``), with the SDK's retries off (``max_retries=0``): the retry policy,
Retry-After handling and error classes are the API layer's (``api.py``).

* **Clients.** One per endpoint, key, proxy and TLS context, cached for the life of the
  process: an item host keeps its connections alive between the items it runs. ``import
  openai`` (~0.8 s of CPU) and a first request (lazy imports) happen once, in the fork
  server's warm-up (``warm_up``), before it forks the hosts.
* **Deadline and size.** The SDK returns the raw ``httpx`` response as soon as its headers
  arrive (``cast_to=httpx2.Response, stream=True``); the body is read here, chunk by chunk,
  under ``wire.Guard``: every socket operation gets only the time left until the attempt's
  deadline, and the bytes read (on the wire and decoded, gzip included) are capped at the
  model's ``max_response_bytes`` (default 32 MiB). Past it the connection is dropped and the
  attempt is an ``api_error`` "response too large" (not retried).
* **Answers.** JSON bodies and server-sent events become the SDK's ``ChatCompletion`` /
  ``ChatCompletionChunk`` and then our ``Completion`` (``answers.py``), with tool calls,
  content parts, refusal, reasoning text, logprobs and usage; a stream asks for usage
  (``stream_options.include_usage``) unless the params say otherwise.
* **Proxies.** ``http_proxy``/``https_proxy``/``all_proxy`` (``http://``, ``https://``,
  ``socks5://``) and ``no_proxy`` (names, domain suffixes, ``host:port``, IP addresses and
  CIDR ranges, ``*``), read from the environment the item runs with. Loopback hosts never
  go through a proxy, so the built-in simulator works behind a corporate proxy.
* **Classification.** HTTP statuses by ``errors.classify_status``; timeouts, refused
  connections (naming the proxy when it is the proxy that refused), resets, TLS certificate
  errors, a stream cut short (``truncated``) and malformed answers each to their outcome.
  Every text quoting the server's bytes goes through ``scrub.scrub``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib import request as _urllib_request
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import httpx2
import openai

from pytest_llmbench.errors import APIError, AttemptFailure, classify_status
from pytest_llmbench.providers import answers, wire
from pytest_llmbench.providers.base import ChatRequest
from pytest_llmbench.records import Completion, ModelSpec
from pytest_llmbench.scrub import scrub

__all__ = ["Endpoint", "OpenAIProvider", "default_ssl_context", "parse_endpoint", "proxy_for",
           "warm_up"]

_READ_SIZE = 65536
_ERROR_BODY_MAX = 65536
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "::1"})


@dataclass(frozen=True)
class Endpoint:
    """Where a model is reached, parsed once from ``ModelSpec.base_url``."""

    scheme: str
    host: str
    port: int
    base: str
    """The base URL without its query string (the SDK appends ``/chat/completions``)."""
    query: tuple[tuple[str, str], ...]
    """The base URL's query (``api-version=...``), sent with every request."""
    display: str
    """The base URL for messages: no credentials, no query string."""
    azure: bool


@cache
def parse_endpoint(base_url: str) -> Endpoint:
    """Split a base URL; an invalid one is an ``APIError`` (``bad_request``)."""
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError as exc:
        raise APIError(f"invalid base URL {base_url!r}: {exc}", "bad_request") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("http", "https") or not host:
        raise APIError(
            f"invalid base URL {base_url!r}: expected http(s)://host[:port]/path", "bad_request")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc += f":{port}"
    path = parts.path.rstrip("/")
    display = f"{scheme}://{netloc}{path}"
    auth = parts.netloc.rpartition("@")[0]
    base = urlunsplit((scheme, f"{auth}@{netloc}" if auth else netloc, path, "", ""))
    azure = host == "openai.azure.com" or host.endswith(".openai.azure.com")
    return Endpoint(scheme, host, port or (443 if scheme == "https" else 80), base,
                    tuple(parse_qsl(parts.query)), display, azure)


# --- proxies ------------------------------------------------------------------------------


# stdlib's no_proxy matching (names, domain suffixes, host:port); untyped in typeshed
_bypass: Any = getattr(_urllib_request, "proxy_bypass_environment")  # noqa: B009


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _in_cidr(host: str, no_proxy: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    for entry in no_proxy.replace(" ", ",").split(","):
        if "/" in entry:
            try:
                if address in ipaddress.ip_network(entry.strip(), strict=False):
                    return True
            except ValueError:
                continue
    return False


def proxy_for(ep: Endpoint, env: Mapping[str, str]) -> str | None:
    """The proxy URL for ``ep`` from ``env`` (``*_proxy``, ``no_proxy``), or None."""
    if _is_loopback(ep.host):
        return None
    no_proxy = env.get("no_proxy", env.get("NO_PROXY", ""))
    if no_proxy and (_in_cidr(ep.host, no_proxy) or _bypass(
            f"{ep.host}:{ep.port}", {"no": no_proxy})):
        return None
    name = f"{ep.scheme}_proxy"
    url = (env.get(name) or env.get(name.upper()) or env.get("all_proxy")
           or env.get("ALL_PROXY") or "").strip()
    if not url:
        return None
    return url if "://" in url else "http://" + url


def _proxy_display(url: str) -> str:
    """The proxy URL without credentials (it may hold a password)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))


# --- clients ------------------------------------------------------------------------------


@cache
def default_ssl_context() -> ssl.SSLContext:
    """The verifying TLS context, built once per process (loading the CA bundle costs
    ~45 ms; the fork server builds it before forking when a model uses HTTPS)."""
    return ssl.create_default_context()


@cache
def _plain_context() -> ssl.SSLContext:
    """For plain-HTTP endpoints: never used to verify anything, and free to build."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


_clients: dict[tuple[Any, ...], openai.OpenAI] = {}
# A process forked from one that used a client must not share its kept-alive connections
# (both would read the same socket): it builds its own.
os.register_at_fork(after_in_child=_clients.clear)


def _client(request: ChatRequest, ep: Endpoint, proxy: str | None) -> openai.OpenAI:
    model, key = request.model, request.api_key
    context = request.ssl_context
    if context is None:
        tls = ep.scheme == "https" or (proxy or "").startswith("https:")
        context = default_ssl_context() if tls else _plain_context()
    headers = tuple(sorted(model.headers.items()))
    ident = (ep.base, ep.query, key, model.api_version, headers, proxy, context,
             model.max_connections)
    cached = _clients.get(ident)
    if cached is not None:
        return cached
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
    _clients[ident] = client
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
    from pytest_llmbench.providers.api import parse_retry_after

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
                              f"the proxy {_proxy_display(proxy)} refused the connection "
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
                                  f"the proxy {_proxy_display(proxy or '')} failed: "
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


# --- the provider ---------------------------------------------------------------------------


class OpenAIProvider:
    """OpenAI-compatible ``/chat/completions`` through the ``openai`` SDK (the default)."""

    def endpoint(self, model: ModelSpec) -> str:
        return parse_endpoint(model.base_url).display

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        model = request.model
        merged = {**model.params, **request.params}
        body: dict[str, Any] = {"model": model.model, "messages": list(request.messages),
                                **merged, "stream": model.stream}
        if request.tools:
            body["tools"] = [dict(tool) for tool in request.tools]
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if model.stream and "stream_options" not in merged:
            body["stream_options"] = {"include_usage": True}
        return {k: v for k, v in body.items() if v is not None}

    def send(self, request: ChatRequest, body: dict[str, Any], deadline: float) -> Completion:
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


# --- fork server -----------------------------------------------------------------------------


def warm_up() -> None:
    """Import the SDK and run one request path through it (to a loopback port nobody
    listens on), so the hosts forked after this inherit every lazy import instead of paying
    for it on their first item."""
    import socket

    from pytest_llmbench.providers.base import ChatRequest as _Request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = ModelSpec(name="warm-up", model="warm-up", base_url=f"http://127.0.0.1:{port}/v1")
    request = _Request(model=model, messages=[{"role": "user", "content": "-"}], env={})
    provider = OpenAIProvider()
    with contextlib.suppress(AttemptFailure):  # refused, as intended
        provider.send(request, provider.build_body(request), time.monotonic() + 1.0)
    _clients.clear()  # a host builds its own (its connections are its own)
