"""The limits of an agent loop and its loop detection (pure bookkeeping, no I/O).

``Guards`` is asked before every model call (``max_turns``), after every answer (token
budget), and before the tool calls of an answer are run (repeated calls, repeated assistant
messages, ``max_tool_calls``). Each check raises ``AgentStop`` with its own error class.

A call's identity is its name and its *canonical* arguments: the JSON parsed and dumped with
sorted keys and no blanks, so ``{"b": 1, "a": 2}`` and ``{"a":2,"b":1}`` are the same call
(arguments that are not JSON are compared as the stripped text). The ``loop_repeats``-th
occurrence of one call anywhere in the item ends it (with the default 3: two identical calls
run, the third stops the item before it runs); so does the ``loop_repeats``-th identical
assistant message with tool calls (same text, same calls in the same order, ids ignored).
"""

from __future__ import annotations

import collections
import json

from pytest_llmbench.errors import AgentStop
from pytest_llmbench.records import AgentLimits, Completion, ToolCall

__all__ = ["Guards", "call_key", "canonical_arguments"]

_SHOWN = 200  # characters of a repeated call shown in the error


def canonical_arguments(arguments: str) -> str:
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments.strip()
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def call_key(call: ToolCall) -> str:
    """``name(canonical arguments)``: what makes two calls the same call."""
    return f"{call.name}({canonical_arguments(call.arguments)})"


def _short(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


class Guards:
    """Counts one item's model calls, tool calls, tokens and repeats against its limits."""

    def __init__(self, limits: AgentLimits) -> None:
        self.limits = limits
        self.model_calls = 0
        self.tool_calls = 0
        self.tokens = 0
        self._calls: collections.Counter[str] = collections.Counter()
        self._answers: collections.Counter[str] = collections.Counter()

    def before_call(self) -> None:
        """Raises ``max_turns`` when the item already made ``max_turns`` model calls."""
        if self.model_calls >= self.limits.max_turns:
            raise AgentStop("max_turns",
                            f"the model still called tools after max_turns = "
                            f"{self.limits.max_turns} model calls",
                            f"{self.model_calls} model calls, {self.tool_calls} tool calls")
        self.model_calls += 1

    def after_answer(self, completion: Completion) -> None:
        """Counts the answer's tokens; raises ``budget_exceeded`` past the budget."""
        self.tokens += completion.prompt_tokens + completion.completion_tokens
        budget = self.limits.token_budget
        if budget is not None and self.tokens > budget:
            raise AgentStop("budget_exceeded",
                            f"{self.tokens} tokens spent, over the token_budget of {budget}",
                            f"after model call {self.model_calls}")

    def check_answer(self, completion: Completion) -> None:
        """Every answer, before its tool calls run: repeated calls, repeated messages (an
        answer without tool calls counts too: a model that keeps giving the same reply to
        scripted turns is looping), then the tool-call count."""
        n = self.limits.loop_repeats
        for call in completion.tool_calls:
            key = call_key(call)
            self._calls[key] += 1
            if self._calls[key] >= n:
                raise AgentStop("loop", f"the same tool call was made {n} times: {_short(key)}",
                                key)
        if completion.text.strip() or completion.tool_calls:
            message = json.dumps([completion.text.strip(),
                                  [call_key(c) for c in completion.tool_calls]],
                                 ensure_ascii=False)
            self._answers[message] += 1
            if self._answers[message] >= n:
                raise AgentStop("loop", f"the same assistant message was sent {n} times: "
                                f"{_short(message)}", message)
        total = self.tool_calls + len(completion.tool_calls)
        if total > self.limits.max_tool_calls:
            raise AgentStop("max_tool_calls",
                            f"{total} tool calls asked for, over max_tool_calls = "
                            f"{self.limits.max_tool_calls}",
                            f"{self.tool_calls} tool calls run before this answer")
        self.tool_calls = total
