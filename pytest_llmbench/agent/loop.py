"""An item's conversation: scripted turns, and for agent items the tool-call loop.

``Conversation.run()`` sends each scripted turn's messages and takes the model's answer. For
an item with tools (or an ``agent`` table) an answer with tool calls does not end the turn:
every call of the answer is run (``ToolRunner``; parallel calls are all run, in order) and its
result appended as a ``tool`` message, then the model is called again, until it answers
without tool calls or a limit ends the item (``Guards`` raises ``AgentStop``). Every model
call goes through ``api.chat`` with the item's one task deadline, so a loop of hanging calls
ends at the task deadline, never after turns x retries.

For agent items, everything that happens is appended to the item's transcript
(``ItemResult.transcript``) and sent to the engine as it happens (``emit("transcript",
entry)``), so an item killed at its deadline still reports what its agent did. A plain item
has no transcript: its ``messages`` and ``completions`` (timing, tokens) already say it all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pytest_llmbench.agent.guards import Guards
from pytest_llmbench.agent.tools import ToolRunner
from pytest_llmbench.records import AgentLimits, Completion, ItemResult, Message, to_jsonable

__all__ = ["Chat", "Conversation"]

Chat = Callable[..., Completion]
"""``chat(messages, *, turn, tools)`` -> the model's answer (``api.chat`` bound to the item)."""
Emit = Callable[[str, Any], None]



class Conversation:
    """One item's exchange with the model (see the module docstring)."""

    def __init__(self, *, turns: tuple[tuple[Message, ...], ...], chat: Chat, emit: Emit,
                 result: ItemResult, started: float, limits: AgentLimits | None,
                 runner: ToolRunner | None) -> None:
        self.turns = turns
        self.chat = chat
        self.emit = emit
        self.result = result
        self.started = started
        self.limits = limits
        self.runner = runner
        self.guards = Guards(limits) if limits is not None else None
        self.messages: list[Message] = []
        self.calls = 0
        self.cap = limits.result_chars if limits is not None else 0
        self.tools = ([t.openai_tool() for t in runner.tools.values()]
                      if runner is not None and runner.tools else None)

    def record(self, kind: str, **data: Any) -> None:
        if self.limits is None:
            # A plain item's record already holds all of it (messages, completions with
            # their timing and tokens): no second copy in the store and its index.
            return
        entry = {"kind": kind, "t": round(time.monotonic() - self.started, 4), **data}
        self.result.transcript.append(entry)
        self.emit("transcript", entry)

    def _short(self, text: str) -> str:
        return text if len(text) <= self.cap else text[:self.cap] + f" ... [{len(text)} chars]"

    def run(self) -> str:
        """Every scripted turn; returns the final answer's text. Raises ``APIError`` or
        ``AgentStop``."""
        answer = ""
        for turn, turn_messages in enumerate(self.turns):
            self.result.turn = turn if self.limits is None else self.calls
            for message in turn_messages:
                self.messages.append(dict(message))
                if self.limits is not None:
                    self.record("message", role=message.get("role"),
                                content=self._short(str(message.get("content", ""))))
            self.emit("turn", {"turn": self.result.turn})
            answer = self.turn(turn)
        return answer

    def turn(self, turn: int) -> str:
        while True:
            if self.guards is not None:
                self.guards.before_call()
                if self.calls > self.result.turn:  # an agent's turn is a model call
                    self.result.turn = self.calls
                    self.emit("turn", {"turn": self.calls})
            completion = self.chat(self.messages, turn=self.calls, tools=self.tools)
            self.calls += 1
            self.answered(completion, turn)
            if self.guards is not None:
                self.guards.after_answer(completion)
                self.guards.check_answer(completion)
            if not completion.tool_calls or self.runner is None:
                return completion.text
            for call in completion.tool_calls:
                outcome = self.runner.call(call)
                self.messages.append({"role": "tool", "tool_call_id": call.id,
                                      "content": outcome.content})
                self.record("tool", call=self.calls - 1, id=call.id, name=call.name,
                            arguments=self._short(call.arguments), ok=outcome.ok,
                            content=outcome.content, duration=round(outcome.duration, 4))

    def answered(self, completion: Completion, turn: int) -> None:
        result = self.result
        data: dict[str, Any] = to_jsonable(completion)
        data["turn"] = turn
        result.completions.append(data)
        self.emit("completion", data)
        result.latency += completion.latency
        result.prompt_tokens += completion.prompt_tokens
        result.completion_tokens += completion.completion_tokens
        self.messages.append(completion.assistant_message() if completion.tool_calls
                             else {"role": "assistant", "content": completion.text})
        if self.limits is None:
            return
        calls = [{"id": c.id, "name": c.name, "arguments": self._short(c.arguments)}
                 for c in completion.tool_calls]
        self.record("answer", call=self.calls - 1, text=self._short(completion.text),
                    tool_calls=calls, finish_reason=completion.finish_reason,
                    latency=round(completion.latency, 4),
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens)

    def stopped(self, error_class: str, detail: str) -> None:
        self.record("stop", error_class=error_class, detail=detail)

