"""The simulator as an agent: deterministic tool use for requests that offer ``tools``.

Tools are recognised by their argument names, never by the example suites' answers: a tool
with an ``expression`` parameter is a calculator, one with a ``query`` parameter a lookup.
For the last user message (directives removed), with the tool results that came back since:

1. **Lookups.** Each ``the ATTRIBUTE of Name`` phrase (``the population of Lisbon``) is a
   lookup of ``ATTRIBUTE of Name``; the missing ones are asked for together, as parallel
   tool calls in one answer.
2. **Calculator.** With two looked-up numbers and an operator word between the phrases
   (``plus``, ``minus``, ``times``, ``divided by``), or with an arithmetic question and no
   lookup, the calculator is called with the expression.
3. **Answer.** The calculator's result, else the (single) lookup's result. A calculator that
   failed (an ``ERROR:`` result: a timeout, a crash) is worked around by computing the
   expression itself; a failed lookup gives ``I could not find that out.``

Directive ``agent=MODE`` (docs/simulator.md) asks for misbehaviour: ``loop`` repeats the
same call forever, ``forever`` calls with new arguments every time (never answers),
``bad_args`` first sends arguments that break the tool's schema, ``unknown_tool`` first
calls a tool that does not exist; the last two then go on as normal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_llmbench.sim.arith import ArithError, compute, evaluate, find_expression, format_number
from pytest_llmbench.sim.faults import message_text, strip_directives

__all__ = ["AGENT_MODES", "Reply", "agent_reply"]

AGENT_MODES = ("loop", "forever", "bad_args", "unknown_tool")
UNKNOWN_TOOL = "no_such_tool"
NOT_FOUND = "I could not find that out."

_LOOKUP_RE = re.compile(r"\bthe ([a-z]+(?: [a-z]+)?) of ([A-Z][\w-]*(?: [A-Z][\w-]*)*)")
_OPS = (("divided by", "/"), ("plus", "+"), ("minus", "-"), ("times", "*"))
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Reply:
    """The simulated answer: text, or tool calls (``{"name", "arguments"}``, arguments as
    JSON text)."""

    text: str = ""
    tool_calls: list[dict[str, str]] = field(default_factory=list)


@dataclass
class _State:
    question: str
    calls: list[tuple[str, str, str]]
    """``(name, canonical arguments, result)`` of the calls made since the question."""
    calculator: str | None
    lookup: str | None

    def result(self, name: str | None, args: Mapping[str, Any]) -> str | None:
        wanted = json.dumps(args, sort_keys=True)
        return next((r for n, a, r in self.calls if n == name and a == wanted), None)


def _tool_with(tools: Sequence[Any], parameter: str) -> str | None:
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        props = (function.get("parameters") or {}).get("properties")
        if isinstance(props, dict) and parameter in props and isinstance(function.get("name"), str):
            return str(function["name"])
    return None


def _state(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any]) -> _State:
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    question = strip_directives(message_text(messages[last_user].get("content"))) \
        if last_user >= 0 else ""
    pending: dict[str, tuple[str, str]] = {}
    calls: list[tuple[str, str, str]] = []
    for message in messages[last_user + 1:]:
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                try:
                    args = json.dumps(json.loads(function.get("arguments") or "{}"),
                                      sort_keys=True)
                except ValueError:
                    args = str(function.get("arguments"))
                pending[str(call.get("id"))] = (str(function.get("name")), args)
        elif message.get("role") == "tool":
            name, args = pending.get(str(message.get("tool_call_id")), ("", ""))
            calls.append((name, args, message_text(message.get("content"))))
    return _State(question, calls, _tool_with(tools, "expression"), _tool_with(tools, "query"))


def _call(name: str, args: Mapping[str, Any]) -> dict[str, str]:
    return {"name": name, "arguments": json.dumps(args, sort_keys=True)}


def _failed(result: str | None) -> bool:
    return result is not None and result.startswith("ERROR")


def _bad_args(tools: Sequence[Any]) -> dict[str, str]:
    """A call of the first tool whose arguments break its schema: every declared property
    with a value of the wrong type (a string where a number is expected, else a number)."""
    function = tools[0].get("function") or {}
    props = (function.get("parameters") or {}).get("properties")
    props = props if isinstance(props, dict) else {}
    args = {name: ("not a number" if isinstance(spec, dict)
                   and spec.get("type") in ("number", "integer") else 12345)
            for name, spec in props.items()}
    return _call(str(function.get("name")), args or {"unexpected": True})


def _misbehave(mode: str, state: _State, tools: Sequence[Any]) -> Reply | None:
    first = state.lookup or state.calculator or str(tools[0]["function"]["name"])
    key = "query" if first == state.lookup else "expression"
    if mode == "loop":
        return Reply(tool_calls=[_call(first, {key: state.question})])
    if mode == "forever":
        return Reply(tool_calls=[_call(first, {key: f"{state.question} #{len(state.calls) + 1}"})])
    if state.calls:
        return None  # bad_args / unknown_tool: only the first call misbehaves
    if mode == "bad_args":
        return Reply(tool_calls=[_bad_args(tools)])
    return Reply(tool_calls=[_call(UNKNOWN_TOOL, {"q": state.question})])


def _combine(question: str, values: list[str]) -> str | None:
    """``A op B`` when the question combines two looked-up values with an operator word."""
    if len(values) != 2:
        return None
    numbers = [_NUMBER_RE.findall(v) for v in values]
    if not all(numbers):
        return None
    between = question.lower()
    for word, symbol in _OPS:
        if word in between:
            return f"{numbers[0][-1]} {symbol} {numbers[1][-1]}"
    return None


def _calculate(state: _State, expression: str) -> Reply:
    args = {"expression": expression}
    result = state.result(state.calculator, args) if state.calculator else None
    if state.calculator and result is None:
        return Reply(tool_calls=[_call(state.calculator, args)])
    if result is not None and not _failed(result):
        return Reply(text=result.strip())
    try:  # no calculator, or it failed: work it out ourselves
        return Reply(text=format_number(evaluate(expression)))
    except ArithError:
        return Reply(text="I cannot compute that.")


def _lookups(state: _State, lookup: str, queries: list[str]) -> Reply:
    """Ask for the missing lookups (all at once), then combine or give their result."""
    missing = [q for q in queries if state.result(lookup, {"query": q}) is None]
    if missing:
        return Reply(tool_calls=[_call(lookup, {"query": q}) for q in missing])
    values = [state.result(lookup, {"query": q}) or "" for q in queries]
    if any(_failed(v) for v in values):
        return Reply(text=NOT_FOUND)
    expression = _combine(state.question, values)
    if expression is not None:
        return _calculate(state, expression)
    return Reply(text=values[-1].strip())


def agent_reply(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any],
                mode: str | None = None) -> Reply | None:
    """The next step for a conversation that offers ``tools``; ``None`` when the question
    needs none of them (the plain rule-based model answers)."""
    if not tools:
        return None
    state = _state(messages, tools)
    if mode is not None:
        reply = _misbehave(mode, state, tools)
        if reply is not None:
            return reply
    queries = [f"{a} of {e}" for a, e in _LOOKUP_RE.findall(state.question)]
    if queries and state.lookup:
        return _lookups(state, state.lookup, queries)
    expression = find_expression(state.question)
    if expression is None:
        try:
            value = compute(state.question)
        except ArithError:
            value = None
        expression = None if value is None else format_number(value)
    if expression is not None and state.calculator:
        return _calculate(state, expression)
    return None
