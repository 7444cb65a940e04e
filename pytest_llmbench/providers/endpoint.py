"""Where an OpenAI-compatible model is reached: its base URL, its proxy, the TLS context.

Shared by the provider (``openai_compat.py``, which the pytest process imports) and its SDK
side (``openai_sdk.py``, imported only where calls are made); it imports neither.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any
from urllib import request as _urllib_request
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pytest_llmbench.errors import APIError

__all__ = ["Endpoint", "default_ssl_context", "parse_endpoint", "proxy_display", "proxy_for"]

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


def proxy_display(url: str) -> str:
    """The proxy URL without credentials (it may hold a password)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))


# --- TLS -----------------------------------------------------------------------------------


@cache
def default_ssl_context() -> ssl.SSLContext:
    """The verifying TLS context, built once per process (loading the CA bundle costs
    ~45 ms; the fork server builds it before forking when a model uses HTTPS)."""
    return ssl.create_default_context()


