"""One chat call: the API deadline layer of DESIGN.md section 3, the same for every provider.

``chat()`` asks the model's provider (``base.Provider``; the default is the
OpenAI-compatible one on the ``openai`` SDK, ``openai_compat.py``) for one attempt at a
time, and applies around the attempts the attempt timeout, the retry policy, the
Retry-After limits, rate limits and the task-deadline cap:

* **Attempt timeout.** Each attempt gets ``min(api_timeout, time left until task_deadline)``
  as a *wall* deadline, which the provider must keep (the default one bounds every socket
  operation by it, so a server dribbling bytes cannot stretch an attempt). No attempt starts
  with less than ``MIN_ATTEMPT_TIME`` of task time left.
* **Which layer fired.** A timeout of an attempt whose timeout was capped by the task
  deadline is the *task* deadline firing: the call fails at once (no retry, no backoff)
  with error class ``task_timeout``, as does a call whose next attempt finds less than
  ``MIN_ATTEMPT_TIME`` of task time left. Only an attempt that ran for the full configured
  ``api_timeout`` ends in ``api_timeout``. ``_final_error`` is the one place that picks the
  class; the runner maps ``task_timeout`` to deadline layer ``task``.
* **Retry policy.** ``api_retries`` retries on top of the first attempt. Retried: 408, 409,
  429, 5xx, connection errors (refused, reset, closed), attempt timeouts, malformed 200
  answers and streams without a finish reason. Never retried: 400/401/403/404/422 (the
  classification is ``errors.classify_status``, the only place that decides), an answer
  over the size cap, an untrusted TLS certificate. The wait before a retry is full-jitter
  exponential backoff, ``uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**(n-1)))`` after
  attempt n, unless the server says otherwise: ``retry-after-ms`` (milliseconds) wins over
  ``Retry-After`` (seconds or an HTTP date).
* **Retry-After limits.** A Retry-After longer than the model's ``max_retry_after``
  (default ``RETRY_AFTER_CAP``, 60 s) means the endpoint is unavailable: the call ends at
  once as ``endpoint_down`` (not waited, not shared with the rate limiter, so it holds up
  no other item; the circuit breaker of issue 14 consumes this class). A wait that would not
  leave ``MIN_ATTEMPT_TIME`` before the task deadline is not slept: the call ends as
  ``rate_limited`` (layer ``api``) with the server's Retry-After in the message, and so
  does a rate-limit grant (``RateLimiter.before_request``) that would come too late.
* **Request hooks.** Before each attempt the provider builds the body and every
  ``pytest_llmbench_modify_request`` implementation edits it in place.
* **Rate limits.** An optional ``RateLimiter`` is called around each attempt; the shared,
  cross-process implementation is ``coord/ratelimit.py``.

The API key is sent, never logged, never put in an error message: every error text goes
through ``scrub.scrub``. Log lines (WARNING): ``[APITimeout] ...`` for each attempt that
timed out, ``[Retry] ...`` before each retry, or when a retry is given up because of the
task deadline.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pytest_llmbench.coord.breaker import CircuitBreaker
from pytest_llmbench.errors import (
    OUTCOME_TO_ERROR_CLASS,
    APIError,
    APITimeoutError,
    AttemptFailure,
    EndpointDown,
    LLMBenchError,
)
from pytest_llmbench.providers.base import ChatRequest, Provider, RequestHook, parse_retry_after
from pytest_llmbench.records import Attempt, Completion, Deadlines, Message, ModelSpec
from pytest_llmbench.scrub import add_secret, scrub

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "MIN_ATTEMPT_TIME",
    "RETRY_AFTER_CAP",
    "AttemptFailure",
    "RateLimiter",
    "backoff_delay",
    "chat",
    "parse_retry_after",
]

log = logging.getLogger("pytest_llmbench.providers.api")

BACKOFF_BASE = 0.5
"""Seconds; the backoff ceiling after attempt n is ``BACKOFF_BASE * 2**(n-1)``."""
BACKOFF_CAP = 8.0
"""Seconds; no backoff ceiling above this."""
RETRY_AFTER_CAP = 60.0
"""Seconds; the default ``max_retry_after``: a longer Retry-After is ``endpoint_down``."""
MIN_ATTEMPT_TIME = 0.05
"""Seconds of task time an attempt needs at least; with less left, none is started."""


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


# --- the call: attempts, waits, final error ---------------------------------------------


def _est_tokens(body: Mapping[str, Any]) -> int:
    """A cheap estimate for the token rate limit: ~4 characters a token, plus the output cap."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        chars += len(content) if isinstance(content, str) else len(str(content or ""))
    max_out = body.get("max_tokens") or body.get("max_completion_tokens") or 0
    return chars // 4 + 8 + (int(max_out) if isinstance(max_out, (int, float)) else 0)


