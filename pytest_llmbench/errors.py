"""The plugin's exceptions and error classes, in one place.

::

    LLMBenchError
    ├── ConfigError            bad option / ini / env value (-> pytest.UsageError)
    ├── SuiteError             a suite file violates the schema (one collection error)
    ├── ScorerError            unknown scorer or a scorer that raised
    ├── StoreError             result store unusable (version mismatch, corrupt index)
    ├── LeaseTimeout           a lease could not be acquired in time
    ├── LeaseExpired           a lease was held past its maximum and reclaimed
    ├── APIError               a chat call failed for good (after the retry policy)
    │   ├── APITimeoutError    ... because its attempts timed out
    │   └── EndpointDown       ... because the endpoint's circuit breaker is open
    ├── AgentStop              an agent loop hit a limit (max_turns, budget, loop...)
    ├── RateLimitWait          (coord/ratelimit.py) a rate-limit grant would come after the
    │                          caller's deadline
    ├── SimStartError          (sim/control.py) the built-in simulator did not start
    └── AttemptFailure         one attempt of a chat call failed, as a provider classifies
                               it (outcome, retryable, status, Retry-After); the API layer's
                               retry loop turns the last one into an APIError

Internal, never raised out of their module: ``report.cli.CLIError`` (one ``error:`` line
and exit status 2), ``agent.tools._ToolFailure`` (a tool's failure, sent back to the model),
``scoring.builtin._Bad``, and the simulator's ``DirectiveError``/``ArithError``.

Every error that ends an item maps to exactly one *error class*, the string stored in the
result and counted in the summary (``ERROR_CLASSES``).
"""

from __future__ import annotations

from typing import Any

from pytest_llmbench.records import StrEnum

#: error class -> human description (also the order used in summaries).
ERROR_CLASSES: dict[str, str] = {
    "api_error": "the endpoint answered with an error, after retries",
    "api_timeout": "every attempt of an API call timed out",
    "auth_error": "the endpoint refused the credentials (401/403): not retried",
    "bad_request": "the endpoint rejected the request (400/404/422): not retried",
    "connection_error": "the endpoint could not be reached",
    "rate_limited": "the endpoint kept throttling (429 / Retry-After): retries used up, or its wait would pass the task deadline",
    "truncated": "a streamed answer ended without a finish reason",
    "task_timeout": "the item reached its task deadline (its process was killed, or its last API attempt was cut short by it)",
    "lease_timeout": "a shared resource could not be leased in time, or was held too long",
    "crashed": "the item's process died without a result",
    "max_turns": "the agent loop used its max_turns model calls and still called tools",
    "max_tool_calls": "the agent loop reached its max_tool_calls",
    "budget_exceeded": "the agent loop spent more tokens than its token_budget",
    "loop": "the agent repeated the same tool call (or answer) loop_repeats times",
    "scorer_error": "the scorer raised or is unknown",
    "sandbox_error": "the code sandbox failed",
    "test_error": "a plain test using the llm fixture failed in its setup",
    "endpoint_down": "the endpoint's circuit breaker was open (and no fallback answered), or it asked to wait longer than max_retry_after",
    "internal": "a bug in pytest-llmbench",
}


class ErrorClass(StrEnum):
    """The error classes as an enum (``ErrorClass.TASK_TIMEOUT == "task_timeout"``); records
    store the plain values, ``ERROR_CLASSES`` holds their descriptions (a test keeps the two
    the same)."""

    API_ERROR = "api_error"
    API_TIMEOUT = "api_timeout"
    AUTH_ERROR = "auth_error"
    BAD_REQUEST = "bad_request"
    CONNECTION_ERROR = "connection_error"
    RATE_LIMITED = "rate_limited"
    TRUNCATED = "truncated"
    TASK_TIMEOUT = "task_timeout"
    LEASE_TIMEOUT = "lease_timeout"
    CRASHED = "crashed"
    MAX_TURNS = "max_turns"
    MAX_TOOL_CALLS = "max_tool_calls"
    BUDGET_EXCEEDED = "budget_exceeded"
    LOOP = "loop"
    SCORER_ERROR = "scorer_error"
    SANDBOX_ERROR = "sandbox_error"
    TEST_ERROR = "test_error"
    ENDPOINT_DOWN = "endpoint_down"
    INTERNAL = "internal"


class LLMBenchError(Exception):
    """Base of every error raised by the plugin."""


class ConfigError(LLMBenchError):
    """An option, ini key, environment variable or config file value is invalid."""


class SuiteError(LLMBenchError):
    """A suite file violates the schema: names the file, the key path and the fix."""

    def __init__(self, path: str, key: str, problem: str, fix: str = "") -> None:
        self.path, self.key, self.problem, self.fix = path, key, problem, fix
        msg = f"{path}: {key}: {problem}" if key else f"{path}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.key, self.problem, self.fix))


