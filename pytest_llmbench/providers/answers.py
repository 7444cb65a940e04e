"""Answers of an OpenAI-compatible endpoint into our ``Completion``.

A whole answer is read from its parsed JSON; a stream's events become the SDK's
``ChatCompletionChunk`` the way the SDK itself builds them (``construct_type``: no
validation, unknown fields kept). Either way every field is read with its type checked,
because the server is not trusted: a ``message``
that is a string, usage that is not a number (or is absurdly large), a ``delta`` that is not
an object, content that is neither text nor a list of parts is an ``AttemptFailure``
(``api_error``, retried per the policy) naming what was malformed, never a crash.

Streams are accumulated by ``StreamAnswer``: text and refusal deltas concatenated, tool-call
deltas merged by their ``index`` (id and name from the first delta that has them, the
argument fragments joined), reasoning text from ``reasoning_content`` / ``reasoning``,
logprob entries appended, usage from the last chunk that carries it. The text kept is
capped; past the cap the attempt fails as "response too large".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from openai._models import construct_type
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel

from pytest_llmbench.errors import AttemptFailure
from pytest_llmbench.records import Completion, ToolCall
from pytest_llmbench.scrub import scrub

__all__ = ["StreamAnswer", "completion_from_json", "load_json", "too_large"]

MAX_TOOL_CALLS = 128
"""Tool calls kept of one answer; more is not an answer we act on."""
MAX_TOKENS_COUNT = 10**12
"""Usage numbers above this are not believed (a malformed answer, not a bill)."""


def malformed(what: str) -> AttemptFailure:
    return AttemptFailure("api_error", f"malformed answer: {what}", True)


def too_large(cap: int) -> AttemptFailure:
    return AttemptFailure("api_error", f"response too large (over {cap} bytes; the model's "
                          "max_response_bytes)", False)


def load_json(raw: bytes | str, what: str, *keys: str | None) -> Any:
    """Parse JSON from the server; invalid or absurdly deep JSON is an ``api_error``."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise malformed(f"{what} is nested too deeply") from None
    except ValueError:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        quoted = scrub(text[:80], *keys)
        raise AttemptFailure("api_error", f"invalid JSON in {what} ({len(raw)} bytes): "
                             f"{quoted!r}", True) from None


def _type(value: Any) -> str:
    return type(value).__name__


def _count(usage: Any, name: str) -> int:
    value = getattr(usage, name, None)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_COUNT:
        raise malformed(f"usage.{name} is {_type(value)} {str(value)[:40]!r}, not a token count")
    return value


def _usage(usage: Any) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    if isinstance(usage, (str, int, float, list)):
        raise malformed(f"usage is a {_type(usage)}, not an object")
    return _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")


def _text_of(content: Any, where: str) -> tuple[str, tuple[Mapping[str, Any], ...]]:
    """``(text, parts)`` of a message's content: a string, None, or a list of parts."""
    if content is None:
        return "", ()
    if isinstance(content, str):
        return content, ()
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        text = "".join(str(p.get("text") or "") for p in content if p.get("type") == "text")
        return text, tuple(content)
    raise malformed(f"{where} is a {_type(content)}, not text or a list of content parts")


def _arguments(value: Any) -> str:
    """A tool call's arguments as text (a server may send them as a JSON object)."""
    if isinstance(value, str):
        return value
    return "" if value is None else json.dumps(value)


def _tool_calls(raw: Any, keys: tuple[str | None, ...]) -> tuple[ToolCall, ...]:
    """``message.tool_calls`` of an answer. The model's output is not trusted to be well
    formed: an entry without a function name is dropped (it cannot be run), at most
    ``MAX_TOOL_CALLS`` are kept."""
    calls = []
    for n, call in enumerate(raw[:MAX_TOOL_CALLS] if isinstance(raw, list) else ()):
        function = call.get("function") if isinstance(call, dict) else getattr(call, "function",
                                                                                None)
        name = (function.get("name") if isinstance(function, dict)
                else getattr(function, "name", None))
        if not isinstance(name, str) or not name:
            continue
        args = (function.get("arguments") if isinstance(function, dict)
                else getattr(function, "arguments", None))
        ident = call.get("id") if isinstance(call, dict) else getattr(call, "id", None)
        calls.append(ToolCall(id=str(ident or f"call_{n}"), name=name,
                              arguments=scrub(_arguments(args), *keys, labelled=False)))
    return tuple(calls)