@dataclass
class _Ending:
    """Why the call stops after an attempt: the note for the message, and the class."""

    note: str = ""
    task: bool = False
    """The task deadline ended the call (class ``task_timeout``)."""
    error_class: str | None = None
    """Overrides the last outcome's class (``rate_limited``, ``endpoint_down``)."""


class _Call:
    """One ``chat()`` call: its settings and the state of its attempts."""

    def __init__(self, provider: Provider, request: ChatRequest, deadlines: Deadlines,
                 task_deadline: float | None, hooks: Sequence[Callable[..., None]],
                 rng: random.Random | None) -> None:
        self.provider, self.request, self.deadlines = provider, request, deadlines
        self.rng = rng
        self.model = request.model
        self.task_deadline = task_deadline
        self.hooks = hooks
        self.display = provider.endpoint(request.model)
        self.total = max(0, deadlines.api_retries) + 1
        self.last: AttemptFailure | None = None

    limiter: RateLimiter | None = None
    on_attempt: Callable[[Attempt], None] | None = None
    label = ""
    turn = 0
    origin = 0.0

    def acquire(self, body: Mapping[str, Any], number: int) -> None:
        """The rate limiter's grant for attempt ``number``; one too late ends the call."""
        if self.limiter is None:
            return
        deadline = self.task_deadline
        try:
            self.limiter.before_request(
                self.model, _est_tokens(body),
                deadline=None if deadline is None else deadline - MIN_ATTEMPT_TIME)
        except LLMBenchError as exc:
            raise self.final(number - 1, _Ending(
                f"rate limit: no grant for attempt {number} before the task deadline of "
                f"{self.deadlines.task_timeout:g} s ({exc})", error_class="rate_limited")
            ) from None

    def succeeded(self, completion: Completion, number: int, start: float) -> Completion:
        duration = time.monotonic() - start
        if self.limiter is not None:
            self.limiter.on_response(self.model, 200, None,
                                     completion.prompt_tokens + completion.completion_tokens)
        if self.on_attempt is not None:
            self.on_attempt(Attempt(turn=self.turn, number=number, started=start - self.origin,
                                    duration=duration, outcome="ok", status=200))
        return replace(completion, latency=duration)

    def failed(self, failure: AttemptFailure, number: int, start: float, timeout: float,
               capped: bool) -> float:
        """Record failed attempt ``number``; the wait before the next one, or raise the
        call's final error."""
        duration = time.monotonic() - start
        self.last = failure
        model = self.model
        if not failure.error and failure.outcome == "timeout":
            failure.error = f"timed out after {timeout:.2f} s"
        failure.error = scrub(failure.error, self.request.api_key)
        if failure.outcome == "timeout":
            log.warning("[APITimeout] model=%s attempt=%d/%d timeout=%.2fs label=%s%s",
                        model.name, number, self.total, timeout, self.label,
                        " (capped by the task deadline)" if capped else "")
        wait, ending = self.decide(failure, number, timeout, capped)
        if self.limiter is not None:  # a Retry-After past max_retry_after is not shared
            down = ending is not None and ending.error_class == "endpoint_down"
            self.limiter.on_response(model, failure.status or 0,
                                     None if down else failure.retry_after, 0)
        if self.on_attempt is not None:
            self.on_attempt(Attempt(turn=self.turn, number=number, started=start - self.origin,
                                    duration=duration, outcome=failure.outcome,
                                    status=failure.status, error=failure.error, wait=wait))
        if ending is not None:
            if failure.retryable and number < self.total:  # given up early: say why
                log.warning("[Retry] model=%s attempt=%d/%d outcome=%s status=%s %s label=%s",
                            model.name, number, self.total, failure.outcome, failure.status,
                            ending.note, self.label)
            raise self.final(number, ending)
        log.warning("[Retry] model=%s attempt=%d/%d outcome=%s status=%s wait=%.2fs label=%s",
                    model.name, number, self.total, failure.outcome, failure.status, wait,
                    self.label)
        return wait

    def task_note(self, what: str) -> str:
        return f"task deadline of {self.deadlines.task_timeout:g} s {what}"

    def body(self) -> dict[str, Any]:
        body = self.provider.build_body(self.request)
        for hook in self.hooks:
            hook(body=body, model=self.model)
        return body

    def attempt_timeout(self, number: int) -> tuple[float, bool]:
        """``(timeout, capped)`` for attempt ``number``; raises when no task time is left."""
        timeout = self.deadlines.api_timeout
        if self.task_deadline is None:
            return timeout, False
        left = self.task_deadline - time.monotonic()
        if left < MIN_ATTEMPT_TIME:
            raise self.final(number - 1, _Ending(self.task_note(
                f"reached before attempt {number}"), task=True))
        return min(timeout, left), left < timeout

    def decide(self, failure: AttemptFailure, number: int, timeout: float,
               capped: bool) -> tuple[float, _Ending | None]:
        """After failed attempt ``number``: ``(wait, None)`` to retry, or ``(0, ending)``."""
        if failure.outcome == "timeout" and capped:
            return 0.0, _Ending(self.task_note(
                f"exceeded during attempt {number} (attempt timeout capped to {timeout:.2f} s, "
                f"below api_timeout {self.deadlines.api_timeout:g} s)"), task=True)
        ra = failure.retry_after
        if ra is not None and ra > self.model.max_retry_after:
            return 0.0, _Ending(f"the server asked to wait {ra:g} s (Retry-After), more than "
                                f"max_retry_after {self.model.max_retry_after:g} s: endpoint "
                                "treated as unavailable", error_class="endpoint_down")
        if not failure.retryable or number >= self.total:
            return 0.0, _Ending()
        deadline = self.task_deadline
        if deadline is not None and deadline - time.monotonic() < MIN_ATTEMPT_TIME:
            return 0.0, _Ending(self.task_note(f"reached after attempt {number}, not retried"),
                                task=True)
        wait = ra if ra is not None else backoff_delay(number, self.rng)
        if deadline is not None and time.monotonic() + wait + MIN_ATTEMPT_TIME > deadline:
            if ra is not None:
                return 0.0, _Ending(
                    f"the server asked to wait {ra:g} s (Retry-After), past the task deadline "
                    f"({max(0.0, deadline - time.monotonic()):.2f} s left)",
                    error_class="rate_limited")
            return 0.0, _Ending(f"not retried: a {wait:.2f} s wait would reach the task "
                                "deadline")
        return wait, None

    def final(self, attempts: int, ending: _Ending) -> APIError:
        """The exception that ends the call: names the model, the URL (never the key), the
        number of attempts and the last error, plus a hint for the usual causes.

        This is the one place that decides the call's error class: ``ending.task`` (the
        task deadline ended the call) gives ``task_timeout`` whatever the last attempt's
        outcome; ``ending.error_class`` (``rate_limited``, ``endpoint_down``) is taken as
        it is; otherwise the last attempt's outcome decides
        (``errors.OUTCOME_TO_ERROR_CLASS``): a timeout there means the configured
        ``api_timeout`` was the binding limit, i.e. ``api_timeout``."""
        model, last = self.model, self.last
        who = f"model {model.name!r}" + (f" (id {model.model!r})" if model.model != model.name
                                          else "")
        msg = f"{who} at {self.display}: "
        if last is not None:
            msg += f"{attempts} attempt{'s' if attempts != 1 else ''} failed; last: {last.error}"
            msg += "" if last.retryable or ending.error_class else " (not retried)"
        note = ending.note
        msg += f"; {note}" if last is not None and note else note
        msg = scrub(msg, self.request.api_key)
        if ending.error_class is not None:
            return APIError(msg, ending.error_class, last.status if last else None)
        if ending.task or last is None:  # no failure at all: only the task deadline stops early
            return APITimeoutError(msg, "task_timeout", last.status if last else None)
        if last.outcome == "auth_error":
            env = f" in ${model.api_key_env}" if model.api_key_env else ""
            msg += f"; check the API key{env}"
        elif last.error == "connection refused" or last.error.startswith("cannot resolve"):
            msg += (f"; is the server at {self.display} running? check it, or the "
                    "--llmbench-model value")
        error_class = OUTCOME_TO_ERROR_CLASS.get(last.outcome, "api_error")
        if last.outcome == "timeout":
            return APITimeoutError(msg, error_class, last.status)
        return APIError(msg, error_class, last.status)


