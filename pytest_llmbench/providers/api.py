"""One chat call: the API deadline layer of DESIGN.md section 3.

``chat()`` sends one OpenAI-compatible ``/chat/completions`` request and applies, on top of
it, the attempt timeout, the retry policy and the task-deadline cap:

* **Transport.** The standard library's ``http.client`` (HTTP/1.1, one connection per
  attempt, ``Connection: close``), not the openai SDK: every item runs in a freshly forked
  child, where ``import openai`` alone costs ~750 ms and an SDK call ~13-47 ms of CPU.
  HTTPS uses ``default_ssl_context()``, which is cached because building it (loading the CA
  bundle) costs ~45 ms; call it once in the parent before forking so children inherit it.
* **Attempt timeout.** Each attempt gets ``min(api_timeout, time left until task_deadline)``
  as a *wall* deadline: every single ``recv`` is given only the time left (see
  ``_DeadlineReader``), so a server dribbling bytes cannot stretch an attempt past it.
  No attempt starts with less than ``MIN_ATTEMPT_TIME`` of task time left. (Name resolution
  and the TLS handshake are bounded by the socket timeout per step, not by the wall deadline;
  the task layer kills the process if they hang.)
* **Which layer fired.** A timeout of an attempt whose timeout was capped by the task
  deadline is the *task* deadline firing: the call fails at once (no retry, no backoff)
  with error class ``task_timeout``, as does a call whose next attempt (or rate-limit grant)
  finds less than ``MIN_ATTEMPT_TIME`` of task time left. Only an attempt that ran for the
  full configured ``api_timeout`` ends in ``api_timeout``. ``_final_error`` is the one
  place that picks the class; the runner maps ``task_timeout`` to deadline layer ``task``.
* **Retry policy.** ``api_retries`` retries on top of the first attempt. Retried: 408, 409,
  429, 5xx, connection errors (refused, reset, closed), attempt timeouts, invalid 200
  answers and streams without a finish reason. Never retried: 400/401/403/404/422 (the
  classification is ``errors.classify_status``, the only place that decides). The wait
  before a retry is full-jitter exponential backoff, ``uniform(0, min(BACKOFF_CAP,
  BACKOFF_BASE * 2**(n-1)))`` after attempt n, unless the server says otherwise:
  ``retry-after-ms`` (milliseconds) wins over ``Retry-After`` (seconds or an HTTP date);
  both capped at ``RETRY_AFTER_CAP``. A wait that would not leave ``MIN_ATTEMPT_TIME``
  before the task deadline is not slept: the call fails at once.
* **Streaming.** Server-sent events; a stream that ends (EOF or ``[DONE]``) without a
  finish reason is the outcome ``truncated``, never an answer.
* **Azure OpenAI.** When the base URL's host ends in ``openai.azure.com`` the key goes in the
  ``api-key`` header instead of ``Authorization: Bearer``. The query string of the base URL
  (``?api-version=...``) is kept on the request for every endpoint, e.g.
  ``https://RES.openai.azure.com/openai/deployments/DEP?api-version=2024-06-01``.
* **Proxies.** ``https_proxy``/``HTTPS_PROXY`` (CONNECT tunnel), ``http_proxy``/
  ``HTTP_PROXY`` (absolute-form requests), ``all_proxy`` as fallback and ``no_proxy``/
  ``NO_PROXY`` (``*``, host names with domain-suffix match, optional ``:port``; no CIDR).
  Only ``http://`` proxies are supported (Basic credentials in the proxy URL are sent as
  ``Proxy-Authorization``). Loopback hosts (``localhost``, ``127.*``, ``::1``) never go
  through a proxy, so the built-in simulator works behind a corporate proxy.
* **Rate limits.** An optional ``RateLimiter`` is called around each attempt; the shared,
  cross-process implementation lives elsewhere.

The API key is sent, never logged, never put in an error message (error bodies that echo it
are scrubbed). Log lines (WARNING): ``[APITimeout] ...`` for each attempt that timed out,
``[Retry] ...`` before each retry, or when a retry is given up because of the task deadline.
Streamed answers carry token usage only if the server is asked for it, e.g. with
``params = { stream_options = { include_usage = true } }``.

The request, the proxy choice and the deadline-aware socket readers are in ``transport.py``,
the parsing of answers (JSON, server-sent events, error bodies) in ``responses.py``; this
module holds the policy: attempts, retries, waits and the final error.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import random
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol, cast

from pytest_llmbench.errors import (
    OUTCOME_TO_ERROR_CLASS,
    APIError,
    APITimeoutError,
    LLMBenchError,
    classify_status,
)
from pytest_llmbench.providers.responses import (
    _error_detail,
    _Failure,
    _parse_json,
    _read_stream,
)
from pytest_llmbench.providers.transport import (
    Endpoint,
    Request,
    _read_body,
    _SockSource,
    build_request,
    default_ssl_context,
    parse_endpoint,
    proxy_for,
)
from pytest_llmbench.records import Attempt, Completion, Deadlines, Message, ModelSpec

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MIN_ATTEMPT_TIME",
    "RETRY_AFTER_CAP",
    "Endpoint",
    "RateLimiter",
    "Request",
    "backoff_delay",
    "build_request",
    "chat",
    "default_ssl_context",
    "parse_endpoint",
    "parse_retry_after",
    "proxy_for",
]

log = logging.getLogger("pytest_llmbench.providers.api")

BACKOFF_BASE = 0.5
"""Seconds; the backoff ceiling after attempt n is ``BACKOFF_BASE * 2**(n-1)``."""
BACKOFF_CAP = 8.0
"""Seconds; no backoff ceiling above this."""
RETRY_AFTER_CAP = 60.0
"""Seconds; a server's Retry-After longer than this is shortened to it."""
MIN_ATTEMPT_TIME = 0.05
"""Seconds of task time an attempt needs at least; with less left, none is started."""

