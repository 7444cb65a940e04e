"""What came back from one attempt: the answer parsed, or the reason the attempt failed.

``_Failure`` is a failed attempt as the retry loop in ``api.py`` sees it (outcome, error,
retryable, status, Retry-After); the parsers here raise it for answers that are not usable
(invalid JSON, no choices, an error event, a stream without a finish reason). A JSON body
becomes a ``Completion`` in ``_parse_json``, a server-sent-event stream in ``_read_stream``;
error bodies are shortened and scrubbed of the API key by ``_error_detail``. Kept apart from
the retry policy (``api.py``) and the socket plumbing (``transport.py``): this module only
turns a response's bytes into a result.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Mapping
from typing import Any

from pytest_llmbench.providers.transport import _READ_SIZE
from pytest_llmbench.records import Completion, ModelSpec, ToolCall

_MAX_TOOL_CALLS = 128  # per answer; more is not an answer we act on


class _Failure(Exception):
    """One failed attempt (internal): what the retry loop needs to decide."""

    def __init__(self, outcome: str, error: str, retryable: bool, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(error)
        self.outcome, self.error, self.retryable = outcome, error, retryable
        self.status, self.retry_after = status, retry_after


def _error_detail(raw: bytes, api_key: str | None) -> str:
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err:
            text = str(err)
    text = " ".join(text.split())
    if api_key:
        text = text.replace(api_key, "***")
    return text[:300] + ("..." if len(text) > 300 else "")


def _usage(data: Mapping[str, Any]) -> tuple[int, int]:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _text(content: Any) -> str:
    """A message's content as text: a string, or the text parts of a list of parts."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content if isinstance(content, str) else ""


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    """``message.tool_calls`` of a JSON answer; malformed entries are skipped (the model's
    output is not trusted to be well formed, and a call without a name cannot be run)."""
    calls = []
    for i, entry in enumerate(raw[:_MAX_TOOL_CALLS] if isinstance(raw, list) else ()):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments) if arguments is not None else ""
        calls.append(ToolCall(id=str(entry.get("id") or f"call_{i}"), name=function["name"],
                              arguments=arguments))
    return tuple(calls)


def _parse_json(raw: bytes, model: ModelSpec, api_key: str | None) -> Completion:
    try:
        data = json.loads(raw)
    except ValueError:
        raise _Failure("api_error", f"HTTP 200 with invalid JSON ({len(raw)} bytes)", True) from None
    if not isinstance(data, dict):
        raise _Failure("api_error", "HTTP 200 with a JSON body that is not an object", True)
    choices = data.get("choices")
    if not choices or not isinstance(choices, list) or not isinstance(choices[0], dict):
        if data.get("error"):
            detail = _error_detail(json.dumps(data).encode(), api_key)
            raise _Failure("api_error", f"HTTP 200 carrying an error: {detail}", True)
        raise _Failure("api_error", "HTTP 200 without choices", True)
    choice = choices[0]
    message = choice.get("message") or {}
    prompt_tokens, completion_tokens = _usage(data)
    return Completion(
        text=_text(message.get("content")),
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=str(data.get("model") or model.model),
        tool_calls=_tool_calls(message.get("tool_calls")),
    )


class _StreamedCalls:
    """Tool-call deltas of a stream, joined by their ``index`` (id and name come first,
    the arguments in pieces)."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas if isinstance(deltas, list) else ():
            if not isinstance(delta, dict):
                continue
            index = delta.get("index", len(self.calls))
            if not isinstance(index, int) or (index not in self.calls
                                              and len(self.calls) >= _MAX_TOOL_CALLS):
                continue
            call = self.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(delta.get("id"), str):
                call["id"] = delta["id"]
            function = delta.get("function")
            if isinstance(function, dict):
                if isinstance(function.get("name"), str):
                    call["name"] += function["name"]
                if isinstance(function.get("arguments"), str):
                    call["arguments"] += function["arguments"]

    def result(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(id=c["id"] or f"call_{i}", name=c["name"], arguments=c["arguments"])
                     for i, c in sorted(self.calls.items()) if c["name"])


def _read_stream(resp: http.client.HTTPResponse, model: ModelSpec, api_key: str | None,
                 ) -> Completion:
    """Server-sent events: concatenate ``choices[0].delta.content`` until ``[DONE]`` or EOF."""
    parts: list[str] = []
    finish: str | None = None
    usage = (0, 0)
    answered_model = model.model
    calls = _StreamedCalls()
    pending: list[bytes] = []  # data lines of the event being read
    buf = b""
    done = False

    def dispatch() -> bool:
        nonlocal finish, usage, answered_model
        payload = b"\n".join(pending).strip()
        pending.clear()
        if payload == b"[DONE]":
            return True
        try:
            chunk = json.loads(payload)
        except ValueError:
            raise _Failure("api_error", f"invalid JSON in stream event: {payload[:80]!r}",
                           True) from None
        if not isinstance(chunk, dict):
            return False
        if chunk.get("error"):
            detail = _error_detail(json.dumps(chunk).encode(), api_key)
            raise _Failure("api_error", f"error event in stream: {detail}", True)
        answered_model = str(chunk.get("model") or answered_model)
        if isinstance(chunk.get("usage"), dict):
            usage = _usage(chunk)
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                parts.append(content)
            if isinstance(delta, dict) and delta.get("tool_calls"):
                calls.add(delta["tool_calls"])
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        return False

    while not done:
        data = resp.read1(_READ_SIZE)
        if not data:
            break
        buf += data
        while not done:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].rstrip(b"\r"), buf[nl + 1:]
            if not line:
                if pending:
                    done = dispatch()
            elif line.startswith(b"data:"):
                pending.append(line[6:] if line[5:6] == b" " else line[5:])
    if not done and buf.startswith(b"data:"):  # last line without its newline
        pending.append(buf[6:] if buf[5:6] == b" " else buf[5:])
    if not done and pending:
        dispatch()
    if finish is None:
        text = "".join(parts)
        raise _Failure("truncated",
                       f"stream ended without a finish reason after {len(text)} chars", True)
    return Completion(text="".join(parts), finish_reason=finish, prompt_tokens=usage[0],
                      completion_tokens=usage[1], model=answered_model,
                      tool_calls=calls.result())
