"""What users read about one item: failure text and JUnit properties (the JSONL export is an
exporter: ``report/exporters.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_llmbench.records import ERROR, ItemResult

#: Longest prompt/answer excerpt shown in a failure report.
EXCERPT = 400
#: Transcript entries shown in a failure report (the first and the last ones), and the
#: length of each line: the whole transcript is in the store and the JSONL export.
TRANSCRIPT_LINES = 12
TRANSCRIPT_WIDTH = 160


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
    elif "rescored_from" in result.identity:
        head += " (stored answer re-scored)"
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
    if any(e.get("kind") in ("tool", "stop") for e in result.transcript):
        lines.extend(transcript_lines(result.transcript))
    return "\n".join(lines)


def result_source(result: ItemResult) -> str:
    """How this run got the result: ``cached`` (read from the store), ``rescored`` (an
    answer from the store judged now by a changed scorer: no API call) or ``ran``."""
    if result.cached:
        return "cached"
    return "rescored" if "rescored_from" in result.identity else "ran"


def _entry_line(entry: Mapping[str, Any]) -> str:
    kind = entry.get("kind")
    if kind == "message":
        text = f"{entry.get('role')}: {entry.get('content')}"
    elif kind == "answer":
        calls = ", ".join(f"{c.get('name')}({c.get('arguments')})"
                          for c in entry.get("tool_calls") or ())
        text = (f"model #{entry.get('call')}: " + (f"calls {calls}" if calls else
                                                   repr(entry.get("text")))
                + f"  [{entry.get('prompt_tokens')}+{entry.get('completion_tokens')} tokens,"
                  f" {entry.get('latency', 0):.2f} s]")
    elif kind == "tool":
        mark = "->" if entry.get("ok") else "-> FAILED"
        text = (f"tool {entry.get('name')}({entry.get('arguments')}) {mark} "
                f"{entry.get('content')}  [{entry.get('duration', 0):.2f} s]")
    else:
        text = f"stopped: {entry.get('error_class')}: {entry.get('detail')}"
    text = " ".join(str(text).split())
    if len(text) > TRANSCRIPT_WIDTH:
        text = text[:TRANSCRIPT_WIDTH - 3] + "..."
    return f"    {entry.get('t', 0):7.2f}s {text}"


def transcript_lines(transcript: list[dict[str, Any]]) -> list[str]:
    """The transcript, shortened for a failure report: the first and last entries, each on
    one line."""
    lines = [f"  transcript: {len(transcript)} entries"
             + (" (shortened; the full one is in the store and --llmbench-jsonl)"
                if len(transcript) > TRANSCRIPT_LINES else "")]
    if len(transcript) <= TRANSCRIPT_LINES:
        shown = [_entry_line(e) for e in transcript]
    else:
        head, tail = TRANSCRIPT_LINES // 3, TRANSCRIPT_LINES - TRANSCRIPT_LINES // 3
        shown = [_entry_line(e) for e in transcript[:head]]
        shown.append(f"    ... {len(transcript) - head - tail} entries ...")
        shown.extend(_entry_line(e) for e in transcript[-tail:])
    lines.extend(shown)
    return lines


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
        ("source", result_source(result)),
    ]
    if result.error_class:
        props.append(("error_class", result.error_class))
    if result.deadline_layer:
        props.append(("deadline_layer", result.deadline_layer))
    tool_calls = sum(1 for e in result.transcript if e.get("kind") == "tool")
    if tool_calls:
        props.append(("tool_calls", tool_calls))
    verdict = result.details.get("verdict") if isinstance(result.details, dict) else None
    if verdict:
        props.append(("verdict", verdict))
    return props