_ERROR_BODY_MAX = 65536


class RateLimiter(Protocol):
    """Seam for shared (cross-process) rate limiting, called around every attempt."""

    def before_request(
        self, model: ModelSpec, est_tokens: int, *, deadline: float | None = None
    ) -> None:
        """Block until the request may be sent (may take task time, not attempt time).

        Raises an ``LLMBenchError`` (``ratelimit.RateLimitWait``) when the grant would come
        after ``deadline`` (absolute ``time.monotonic()``)."""

    def on_response(
        self, model: ModelSpec, status: int, retry_after: float | None, tokens: int
    ) -> None:
        """Report an attempt's result; ``status`` is 0 when no HTTP response arrived."""


# --- retry policy -----------------------------------------------------------------------


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Full-jitter wait after failed attempt ``attempt`` (1-based), in seconds."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(0.0, ceiling)  # the global one is reseeded after fork


def _header(headers: Mapping[str, str] | http.client.HTTPMessage, name: str) -> str | None:
    if isinstance(headers, http.client.HTTPMessage):
        return headers.get(name)
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def parse_retry_after(
    headers: Mapping[str, str] | http.client.HTTPMessage, now: float | None = None
) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` first, then ``Retry-After``
    (delta seconds or an HTTP date, relative to ``now``, Unix time), capped; None if absent
    or unreadable."""
    ms = _header(headers, "retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return min(RETRY_AFTER_CAP, max(0.0, value))
    ra = _header(headers, "retry-after")
    if not ra:
        return None
    try:
        value = float(ra)
    except ValueError:
        from email.utils import parsedate_to_datetime  # rare path: keep it off import

        try:
            when = parsedate_to_datetime(ra.strip())
        except (TypeError, ValueError, IndexError):
            return None
        value = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(value):
        return None
    return min(RETRY_AFTER_CAP, max(0.0, value))


# --- one attempt ------------------------------------------------------------------------


def _attempt(req: Request, model: ModelSpec, timeout: float, api_key: str | None,
             proxy: tuple[str, int, dict[str, str]] | None,
             ssl_context: ssl.SSLContext | None) -> Completion:
    """One HTTP exchange bounded by ``timeout`` seconds of wall time."""
    ep = req.endpoint
    deadline = time.monotonic() + timeout
    host, port = (proxy[0], proxy[1]) if proxy else (ep.host, ep.port)
    conn: http.client.HTTPConnection
    target, headers = req.target_for(proxy), req.headers
    if ep.scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=ssl_context or default_ssl_context())
        if proxy:
            conn.set_tunnel(ep.host, ep.port, headers=proxy[2])
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        if proxy and proxy[2]:
            headers = {**headers, **proxy[2]}
    streaming = got_status = False
    try:
        conn.connect()
        sock = conn.sock
        left = deadline - time.monotonic()
        if left <= 0 or sock is None:
            raise TimeoutError
        sock.settimeout(left)
        conn.request("POST", target, body=req.body, headers=headers)
        resp = http.client.HTTPResponse(cast(socket.socket, _SockSource(sock, deadline)),
                                        method="POST")
        resp.begin()
        got_status = True
        status = resp.status
        if not 200 <= status < 300:
            retry_after = parse_retry_after(resp.headers)
            try:
                detail = _error_detail(_read_body(resp, _ERROR_BODY_MAX), api_key)
            except (OSError, http.client.HTTPException):
                detail = ""
            outcome, retryable = classify_status(status)
            error = f"HTTP {status} {resp.reason}".rstrip() + (f": {detail}" if detail else "")
            if 300 <= status < 400:
                error += " (redirects are not followed; check the base URL)"
            raise _Failure(outcome, error, retryable, status, retry_after)
        ctype = (resp.getheader("content-type") or "").lower()
        if model.stream and not ctype.startswith("application/json"):
            streaming = True
            return _read_stream(resp, model, api_key)
        return _parse_json(_read_body(resp), model, api_key)
    except _Failure:
        raise
    except TimeoutError:
        raise _Failure("timeout", f"timed out after {timeout:.2f} s", True) from None
    except ConnectionRefusedError:
        raise _Failure("connection_error", "connection refused", True) from None
    except http.client.RemoteDisconnected:
        raise _Failure("connection_error", "server closed the connection without a response",
                       True) from None
    except (ConnectionError, http.client.IncompleteRead) as exc:
        if streaming:
            raise _Failure("truncated", f"stream cut: {type(exc).__name__}", True) from None
        what = "response body cut short" if got_status else "connection reset"
        raise _Failure("connection_error", f"{what} ({type(exc).__name__})", True) from None
    except ssl.SSLCertVerificationError as exc:
        raise _Failure("connection_error", f"TLS certificate rejected: {exc.verify_message}",
                       False) from None
    except socket.gaierror as exc:
        raise _Failure("connection_error", f"cannot resolve host {host!r}: {exc.strerror}",
                       True) from None
    except OSError as exc:  # unreachable network, TLS errors, ...
        raise _Failure("connection_error", f"{type(exc).__name__}: {exc}", True) from None
    except http.client.HTTPException as exc:  # bad status line, header too long, ...
        raise _Failure("api_error", f"invalid HTTP response ({type(exc).__name__})",
                       True) from None
    finally:
        conn.close()


# --- the call: attempts, waits, final error ---------------------------------------------


def _final_error(model: ModelSpec, ep: Endpoint, attempts: int, last: _Failure | None,
                 note: str = "", task: bool = False) -> APIError:
    """The exception that ends the call: names the model, the URL (never the key), the
    number of attempts and the last error, plus a hint for the usual causes.

    This is the one place that decides the call's error class. ``task``: the *task*
    deadline ended the call (an attempt capped by it timed out, or no task time was left for
    the next attempt or rate-limit grant), so the class is ``task_timeout`` whatever the last
    attempt's outcome (always ``APITimeoutError``). Otherwise the last attempt's outcome
    decides (``errors.OUTCOME_TO_ERROR_CLASS``): a timeout there means the configured
    ``api_timeout`` was the binding limit, i.e. ``api_timeout``."""
    who = f"model {model.name!r}" + (f" (id {model.model!r})" if model.model != model.name else "")
    msg = f"{who} at {ep.display}: "
    if last is not None:
        msg += f"{attempts} attempt{'s' if attempts != 1 else ''} failed; last: {last.error}"
        msg += "" if last.retryable else " (not retried)"
    msg += f"; {note}" if last is not None and note else note
    if task or last is None:  # no failure at all: only the task deadline stops a call early
        return APITimeoutError(msg, "task_timeout", last.status if last else None)
    if last.outcome == "auth_error":
        env = f" in ${model.api_key_env}" if model.api_key_env else ""
        msg += f"; check the API key{env}"
    elif last.error == "connection refused" or last.error.startswith("cannot resolve"):
        msg += (f"; is the server at {ep.display} running? check it, or the "
                "--llmbench-model value")
    error_class = OUTCOME_TO_ERROR_CLASS.get(last.outcome, "api_error")
    if last.outcome == "timeout":
        return APITimeoutError(msg, error_class, last.status)
    return APIError(msg, error_class, last.status)


def _task_note(deadlines: Deadlines, what: str) -> str:
    return f"task deadline of {deadlines.task_timeout:g} s {what}"


def chat(
    model: ModelSpec,
    messages: Sequence[Message],
    *,
    params: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    deadlines: Deadlines,
    task_deadline: float | None = None,
    api_key: str | None = None,
    turn: int = 0,
    item_started: float | None = None,
    on_attempt: Callable[[Attempt], None] | None = None,
    rng: random.Random | None = None,
    extra_headers: Mapping[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    label: str = "",
    limiter: RateLimiter | None = None,
    ssl_context: ssl.SSLContext | None = None,
    env: Mapping[str, str] | None = None,
) -> Completion:
    """Send one chat request under the API deadline layer and return the answer.

    ``task_deadline`` is the absolute ``time.monotonic()`` at which the item's task deadline
    expires; every attempt's timeout is capped by it (``deadlines.task_timeout`` only names
    the limit in messages). ``item_started`` (monotonic) is the
    origin of ``Attempt.started``. ``on_attempt`` receives every attempt, after the wait that
    follows it is decided. ``tools`` (OpenAI tool dicts) and ``tool_choice`` are sent when
    given; the answer's ``tool_calls`` hold the calls. ``env`` is where proxy variables are read (default ``os.environ``).
    Raises ``APIError`` (``error_class`` set) or ``APITimeoutError`` (``api_timeout``, or
    ``task_timeout`` when the task deadline ended the call) when the call fails for good.
    """
    req = build_request(model, messages, params, api_key, extra_headers,
                        tools=tools, tool_choice=tool_choice)
    ep = req.endpoint
    proxy = proxy_for(ep, os.environ if env is None else env)
    total = max(0, deadlines.api_retries) + 1
    origin = time.monotonic() if item_started is None else item_started
    last: _Failure | None = None
    for number in range(1, total + 1):
        if limiter is not None:
            try:
                limiter.before_request(
                    model, req.est_tokens,
                    deadline=None if task_deadline is None else task_deadline - MIN_ATTEMPT_TIME,
                )
            except LLMBenchError as exc:
                note = _task_note(deadlines, f"leaves no time for attempt {number} ({exc})")
                raise _final_error(model, ep, number - 1, last, note, task=True) from None
        start = time.monotonic()
        timeout = deadlines.api_timeout
        capped = False  # the task deadline, not api_timeout, bounds this attempt
        if task_deadline is not None:
            left = task_deadline - start
            if left < MIN_ATTEMPT_TIME:
                raise _final_error(model, ep, number - 1, last,
                                   _task_note(deadlines, f"reached before attempt {number}"),
                                   task=True)
            capped = left < timeout
            timeout = min(timeout, left)
        try:
            completion = _attempt(req, model, timeout, api_key, proxy, ssl_context)
        except _Failure as exc:
            duration = time.monotonic() - start
            failure = last = exc
        except BaseException:
            if limiter is not None:  # frees a connection slot held for this attempt
                limiter.on_response(model, 0, None, 0)
            raise
        else:
            duration = time.monotonic() - start
            if limiter is not None:
                limiter.on_response(model, 200, None,
                                    completion.prompt_tokens + completion.completion_tokens)
            if on_attempt is not None:
                on_attempt(Attempt(turn=turn, number=number, started=start - origin,
                                   duration=duration, outcome="ok", status=200))
            return replace(completion, latency=duration)

        # Which deadline layer ended the attempt: a timeout of an attempt whose timeout was
        # capped means the task deadline was reached (classified task_timeout, no retry).
        task_ended = failure.outcome == "timeout" and capped
        if failure.outcome == "timeout":
            log.warning("[APITimeout] model=%s attempt=%d/%d timeout=%.2fs label=%s%s",
                        model.name, number, total, timeout, label,
                        " (capped by the task deadline)" if capped else "")
        if limiter is not None:
            limiter.on_response(model, failure.status or 0, failure.retry_after, 0)
        wait, note = 0.0, ""
        if task_ended:
            note = _task_note(deadlines, f"exceeded during attempt {number} (attempt timeout "
                                         f"capped to {timeout:.2f} s, below api_timeout "
                                         f"{deadlines.api_timeout:g} s)")
        policy_retry = retry = failure.retryable and number < total
        if task_ended:
            retry = False
        elif (retry and task_deadline is not None
                and task_deadline - time.monotonic() < MIN_ATTEMPT_TIME):
            # no time left for another attempt: no backoff, the task layer ends the call
            note = _task_note(deadlines, f"reached after attempt {number}, not retried")
            retry, task_ended = False, True
        elif retry:
            wait = (failure.retry_after if failure.retry_after is not None
                    else backoff_delay(number, rng))
            if (task_deadline is not None
                    and time.monotonic() + wait + MIN_ATTEMPT_TIME > task_deadline):
                # the task has time left, just not for this wait: the last outcome stands
                note = f"not retried: a {wait:.2f} s wait would reach the task deadline"
                retry, wait = False, 0.0
        if policy_retry and not retry:  # given up because of the task deadline
            log.warning("[Retry] model=%s attempt=%d/%d outcome=%s status=%s %s label=%s",
                        model.name, number, total, failure.outcome, failure.status, note,
                        label)
        if on_attempt is not None:
            on_attempt(Attempt(turn=turn, number=number, started=start - origin,
                               duration=duration, outcome=failure.outcome,
                               status=failure.status, error=failure.error, wait=wait))
        if not retry:
            raise _final_error(model, ep, number, failure, note, task=task_ended)
        log.warning("[Retry] model=%s attempt=%d/%d outcome=%s status=%s wait=%.2fs label=%s",
                 model.name, number, total, failure.outcome, failure.status, wait, label)
        if wait > 0:
            sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