class ScorerError(LLMBenchError):
    """An unknown scorer, bad scorer options, or a scorer that raised."""


class StoreError(LLMBenchError):
    """The result store cannot be used as asked."""


class LeaseTimeout(LLMBenchError):
    """A lease on a named resource pool could not be acquired within the timeout."""

    def __init__(self, pool: str, timeout: float) -> None:
        self.pool, self.timeout = pool, timeout
        super().__init__(f"no slot of resource pool {pool!r} became free within {timeout:g} s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pool, self.timeout))


class LeaseExpired(LLMBenchError):
    """A lease was held past its maximum occupation: reclaimed, and the test holding it
    interrupted (error class ``lease_timeout``)."""

    error_class = "lease_timeout"

    def __init__(self, pool: str, slot: int, held: float, limit: float) -> None:
        self.pool, self.slot, self.held, self.limit = pool, slot, held, limit
        super().__init__(
            f"[lease_timeout] held resource {pool!r} (slot {slot}) for {held:.1f} s, over its"
            f" limit of {limit:g} s (lease_max): the lease was reclaimed"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.pool, self.slot, self.held, self.limit))


class APIError(LLMBenchError):
    """A chat call failed for good. ``error_class`` is a key of ``ERROR_CLASSES``."""

    def __init__(self, message: str, error_class: str = "api_error", status: int | None = None) -> None:
        self.error_class, self.status = error_class, status
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.error_class, self.status))


class APITimeoutError(APIError):
    def __init__(self, message: str, error_class: str = "api_timeout", status: int | None = None) -> None:
        super().__init__(message, error_class, status)


class EndpointDown(APIError):
    """The endpoint's circuit breaker is open: no request was sent (``coord/breaker.py``)."""

    probing = False
    """Another caller's probe is deciding whether the endpoint is back (worth a wait)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"endpoint {url} is down (circuit breaker open: {reason})",
                         "endpoint_down")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.url, self.reason))


class AgentStop(LLMBenchError):
    """A limit ended an item's agent loop; ``error_class`` is ``max_turns``,
    ``max_tool_calls``, ``budget_exceeded`` or ``loop``; ``detail`` names what repeated or
    what was counted (for the report)."""

    def __init__(self, error_class: str, message: str, detail: str = "") -> None:
        self.error_class, self.detail = error_class, detail
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.error_class, str(self), self.detail))


class AttemptFailure(LLMBenchError):
    """One failed attempt of a chat call, classified by the provider that made it.

    ``outcome`` is a key of ``OUTCOME_TO_ERROR_CLASS`` (``timeout``, ``connection_error``,
    ``rate_limited``, ``server_error``, ``auth_error``, ``bad_request``, ``api_error``,
    ``truncated``, ``endpoint_down``); ``retryable`` says whether the retry policy may try
    again; ``status`` is the HTTP status when one arrived; ``retry_after`` the seconds the
    server asked to wait (uncapped: the API layer applies its limits). ``error`` must already
    be scrubbed of secrets (``scrub.scrub``): it is stored and shown.
    """

    def __init__(self, outcome: str, error: str, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(error)
        self.outcome, self.error, self.retryable = outcome, error, retryable
        self.status, self.retry_after = status, retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.outcome, self.error, self.retryable, self.status,
                             self.retry_after))


# --- HTTP classification (the single place that decides what is retried) -----------------

NEVER_RETRY = frozenset({400, 401, 403, 404, 422})
RETRY = frozenset({408, 409, 429})


def classify_status(status: int) -> tuple[str, bool]:
    """Map an HTTP status to ``(attempt outcome / error class, retryable)``."""
    if status in (401, 403):
        return "auth_error", False
    if status in NEVER_RETRY:
        return "bad_request", False
    if status == 429:
        return "rate_limited", True
    if status in RETRY:
        return "api_error", True
    if status >= 500:
        return "server_error", True
    return "api_error", False


#: attempt outcome -> the item's error class when it is the last one.
class Outcome(StrEnum):
    """The outcome of one attempt of a chat call (``Attempt.outcome``)."""

    OK = "ok"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    CONNECTION_ERROR = "connection_error"
    TRUNCATED = "truncated"
    ENDPOINT_DOWN = "endpoint_down"
    AUTH_ERROR = "auth_error"
    BAD_REQUEST = "bad_request"
    API_ERROR = "api_error"


OUTCOME_TO_ERROR_CLASS: dict[str, str] = {
    "timeout": "api_timeout",
    "rate_limited": "rate_limited",
    "server_error": "api_error",
    "connection_error": "connection_error",
    "truncated": "truncated",
    "endpoint_down": "endpoint_down",
    "auth_error": "auth_error",
    "bad_request": "bad_request",
    "api_error": "api_error",
}
