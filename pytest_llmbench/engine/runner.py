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

from pytest_llmbench.errors import APIError, ScorerError
from pytest_llmbench.providers import api
from pytest_llmbench.records import (
    ERROR,
    FAILED,
    PASSED,
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
DEADLINE_LAYERS = {"api_timeout": "api", "task_timeout": "task"}


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
    rescore_from: ItemResult | None = None
    """With --llmbench-rescore: score these stored completions instead of calling the API."""


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


def _completion_dict(completion: Completion, turn: int) -> dict[str, Any]:
    data: dict[str, Any] = to_jsonable(completion)
    data["turn"] = turn
    return data


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
            answer = stored.answer or ""
        else:
            answer = ""
            for turn, turn_messages in enumerate(case.turns):
                result.turn = turn
                messages.extend(dict(m) for m in turn_messages)
                emit("turn", {"turn": turn})
                completion = api.chat(
                    job.model,
                    messages,
                    params=case.params,
                    deadlines=job.deadlines,
                    task_deadline=task_deadline,
                    api_key=job.api_key,
                    turn=turn,
                    item_started=t0,
                    on_attempt=on_attempt,
                    label=job.nodeid,
                    limiter=job.limiter,
                )
                data = _completion_dict(completion, turn)
                result.completions.append(data)
                emit("completion", data)
                result.latency += completion.latency
                result.prompt_tokens += completion.prompt_tokens
                result.completion_tokens += completion.completion_tokens
                answer = completion.text
                messages.append({"role": "assistant", "content": answer})
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
    except ScorerError as exc:
        result.messages = messages
        result.error_class = "scorer_error"
        result.error = str(exc)
    result.elapsed = time.monotonic() - t0
    if result.deadline_layer == "task":
        # Measured like the engine's kill path, from the task's start (before the fork), so
        # a task_timeout reads the same whether this child or the parent's kill got there first.
        result.elapsed = max(result.elapsed,
                             time.monotonic() - (task_deadline - job.deadlines.task_timeout))
    return result
