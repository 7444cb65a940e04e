"""Fault directives, request keys, deterministic fractions and the RPM window.

A directive is ``[[sim:KEY=VALUE KEY=VALUE ...]]`` inside the last user message; values are
percent-decoded (``answer=forty%20two``). Directives are removed from every message before
the rule-based model reads the conversation, so a fault never changes the right answer.

Everything here is pure and synchronous so it can be unit-tested without a server, and so
the server decides a request's whole fate (and logs it) the moment the request arrives.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

__all__ = [
    "DIRECTIVE_RE",
    "Directive",
    "DirectiveError",
    "RateWindow",
    "fraction",
    "message_text",
    "parse_directives",
    "request_key",
    "strip_directives",
]

DIRECTIVE_RE = re.compile(r"[ \t]*\[\[sim:([^\]]*)\]\]")
"""One directive; group 1 is the ``KEY=VALUE ...`` list."""

_FLOAT_KEYS = ("latency", "slow_first_token", "stall", "retry_after", "retry_after_date")
_INT_KEYS = ("fail", "times", "retry_after_ms")
_FLAG_KEYS = ("reset", "hang", "no_finish", "wrong")
_TEXT_KEYS = ("answer", "program", "agent")
KNOWN_KEYS = _FLOAT_KEYS + _INT_KEYS + _FLAG_KEYS + _TEXT_KEYS


class DirectiveError(ValueError):
    """A directive names an unknown key or has a bad value (the server answers 400)."""


@dataclass(frozen=True, kw_only=True)
class Directive:
    """The parsed ``[[sim:...]]`` keys of one request; ``None``/``False`` = not given."""

    latency: float | None = None
    fail: int | None = None
    retry_after: float | None = None
    retry_after_ms: int | None = None
    retry_after_date: float | None = None
    times: int | None = None
    """The faults apply to the first ``times`` requests of the conversation only."""
    reset: bool = False
    hang: bool = False
    slow_first_token: float | None = None
    stall: float | None = None
    no_finish: bool = False
    wrong: bool = False
    answer: str | None = None
    program: str | None = None
    agent: str | None = None
    """Agent misbehaviour when the request offers tools (``sim/agent.py``)."""

    @property
    def empty(self) -> bool:
        return self == _EMPTY


_EMPTY = Directive()


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, Mapping) and isinstance(p.get("text"), str))
    return ""


def strip_directives(text: str) -> str:
    """``text`` without its directives (and the blanks they leave at either end)."""
    if "[[sim:" not in text:
        return text
    return DIRECTIVE_RE.sub("", text).strip()


def _flag(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise DirectiveError(f"sim directive {key}={value!r}: expected 1 or 0")


def parse_directives(text: str) -> Directive:
    """Every directive in ``text``, merged (a later key wins). Raises ``DirectiveError``."""
    if "[[sim:" not in text:
        return _EMPTY
    values: dict[str, Any] = {}
    for match in DIRECTIVE_RE.finditer(text):
        for token in match.group(1).split():
            key, sep, raw = token.partition("=")
            if not sep:
                raise DirectiveError(f"sim directive token {token!r}: expected KEY=VALUE")
            if key not in KNOWN_KEYS:
                raise DirectiveError(f"unknown sim directive key {key!r}; known: "
                                     + ", ".join(KNOWN_KEYS))
            value = unquote(raw)
            try:
                if key in _FLOAT_KEYS:
                    number = float(value)
                    if not (math.isfinite(number) and number >= 0):
                        raise ValueError(value)
                    values[key] = number
                elif key in _INT_KEYS:
                    values[key] = int(value)
                elif key in _FLAG_KEYS:
                    values[key] = _flag(key, value)
                else:
                    values[key] = value
            except ValueError:
                raise DirectiveError(f"sim directive {key}={value!r}: bad value") from None
    fail = values.get("fail")
    if fail is not None and not 400 <= fail <= 599:
        raise DirectiveError(f"sim directive fail={fail}: expected an HTTP status 400-599")
    for key in ("times", "retry_after_ms"):
        if values.get(key, 0) < 0:
            raise DirectiveError(f"sim directive {key}={values[key]}: must be >= 0")
    return Directive(**values)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(model: str, messages: Sequence[Any]) -> str:
    """The conversation's key: the first 16 hex digits of SHA-256 over the canonical JSON
    (sorted keys, no blanks, UTF-8) of ``{"messages": messages, "model": model}``.

    Retries of one call carry the same key, which is what ``times=N`` counts.
    """
    data = canonical_json({"model": model, "messages": list(messages)})
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def fraction(salt: str, seed: int, messages: Sequence[Any]) -> float:
    """A deterministic number in [0, 1) for a conversation: ``< P`` selects a fraction P of
    distinct prompts, the same ones on every run with the same seed."""
    data = f"{salt}:{seed}:" + canonical_json(list(messages))
    digest = hashlib.sha256(data.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class RateWindow:
    """A sliding 60 s request quota: exact, so a benchmark can count the 429s it caused.

    Only admitted requests consume quota; a rejected one learns how long until the oldest
    admitted request leaves the window.
    """

    WINDOW = 60.0

    def __init__(self, rpm: int) -> None:
        if rpm < 1:
            raise ValueError("rpm must be >= 1")
        self.rpm = rpm
        self._times: collections.deque[float] = collections.deque()

    def admit(self, now: float) -> float:
        """0.0 if admitted (and counted), else the seconds to wait before a retry."""
        horizon = now - self.WINDOW
        times = self._times
        while times and times[0] <= horizon:
            times.popleft()
        if len(times) < self.rpm:
            times.append(now)
            return 0.0
        return max(times[0] - horizon, 0.001)