#: Attempt outcomes that say the endpoint is not serving: they count toward opening its
#: circuit breaker. An HTTP answer of any other kind (4xx, a malformed body) shows it up.
_DOWN_OUTCOMES = frozenset({"connection_error", "timeout", "server_error"})


def _tell_breaker(breaker: CircuitBreaker, model: ModelSpec, failure: AttemptFailure,
                  capped: bool, probe: bool) -> None:
    """One failed attempt, as the endpoint's circuit breaker sees it."""
    too_long = failure.retry_after is not None and failure.retry_after > model.max_retry_after
    if too_long or (failure.outcome in _DOWN_OUTCOMES and not (capped and
                                                               failure.outcome == "timeout")):
        # (a timeout cut short by the task deadline says nothing about the endpoint)
        breaker.record(model.base_url, ok=False, error=failure.error or failure.outcome)
    elif failure.status is not None and failure.outcome != "rate_limited":
        breaker.record(model.base_url, ok=True)
    elif probe:
        breaker.release_probe(model.base_url)


def _endpoint_failed(exc: APIError) -> bool:
    """The call failed because the endpoint is not serving (a fallback may answer): its
    breaker is open, or its last attempt could not connect, timed out or got a 5xx."""
    return (isinstance(exc, EndpointDown) or exc.error_class in ("connection_error",
            "api_timeout", "endpoint_down") or (exc.status or 0) >= 500)


