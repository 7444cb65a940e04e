"""The work of one item, as run inside its own child process: render -> api -> score.

Nothing here knows about pytest or processes: ``execute`` takes a ``Job`` and an ``emit``
callback for progress events (so a killed item can still be reported with what it had
done), and returns the ``ItemResult``. The engine runs it in a forked child.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_llmbench.agent.loop import Conversation
from pytest_llmbench.agent.tools import ToolRunner
from pytest_llmbench.coord.breaker import CircuitBreaker
from pytest_llmbench.errors import AgentStop, APIError, ScorerError
from pytest_llmbench.providers import api
from pytest_llmbench.providers.base import Provider, RequestHook
from pytest_llmbench.records import (
    ERROR,
    FAILED,
    PASSED,
    AgentLimits,
    Attempt,
    Case,
    Completion,
    Deadlines,
    ItemResult,
    Message,
    ModelSpec,
    Score,
    ScoreRequest,
    to_jsonable,
)

Emit = Callable[[str, Any], None]
Scorer = Callable[[ScoreRequest], Score]

#: error class of an ``APIError`` -> the deadline layer that fired (the API layer decides
#: the class: ``api.chat`` reports ``task_timeout`` when the task deadline ended the call).
DEADLINE_LAYERS = {"api_timeout": "api", "task_timeout": "task", "rate_limited": "api"}


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything a child needs to run one item (built in the parent, inherited by fork)."""

    key: str
    nodeid: str
    identity: Mapping[str, Any]
    case: Case
    model: ModelSpec
    deadlines: Deadlines
    api_key: str | None = field(default=None, repr=False)
    """Read from the environment by the parent; lives only in memory, never written."""
    scorer: Scorer | None = None
    limiter: api.RateLimiter | None = None
    """The machine-wide shared rate limiter (created in the parent, inherited by fork)."""
    provider: Provider | None = None
    """The model's provider (``pytest_llmbench_get_provider``); None: the default one."""
    breaker: CircuitBreaker | None = None
    """The endpoints' circuit breakers, shared machine-wide (``coord/breaker.py``)."""
    fallback_keys: tuple[str | None, ...] = field(default=(), repr=False)
    """The keys of ``model.fallbacks``, in order (read by the parent like ``api_key``)."""
    request_hooks: tuple[RequestHook, ...] = ()
    """The ``pytest_llmbench_modify_request`` implementations, called before each request."""
    rescore_from: ItemResult | None = None
    """Score these stored completions instead of calling the API (``--llmbench-rescore``,
    or a stored answer to the same request found by the item process)."""
    reuse_answers: bool = False
    """Look for a stored answer to the same request before calling the API (off with
    ``--llmbench-fresh``)."""
    shareable: bool = False
    """The item runs only this package's code (the default provider, no request hooks, no
    tools, a built-in text scorer): it may run in a thread of an item host beside other
    such items (``child._Shared``) instead of having a process to itself. Nothing in it
    can leave a process behind, change the environment, or outlive its deadline by more
    than the API layer's own slack."""


def score_answer(job: Job, answer: str, deadline: float | None = None) -> tuple[Score, bool]:
    from pytest_llmbench.scoring.resolve import run_scorer

    if job.scorer is None:
        raise ScorerError(f"no scorer resolved for {job.case.scorer.name!r}")
    req = ScoreRequest(
        answer=answer,
        expected=job.case.expected,
        options=job.case.scorer.options,
        extra=job.case.extra,
        identity=job.identity,
        deadline=deadline,
    )
    return run_scorer(job.scorer, req, job.case.scorer.threshold)


def _conversation(job: Job, emit: Emit, result: ItemResult, task_deadline: float, t0: float,
                  on_attempt: Callable[[Attempt], None]) -> Conversation:
    """The item's conversation, its model calls bound to the item's deadlines and limiter."""
    case = job.case
    runner = None
    if case.tools:
        limits = case.agent or AgentLimits()
        secrets = {job.model.api_key_env or "": job.api_key or ""}
        runner = ToolRunner(case.tools, task_deadline=task_deadline,
                            result_chars=limits.result_chars, secrets=secrets)

    def chat(messages: list[Message], *, turn: int,
             tools: list[dict[str, Any]] | None) -> Completion:
        return api.chat(job.model, messages, params=case.params, tools=tools,
                        deadlines=job.deadlines, task_deadline=task_deadline,
                        api_key=job.api_key, turn=turn, item_started=t0,
                        on_attempt=on_attempt, label=job.nodeid, limiter=job.limiter,
                        provider=job.provider, request_hooks=job.request_hooks,
                        breaker=job.breaker, fallback_keys=job.fallback_keys)

    return Conversation(turns=case.turns, chat=chat, emit=emit, result=result, started=t0,
                        limits=case.agent, runner=runner)