def _reasoning(extra: Mapping[str, Any] | None) -> str | None:
    for name in ("reasoning_content", "reasoning"):
        value = (extra or {}).get(name)
        if isinstance(value, str):
            return value
    return None


def _logprobs(value: Any) -> Any:
    if value is None:
        return None
    dump = getattr(value, "model_dump", None)
    return dump(mode="json", warnings=False) if dump is not None else value


def completion_from_json(data: Any, model: str, *keys: str | None) -> Completion:
    """A non-streamed answer (the parsed JSON body) as a ``Completion``.

    Read from the parsed JSON itself, every field type-checked: building the SDK's
    ``ChatCompletion`` first (``construct_type``, which checks nothing either) cost ~0.4 ms
    of CPU per answer, a tenth of an item's at zero latency. The field names and meanings
    are the SDK's (``openai.types.chat.ChatCompletion``)."""
    if not isinstance(data, dict):
        raise malformed(f"the body is a JSON {_type(data)}, not an object")
    choices = data.get("choices")
    if not choices or not isinstance(choices, list):
        if data.get("error"):
            detail = scrub(" ".join(json.dumps(data["error"])[:300].split()), *keys)
            raise AttemptFailure("api_error", f"HTTP 200 carrying an error: {detail}", True)
        raise malformed("HTTP 200 without choices")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise malformed(f"choices[0] is a {_type(choice)}, not an object")
    message = choice.get("message")
    if not isinstance(message, dict):
        raise malformed(f"choices[0].message is a {_type(message)}, not an object")
    text, parts = _text_of(message.get("content"), "choices[0].message.content")
    calls = _tool_calls(message.get("tool_calls"), keys)
    prompt_tokens, completion_tokens = _usage(_Fields(data["usage"])
                                              if isinstance(data.get("usage"), dict)
                                              else data.get("usage"))
    refusal = message.get("refusal")
    refusal = refusal if isinstance(refusal, str) else None
    reasoning = _reasoning(message)
    finish = choice.get("finish_reason")
    answered = data.get("model")
    return Completion(
        text=scrub(text, *keys, labelled=False),
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=answered if isinstance(answered, str) and answered else model,
        tool_calls=calls,
        content_parts=parts,
        refusal=scrub(refusal, *keys, labelled=False) if refusal else refusal,
        reasoning=scrub(reasoning, *keys, labelled=False) if reasoning else reasoning,
        logprobs=choice.get("logprobs"),
    )