def chat(
    model: ModelSpec,
    messages: Sequence[Message],
    *,
    params: Mapping[str, Any] | None = None,
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
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
    provider: Provider | None = None,
    request_hooks: Sequence[RequestHook | Callable[..., None]] = (),
    breaker: CircuitBreaker | None = None,
    fallback_keys: Sequence[str | None] = (),
) -> Completion:
    """Send one chat request under the API deadline layer and return the answer.

    With a ``breaker``, an endpoint whose circuit is open is not called, and a call that
    failed because its endpoint is not serving goes on to the model's ``fallbacks`` in
    order (their keys in ``fallback_keys``); with none left, the last error stands
    (``EndpointDown``, ``endpoint_down``, when the breaker refused). The answering endpoint's name
    is the completion's ``endpoint``.

    ``task_deadline`` is the absolute ``time.monotonic()`` at which the item's task deadline
    expires; every attempt's timeout is capped by it (``deadlines.task_timeout`` only names
    the limit in messages). ``item_started`` (monotonic) is the origin of
    ``Attempt.started``. ``on_attempt`` receives every attempt, after the wait that follows
    it is decided. ``env`` is where proxy variables are read (default ``os.environ``).
    ``tools``/``tool_choice`` are sent as the OpenAI API takes them; the answer's
    ``tool_calls`` come back in the ``Completion``. ``provider`` defaults to the
    OpenAI-compatible one; ``request_hooks`` (``registry.request_hooks``) edit each body.
    Raises ``APIError`` (``error_class`` set) or ``APITimeoutError`` (``api_timeout``, or
    ``task_timeout`` when the task deadline ended the call) when the call fails for good.
    """
    if provider is None:
        from pytest_llmbench.providers.openai_compat import OpenAIProvider

        provider = OpenAIProvider()
    kwargs = dict(params=params, deadlines=deadlines, task_deadline=task_deadline, turn=turn,
                  item_started=item_started, on_attempt=on_attempt, rng=rng,
                  extra_headers=extra_headers, sleep=sleep, label=label, limiter=limiter,
                  ssl_context=ssl_context, env=env, tools=tools, tool_choice=tool_choice,
                  provider=provider, request_hooks=request_hooks, breaker=breaker)
    keys = [api_key, *fallback_keys]
    chain = [model, *model.fallbacks] if breaker is not None else [model]
    for i, spec in enumerate(chain):
        try:
            completion = _chat_one(spec, messages, api_key=keys[i] if i < len(keys) else None,
                                   **kwargs)
        except APIError as exc:
            if i + 1 == len(chain) or not _endpoint_failed(exc):
                raise
            log.warning("[Fallback] model=%s: %s; trying %s (%s)", model.name, exc,
                        chain[i + 1].name, chain[i + 1].base_url)
            continue
        return replace(completion, endpoint=spec.name)
    raise AssertionError("unreachable: the chain returns or raises")  # pragma: no cover


