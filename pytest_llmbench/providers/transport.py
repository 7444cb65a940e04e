"""The HTTP transport of a chat call: where the request goes and how its bytes are read.

The endpoint and the request (``Endpoint``, ``build_request``), the proxy choice
(``proxy_for``), the TLS context and the deadline-aware readers every ``recv`` of an attempt
goes through. No retry policy and no parsing of answers: ``api.py`` runs the attempts and
decides what their outcomes mean (its docstring gives the transport choices: ``http.client``,
one connection per attempt, proxies, Azure), ``responses.py`` parses what came back. Kept
apart so the policy reads without the socket plumbing.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib.parse import unquote, urlsplit

from pytest_llmbench.errors import APIError
from pytest_llmbench.records import Message, ModelSpec

_READ_SIZE = 65536
_USER_AGENT = "pytest-llmbench"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "::1"})


# --- request building -------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the request goes, parsed once from ``ModelSpec.base_url``."""

    scheme: str
    host: str
    port: int
    target: str
    """Path plus query of ``.../chat/completions``."""
    display: str
    """The base URL for messages: no credentials, no query string."""
    azure: bool


def parse_endpoint(base_url: str) -> Endpoint:
    """Split a base URL; the query string is kept on the target (Azure's api-version)."""
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError as exc:
        raise APIError(f"invalid base URL {base_url!r}: {exc}", "bad_request") from None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("http", "https") or not host:
        raise APIError(
            f"invalid base URL {base_url!r}: expected http(s)://host[:port]/path", "bad_request"
        )
    if port is None:
        port = 443 if scheme == "https" else 80
    path = parts.path.rstrip("/") + "/chat/completions"
    target = f"{path}?{parts.query}" if parts.query else path
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    display = f"{scheme}://{netloc}{parts.path.rstrip('/')}"
    azure = host == "openai.azure.com" or host.endswith(".openai.azure.com")
    return Endpoint(scheme, host, port, target, display, azure)


@dataclass(frozen=True)
class Request:
    """A prepared chat request (headers may hold the key: never log this object)."""

    endpoint: Endpoint
    body: bytes
    headers: dict[str, str]
    est_tokens: int

    def target_for(self, proxy: tuple[str, int, dict[str, str]] | None) -> str:
        """Origin-form target, or absolute-form when a plain-HTTP proxy forwards the request."""
        ep = self.endpoint
        if proxy and ep.scheme == "http":
            netloc = f"[{ep.host}]" if ":" in ep.host else ep.host
            return f"http://{netloc}:{ep.port}{ep.target}"
        return ep.target


def build_request(
    model: ModelSpec,
    messages: Sequence[Message],
    params: Mapping[str, Any] | None = None,
    api_key: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> Request:
    """Body and headers of the call; params override the model's defaults, None drops a key.
    ``tools``/``tool_choice`` are sent when given (an agent item's tools)."""
    merged = {**model.params, **(params or {})}
    if tools:
        merged["tools"] = list(tools)
    if tool_choice is not None:
        merged["tool_choice"] = tool_choice
    body_obj = {"model": model.model, "messages": list(messages), **merged, "stream": model.stream}
    body_obj = {k: v for k, v in body_obj.items() if v is not None}
    body = json.dumps(body_obj, ensure_ascii=False, separators=(",", ":")).encode()
    ep = parse_endpoint(model.base_url)
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if model.stream else "application/json",
        "User-Agent": _USER_AGENT,
        "Connection": "close",
    }
    if api_key:
        if ep.azure:
            headers["api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    headers.update(model.headers)
    if extra_headers:
        headers.update(extra_headers)
    max_out = merged.get("max_tokens") or merged.get("max_completion_tokens") or 0
    est = len(body) // 4 + (int(max_out) if isinstance(max_out, (int, float)) else 0)
    return Request(ep, body, headers, est)


# --- proxies ----------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _no_proxy_match(host: str, port: int, no_proxy: str) -> bool:
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
            entry, _, p = entry.partition(":")
            entry_port = int(p) if p.isdigit() else None
        entry = entry.strip("[]").lstrip(".")
        if entry_port is not None and entry_port != port:
            continue
        if host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_for(ep: Endpoint, env: Mapping[str, str]) -> tuple[str, int, dict[str, str]] | None:
    """``(proxy host, port, proxy headers)`` for the endpoint, or None for a direct connection."""
    if _is_loopback(ep.host):
        return None
    no_proxy = env.get("no_proxy", env.get("NO_PROXY", ""))
    if no_proxy and _no_proxy_match(ep.host, ep.port, no_proxy):
        return None
    name = f"{ep.scheme}_proxy"
    url = (env.get(name) or env.get(name.upper()) or env.get("all_proxy")
           or env.get("ALL_PROXY") or "")
    if not url:
        return None
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urlsplit(url)
        pport = parts.port or 80
    except ValueError:
        parts, pport = urlsplit(""), 0
    if parts.scheme != "http" or not parts.hostname:  # never echo the URL: it may hold a password
        raise APIError(f"unsupported {ep.scheme}_proxy setting (scheme {parts.scheme!r}): only "
                       f"http:// proxies are supported; set no_proxy={ep.host} to bypass it",
                       "connection_error")
    headers: dict[str, str] = {}
    if parts.username is not None:
        cred = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
    return parts.hostname, pport, headers


# --- connection and reading -------------------------------------------------------------


@cache
def default_ssl_context() -> ssl.SSLContext:
    """The verifying TLS context, built once per process (it costs ~45 ms)."""
    return ssl.create_default_context()


class _DeadlineReader(io.RawIOBase):
    """The response's byte source: every recv gets only the time left until the attempt's
    wall deadline, so neither a hang nor a dribble outlives it (no watchdog thread)."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("attempt deadline passed")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _SockSource:
    """What ``HTTPResponse.__init__`` calls ``makefile`` on."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock, self._deadline), _READ_SIZE)


def _read_body(resp: http.client.HTTPResponse, limit: int | None = None) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        data = resp.read1(_READ_SIZE)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if limit is not None and size >= limit:
            break
    if limit is None and resp.length:  # Content-Length promised more than arrived
        raise http.client.IncompleteRead(b"".join(chunks), resp.length)
    return b"".join(chunks)