def _expected_error(job: Job, result: ItemResult) -> None:
    """``agent.expect_error``: an item meant to show a limit passes when it ends with that
    error class (kept in ``details``), and fails when it ends any other way."""
    expected = job.case.agent.expect_error if job.case.agent is not None else None
    if expected is None:
        return
    if result.status == ERROR and result.error_class == expected:
        result.status, result.score = PASSED, 1.0
        result.explanation = f"ended with the expected error class {expected!r}: {result.error}"
        result.details = {**result.details, "expected_error": expected}
        result.error_class, result.error = None, ""
    elif result.status != ERROR or result.error_class in ("scorer_error",):
        got = result.error_class if result.status == ERROR else f"an answer ({result.status})"
        result.status, result.score = FAILED, 0.0
        result.explanation = f"expected the item to end with error class {expected!r}, got {got}"


def execute(job: Job, emit: Emit, *, task_deadline: float) -> ItemResult:
    """Run every turn of the item, then score the final answer.

    ``task_deadline`` is an absolute ``time.monotonic()`` value; API attempts are capped by
    it (the engine kills the process when it passes, whatever the child is doing).
    """
    started_at = time.time()
    t0 = time.monotonic()
    case = job.case
    result = ItemResult(
        key=job.key,
        identity=dict(job.identity),
        status=ERROR,
        expected=case.expected,
        threshold=case.scorer.threshold,
        started_at=started_at,
    )
    messages: list[Message] = []

    def on_attempt(attempt: Attempt) -> None:
        data = to_jsonable(attempt)
        result.attempts.append(data)
        emit("attempt", data)

    try:
        if job.rescore_from is not None:
            stored = job.rescore_from
            result.messages = list(stored.messages)
            result.completions = list(stored.completions)
            result.attempts = list(stored.attempts)
            result.latency = stored.latency
            result.prompt_tokens = stored.prompt_tokens
            result.completion_tokens = stored.completion_tokens
            result.transcript = list(stored.transcript)
            answer = stored.answer or ""
            # Marks the result ``rescored``: this run judged an answer bought earlier.
            result.identity["rescored_from"] = stored.key
        else:
            conversation = _conversation(job, emit, result, task_deadline, t0, on_attempt)
            messages = conversation.messages
            try:
                answer = conversation.run()
            except AgentStop as exc:
                conversation.stopped(exc.error_class, exc.detail)
                raise
            result.messages = messages
        result.answer = answer
        score, passed = score_answer(job, answer, task_deadline)
        result.score = score.value
        result.explanation = score.explanation
        result.details = dict(to_jsonable(score.details))
        result.status = PASSED if passed else FAILED
        if result.details.get("verdict") == "SANDBOX_ERROR":
            # the judge itself failed: the model's answer was not judged
            result.status = ERROR
            result.error_class = "sandbox_error"
            result.error = score.explanation
    except APIError as exc:
        result.messages = messages
        result.error_class = exc.error_class
        result.error = str(exc)
        result.deadline_layer = DEADLINE_LAYERS.get(exc.error_class)
    except AgentStop as exc:
        result.messages = messages
        result.error_class = exc.error_class
        result.error = str(exc)
        result.details = {"stop": exc.error_class, "repeated" if exc.error_class == "loop"
                          else "counted": exc.detail}
    except ScorerError as exc:
        result.messages = result.messages or messages  # a re-scored answer keeps its own
        result.error_class = "scorer_error"
        result.error = str(exc)
    _expected_error(job, result)
    result.elapsed = time.monotonic() - t0
    if result.deadline_layer == "task":
        # Measured like the engine's kill path, from the task's start (before the fork), so
        # a task_timeout reads the same whether this child or the parent's kill got there first.
        result.elapsed = max(result.elapsed,
                             time.monotonic() - (task_deadline - job.deadlines.task_timeout))
    return result
