"""Preflight: check every selected model's endpoint once, before the first item runs.

A wrong key, a server that is down or a mistyped model id would otherwise cost one failed
item per prompt x instance (each with its own retries), and money where the endpoint
bills. One ``GET {base_url}/models`` per endpoint (official ``openai`` SDK,
``client.models.list()``, short timeout, no retries) tells reachability, authentication
and, where the endpoint lists its models, whether the model id exists; an id missing from
the list is asked for by name (``GET /models/ID``) before it is called missing, since some
servers list only part of what they serve. An endpoint without a model list (404/405) only
counts as reachable. Other statuses (429, 5xx) are logged and the run goes on: the item's
own retry policy handles them.

Runs in the pytest process (the xdist controller, once, before the workers start), for
every selected model except the built-in simulator; ``--llmbench-no-preflight`` skips it.
Every failure becomes one line naming the model, the endpoint, the key's variable and the
fix; the lines together are one ``pytest.UsageError``. Keys are never part of a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from pytest_llmbench.records import ModelSpec

if TYPE_CHECKING:
    import openai

log = logging.getLogger("pytest_llmbench.preflight")

__all__ = ["PREFLIGHT_TIMEOUT", "check_models", "Listing"]

#: Seconds a preflight request may take (capped further by the configured api_timeout).
PREFLIGHT_TIMEOUT = 10.0
_SKIP_HINT = "--llmbench-no-preflight skips this check"
_NO_KEY = "no-key"  # never sent: see _auth


@dataclass(frozen=True)
class Listing:
    """What one endpoint answered: the model ids it lists (``None``: it lists none), or
    the line that ends the run."""

    ids: frozenset[str] | None = None
    problem: str | None = None


def _split_url(base_url: str) -> tuple[str, dict[str, str], str]:
    """Base URL without query (for the SDK), its query (Azure's api-version), and the URL
    to show: no credentials, no query string."""
    parts = urlsplit(base_url.strip())
    query = dict(parse_qsl(parts.query))
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    bare = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    shown = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return bare, query, shown


def _proxy_url(base_url: str, env: Mapping[str, str]) -> str | None:
    """The proxy the items will go through (the transport's rule), shown without
    credentials; ``None`` for a direct connection."""
    from urllib.parse import urlsplit, urlunsplit

    from pytest_llmbench.errors import APIError
    from pytest_llmbench.providers.endpoint import parse_endpoint, proxy_for

    try:
        proxy = proxy_for(parse_endpoint(base_url), env)
    except (APIError, ValueError):
        return None  # an unsupported proxy setting: the items' own error says so
    if proxy is None:
        return None
    parts = urlsplit(proxy)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _who(model: ModelSpec, shown: str) -> str:
    ident = f" (id {model.model!r})" if model.model != model.name else ""
    return f"llmbench preflight: model {model.name!r}{ident} at {shown}"


def _key_fix(model: ModelSpec, key_set: bool) -> str:
    table = f"[tool.llmbench.models.{model.name}]"
    if not model.api_key_env:
        return f"no API key is configured; fix: set api_key_env in {table} to the variable holding it"
    var = model.api_key_env
    if not key_set:
        return (f"${var} is not set; fix: export {var}=... (or put it in the .env file), "
                f"or name another variable with api_key_env in {table}")
    return (f"the key in ${var} was refused; fix: set {var} to a valid key for this endpoint, "
            f"or name another variable with api_key_env in {table}")


def _client(model: ModelSpec, api_key: str | None, timeout: float,
            env: Mapping[str, str]) -> openai.OpenAI:
    import openai

    bare, query, _shown = _split_url(model.base_url)
    host = (urlsplit(bare).hostname or "").lower()
    azure = host == "openai.azure.com" or host.endswith(".openai.azure.com")
    headers = dict(model.headers)
    if azure and api_key:
        headers["api-key"] = api_key  # Azure's header, as the items send it
    proxy = _proxy_url(model.base_url, env)
    # trust_env=False: the proxy choice is the transport's (loopback never proxied), not
    # the HTTP client's reading of the environment.
    http_client = openai.DefaultHttpxClient(proxy=proxy, trust_env=False, timeout=timeout)
    return openai.OpenAI(
        base_url=bare, api_key=api_key if api_key and not azure else _NO_KEY, timeout=timeout,
        max_retries=0, default_headers=headers or None, default_query=query or None,
        http_client=http_client,
    )


def _auth(model: ModelSpec, api_key: str | None) -> dict[str, Any]:
    """Per-request headers: no ``Authorization`` at all without a key (or for Azure, whose
    key goes in ``api-key``), as the items send it. The SDK insists on an ``api_key``; a
    placeholder satisfies it and this removes the header it would make of it."""
    import openai

    host = (urlsplit(model.base_url).hostname or "").lower()
    azure = host == "openai.azure.com" or host.endswith(".openai.azure.com")
    return {"Authorization": openai.Omit()} if azure or not api_key else {}


def list_models(model: ModelSpec, api_key: str | None, timeout: float,
                env: Mapping[str, str]) -> Listing:
    """``GET {base_url}/models`` for ``model``'s endpoint, classified."""
    import openai

    _bare, _query, shown = _split_url(model.base_url)
    who = _who(model, shown)
    try:
        with _client(model, api_key, timeout, env) as client:
            return Listing(ids=frozenset(
                m.id for m in client.models.list(extra_headers=_auth(model, api_key))))
    except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
        return Listing(problem=f"{who}: HTTP {exc.status_code}: "
                               f"{_key_fix(model, bool(api_key))}; {_SKIP_HINT}")
    except (openai.NotFoundError, openai.APIStatusError) as exc:
        if exc.status_code in (404, 405):
            return Listing()  # no model list here: reachable is all we can tell
        log.warning("%s: GET /models answered HTTP %d; going on (the items retry)", who,
                    exc.status_code)
        return Listing()
    except openai.APITimeoutError:
        return Listing(problem=f"{who}: no answer within {timeout:g} s; fix: check that the "
                               "server is up and the base_url is right; " + _SKIP_HINT)
    except openai.APIConnectionError as exc:
        return Listing(problem=f"{who}: {_connection_problem(model, exc, env)}; {_SKIP_HINT}")
    except Exception as exc:  # noqa: BLE001 - a hostile or odd body: the items will see
        # The body is not quoted: it may echo the key. Reachable is all we can tell.
        log.warning("%s: GET /models answered something unreadable (%s); going on", who,
                    type(exc).__name__)
        return Listing()


def _connection_problem(model: ModelSpec, exc: BaseException, env: Mapping[str, str]) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    detail = str(cause).strip() or type(cause).__name__
    proxy = _proxy_url(model.base_url, env)
    host = urlsplit(model.base_url).hostname or ""
    if proxy is not None:
        return (f"cannot connect through the proxy {proxy} ({detail}); fix: check the proxy "
                f"(https_proxy / http_proxy / all_proxy), or set no_proxy={host} to bypass it")
    return (f"cannot connect ({detail}); fix: start the server, or correct base_url in "
            f"[tool.llmbench.models.{model.name}] / the --llmbench-model NAME@BASE_URL value")


def model_exists(model: ModelSpec, api_key: str | None, timeout: float,
                 env: Mapping[str, str]) -> bool:
    """``GET /models/ID``: for endpoints that serve more than they list."""
    import openai

    try:
        with _client(model, api_key, timeout, env) as client:
            client.models.retrieve(model.model, extra_headers=_auth(model, api_key))
        return True
    except openai.NotFoundError:
        return False
    except openai.APIError:
        return True  # cannot tell: let the items find out


def _missing(model: ModelSpec, listed: frozenset[str]) -> str:
    _bare, _query, shown = _split_url(model.base_url)
    known = ", ".join(sorted(listed)[:20]) + (", ..." if len(listed) > 20 else "")
    return (f"{_who(model, shown)}: the endpoint does not serve model id {model.model!r} "
            f"(it lists: {known or 'none'}); fix: set model = one of them in "
            f"[tool.llmbench.models.{model.name}] (or NAME@BASE_URL with a listed name); "
            + _SKIP_HINT)


def check_models(
    models: Sequence[ModelSpec],
    key_of: Callable[[ModelSpec], str | None],
    *,
    timeout: float = PREFLIGHT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> list[str]:
    """Check each non-simulated model; returns one line per failure (empty: all fine).

    Endpoints are checked in parallel, each once (models sharing base URL, key and headers
    share the listing)."""
    env = os.environ if env is None else env
    todo = [m for m in models if not m.simulated]
    if not todo:
        return []
    started = time.monotonic()
    groups: dict[tuple[Any, ...], list[ModelSpec]] = {}
    for model in todo:
        group = (model.base_url, key_of(model), tuple(sorted(model.headers.items())))
        groups.setdefault(group, []).append(model)

    def check(group: list[ModelSpec]) -> list[str]:
        first = group[0]
        listing = list_models(first, key_of(first), timeout, env)
        if listing.problem is not None:
            # one line per endpoint: the other models there would fail the same way
            names = ", ".join(repr(m.name) for m in group[1:])
            return [listing.problem + (f" (also: {names})" if names else "")]
        if listing.ids is None:
            return []
        return [_missing(m, listing.ids) for m in group
                if m.model not in listing.ids and not model_exists(m, key_of(m), timeout, env)]

    # Threads, joined before any item process is forked from this process.
    with ThreadPoolExecutor(max_workers=min(8, len(groups)),
                            thread_name_prefix="llmbench-preflight") as pool:
        problems = [line for lines in pool.map(check, groups.values()) for line in lines]
    log.info("preflight: %d endpoint(s) checked in %.2f s, %d problem(s)", len(groups),
             time.monotonic() - started, len(problems))
    return problems
