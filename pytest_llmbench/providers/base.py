"""The provider seam: what model access must do for the API layer, and how one is chosen.

A provider makes **one attempt** of a chat call: it builds the request body and sends it,
returns the answer as a ``Completion`` or raises an ``AttemptFailure`` that classifies what
went wrong (outcome, retryable, HTTP status, Retry-After). Everything around attempts stays
in ``api.py`` and is the same for every provider: the retry policy, backoff and Retry-After
waits, the task-deadline cap, rate limits, the ``pytest_llmbench_modify_request`` hook and
the final error class.

The provider for a model is chosen in the pytest process by the ``firstresult`` hook
``pytest_llmbench_get_provider(model)``; when no plugin answers, the plugin's own
OpenAI-compatible provider (``openai_compat.OpenAIProvider``) is used, as pytest-xdist does
for its schedulers. The chosen object travels to the item's process inside the pickled job,
so it must be picklable (a module-level class; state such as HTTP clients is created in the
item process on first use). docs/providers.md shows a provider in a few dozen lines.
"""

from __future__ import annotations

import math
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_llmbench.records import Completion, Message, ModelSpec

__all__ = ["ChatRequest", "Provider", "RequestHook", "parse_retry_after"]


@dataclass(frozen=True, kw_only=True)
class ChatRequest:
    """One chat call as the caller asked for it (the same for every attempt)."""

    model: ModelSpec
    messages: Sequence[Message]
    params: Mapping[str, Any] = field(default_factory=dict)
    """Sampling parameters over the model's defaults; a ``None`` value drops the key."""
    tools: Sequence[Mapping[str, Any]] | None = None
    """OpenAI tool definitions (``{"type": "function", "function": {...}}``)."""
    tool_choice: Any = None
    api_key: str | None = field(default=None, repr=False)
    extra_headers: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    """Where proxy variables are read (None: ``os.environ``)."""
    ssl_context: ssl.SSLContext | None = None
    """Verify TLS with this context instead of the default one (tests, private CAs)."""


class Provider(Protocol):
    """Model access for the API layer: one attempt, classified."""

    def endpoint(self, model: ModelSpec) -> str:
        """Where ``model`` is reached, for messages: no credentials, no query string."""

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of the request. Called before each attempt; the
        ``pytest_llmbench_modify_request`` hooks may then edit it in place."""

    def send(self, request: ChatRequest, body: dict[str, Any], deadline: float) -> Completion:
        """Send ``body`` and return the answer by ``deadline`` (absolute
        ``time.monotonic()``), or raise ``errors.AttemptFailure``. Must not retry."""


@dataclass(frozen=True)
class RequestHook:
    """One ``pytest_llmbench_modify_request`` implementation, callable in an item process
    (pluggy lives in the pytest process only; the function travels in the job by reference)."""

    function: Any
    argnames: tuple[str, ...]

    def __call__(self, body: dict[str, Any], model: ModelSpec) -> None:
        values = {"body": body, "model": model}
        self.function(**{name: values[name] for name in self.argnames})


# --- for providers of HTTP services ----------------------------------------------------


def _header(headers: Any, name: str) -> str | None:
    getter = getattr(headers, "get", None)
    if getter is not None and not isinstance(headers, dict):  # case-insensitive mappings
        value = getter(name)
        return None if value is None else str(value)
    for key, value in headers.items():
        if key.lower() == name:
            return str(value)
    return None


def parse_retry_after(headers: Mapping[str, str] | Any, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` first, then ``Retry-After``
    (delta seconds or an HTTP date, relative to ``now``, Unix time); None if absent or
    unreadable. Not capped: ``chat`` compares it with the model's ``max_retry_after``."""
    ms = _header(headers, "retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return max(0.0, value)
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
    return max(0.0, value)
