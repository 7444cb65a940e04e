"""What users read about one item: failure text and JUnit properties (the JSONL export is an
exporter: ``report/exporters.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from pytest_llmbench.records import ERROR, ItemResult

#: Longest prompt/answer excerpt shown in a failure report.
EXCERPT = 400


def _excerpt(text: object, limit: int = EXCERPT) -> str:
    value = text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)
    value = value.strip()
    if len(value) > limit:
        value = value[: limit - 20] + f" ... [{len(value)} chars]"
    return value.replace("\n", "\n    ")


def last_user_message(result: ItemResult, fallback: Iterable[Mapping[str, str]] = ()) -> str:
    messages: list[Mapping[str, str]] = [*result.messages] or [*fallback]
    for message in reversed(messages):
        if message.get("role") == "user":
            return message.get("content", "")
    return ""


def outcome_class(result: ItemResult) -> str:
    """``passed``, ``failed`` or the error class: one word for JUnit and summaries."""
    if result.status == ERROR:
        return result.error_class or "error"
    return result.status


def describe(result: ItemResult, *, prompt: str = "", model: str = "") -> str:
    """The readable body of a failed or errored item's report."""
    lines: list[str] = []
    head = f"model {model or result.identity.get('model', '?')}"
    if result.cached:
        head += " (cached result)"
    if result.status == ERROR:
        lines.append(f"ERROR [{result.error_class}] {head}: {result.error}")
        if result.deadline_layer:
            lines.append(f"  deadline layer: {result.deadline_layer}")
    else:
        score = "?" if result.score is None else f"{result.score:.2f}"
        lines.append(f"FAILED {head}: score {score} < threshold {result.threshold:g}")
    lines.append(f"  prompt:   {_excerpt(prompt or last_user_message(result))}")
    lines.append(f"  expected: {_excerpt(result.expected)}")
    if result.answer is not None:
        lines.append(f"  got:      {_excerpt(result.answer)}")
    if result.explanation:
        lines.append(f"  why:      {_excerpt(result.explanation)}")
    if result.attempts:
        outcomes = ", ".join(str(a.get("outcome")) for a in result.attempts)
        lines.append(f"  attempts: {len(result.attempts)} ({outcomes})")
    return "\n".join(lines)


def junit_properties(result: ItemResult) -> list[tuple[str, object]]:
    """Per-item JUnit properties; they travel with the report, so they survive ``-n``."""
    props: list[tuple[str, object]] = [
        ("llmbench_key", result.key),
        ("model", result.identity.get("model", "")),
        ("suite", result.identity.get("suite", "")),
        ("outcome", outcome_class(result)),
        ("score", "" if result.score is None else f"{result.score:.4g}"),
        ("latency", f"{result.latency:.3f}"),
        ("prompt_tokens", result.prompt_tokens),
        ("completion_tokens", result.completion_tokens),
        ("attempts", len(result.attempts)),
        ("cached", "true" if result.cached else "false"),
    ]
    if result.deadline_layer:
        props.append(("deadline_layer", result.deadline_layer))
    verdict = result.details.get("verdict") if isinstance(result.details, dict) else None
    if verdict:
        props.append(("verdict", verdict))
    return props