def _chat_one(
    model: ModelSpec,
    messages: Sequence[Message],
    *,
    params: Mapping[str, Any] | None,
    deadlines: Deadlines,
    task_deadline: float | None,
    api_key: str | None,
    turn: int,
    item_started: float | None,
    on_attempt: Callable[[Attempt], None] | None,
    rng: random.Random | None,
    extra_headers: Mapping[str, str] | None,
    sleep: Callable[[float], None],
    label: str,
    limiter: RateLimiter | None,
    ssl_context: ssl.SSLContext | None,
    env: Mapping[str, str] | None,
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    provider: Provider,
    request_hooks: Sequence[RequestHook | Callable[..., None]],
    breaker: CircuitBreaker | None,
) -> Completion:
    """``chat`` against one endpoint: the attempt loop."""
    add_secret(api_key)
    request = ChatRequest(model=model, messages=messages, params=dict(params or {}),
                          tools=tools, tool_choice=tool_choice, api_key=api_key,
                          extra_headers=dict(extra_headers or {}), env=env,
                          ssl_context=ssl_context)
    call = _Call(provider, request, deadlines, task_deadline, request_hooks, rng)
    call.limiter, call.on_attempt, call.label, call.turn = limiter, on_attempt, label, turn
    call.origin = time.monotonic() if item_started is None else item_started
    for number in range(1, call.total + 1):
        body = call.body()
        call.attempt_timeout(number)  # no task time left at all: task_timeout, not a wait
        probe = breaker.wait_allow(model.base_url, task_deadline) if breaker is not None \
            else False
        try:
            call.acquire(body, number)
            timeout, capped = call.attempt_timeout(number)
        except BaseException:
            if probe and breaker is not None:
                breaker.release_probe(model.base_url)
            raise
        start = time.monotonic()
        try:
            completion = provider.send(request, body, start + timeout)
        except AttemptFailure as exc:
            if breaker is not None:
                _tell_breaker(breaker, model, exc, capped, probe)
            wait = call.failed(exc, number, start, timeout, capped)  # raises at the end
        except BaseException:
            if limiter is not None:  # frees a connection slot held for this attempt
                limiter.on_response(model, 0, None, 0)
            if probe and breaker is not None:
                breaker.release_probe(model.base_url)
            raise
        else:
            if breaker is not None:
                breaker.record(model.base_url, ok=True)
            return call.succeeded(completion, number, start)
        if wait > 0:
            sleep(wait)
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