class _Fields:
    """Attribute access to a JSON object (``usage``), as ``_count`` reads the SDK's models."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data.get(name)


class StreamAnswer:
    """Accumulates the chunks of a streamed answer (choice 0) into a ``Completion``."""

    def __init__(self, model: str, cap: int, keys: Iterable[str | None]) -> None:
        self.model, self.cap, self.keys = model, cap, tuple(keys)
        self.text: list[str] = []
        self.parts: list[Mapping[str, Any]] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] = []
        self.finish: str | None = None
        self.usage = (0, 0)
        self.kept = 0

    def _keep(self, piece: str) -> str:
        self.kept += len(piece)
        if self.kept > self.cap:
            raise too_large(self.cap)
        return piece

    def add(self, data: Any) -> None:
        """One event's JSON (already parsed)."""
        if not isinstance(data, dict):
            raise malformed(f"a stream event is a JSON {_type(data)}, not an object")
        if data.get("error"):
            detail = scrub(" ".join(json.dumps(data["error"])[:300].split()), *self.keys)
            raise AttemptFailure("api_error", f"error event in stream: {detail}", True)
        chunk: Any = construct_type(type_=ChatCompletionChunk, value=data)  # unchecked yet
        if isinstance(chunk.model, str) and chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self.usage = _usage(chunk.usage)
        if not isinstance(chunk.choices, (list, type(None))):
            raise malformed(f"choices of a stream event is a {_type(chunk.choices)}")
        for choice in chunk.choices or ():
            if not isinstance(choice, BaseModel):
                raise malformed(f"a stream choice is a {_type(choice)}, not an object")
            if getattr(choice, "index", None) not in (0, None):
                continue
            self._delta(getattr(choice, "delta", None))  # a last chunk may have none
            logprobs = getattr(choice, "logprobs", None)
            if logprobs is not None:
                self.logprobs.append(_logprobs(logprobs))
            finish = getattr(choice, "finish_reason", None)
            if isinstance(finish, str) and finish:
                self.finish = finish

    def _delta(self, delta: Any) -> None:
        if delta is None:
            return
        if not hasattr(delta, "content"):
            raise malformed(f"choices[0].delta is a {_type(delta)}, not an object")
        if isinstance(delta.content, list):
            text, parts = _text_of(delta.content, "choices[0].delta.content")
            self.parts.extend(parts)
            self.text.append(self._keep(text))
        elif delta.content is not None:
            if not isinstance(delta.content, str):
                raise malformed(f"choices[0].delta.content is a {_type(delta.content)}")
            self.text.append(self._keep(delta.content))
        if isinstance(delta.refusal, str):
            self.refusal.append(self._keep(delta.refusal))
        reasoning = _reasoning(delta.model_extra)
        if reasoning:
            self.reasoning.append(self._keep(reasoning))
        for call in delta.tool_calls or ():
            self._tool_delta(call)

    def _tool_delta(self, call: Any) -> None:
        index = getattr(call, "index", None)
        if index is None:
            index = len(self.calls)
        if not isinstance(index, int) or (index not in self.calls
                                          and len(self.calls) >= MAX_TOOL_CALLS):
            return  # not a call we can place, or one too many: dropped
        slot = self.calls.setdefault(index, {"id": "", "name": "", "arguments": []})
        if isinstance(getattr(call, "id", None), str) and call.id:
            slot["id"] = call.id
        function = getattr(call, "function", None)
        if function is not None:
            if isinstance(getattr(function, "name", None), str):
                slot["name"] += self._keep(function.name)  # some servers send it in pieces
            args = getattr(function, "arguments", None)
            if isinstance(args, str):
                slot["arguments"].append(self._keep(args))

    def completion(self) -> Completion:
        """The answer, once the stream has ended (a missing finish reason is ``truncated``)."""
        text = "".join(self.text)
        if self.finish is None:
            raise AttemptFailure("truncated", f"stream ended without a finish reason after "
                                 f"{len(text)} chars", True)
        keys = self.keys
        calls = tuple(
            ToolCall(id=slot["id"] or f"call_{index}", name=slot["name"],
                     arguments=scrub("".join(slot["arguments"]), *keys, labelled=False))
            for index, slot in sorted(self.calls.items()) if slot["name"])
        logprobs: Any = None
        if self.logprobs:
            content = [e for lp in self.logprobs if isinstance(lp, dict)
                       for e in (lp.get("content") or ())]
            logprobs = {"content": content}
        return Completion(
            text=scrub(text, *keys, labelled=False), finish_reason=self.finish, prompt_tokens=self.usage[0],
            completion_tokens=self.usage[1], model=self.model, tool_calls=calls,
            content_parts=tuple(self.parts),
            refusal=scrub("".join(self.refusal), *keys, labelled=False) if self.refusal else None,
            reasoning=scrub("".join(self.reasoning), *keys, labelled=False) if self.reasoning else None,
            logprobs=logprobs)
