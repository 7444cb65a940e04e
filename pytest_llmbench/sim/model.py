"""The simulator's rule-based "model": deterministic, and it really solves its prompts.

It reads the last user message of the conversation (directives already removed) and tries,
in order, these prompt families (docs/simulator.md lists the accepted phrasings):

1. instruction following (uppercase, reverse, count words, repeat, exact word, sort...),
2. extraction to JSON,
3. multiple choice (the question is solved, then the matching option's letter is given),
4. arithmetic (also verbal and multi-turn: ``Multiply that by 3.``),
5. facts from a small table (``What is the capital of France?``),
6. anything else: ``I am a simulated model.``

Nothing here knows the example suites' expected answers. ``wrong=True`` gives a
plausible but wrong answer of the same family (a number off by one, another option letter,
one field changed), which is how ``--error-rate`` and ``wrong=1`` are implemented.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pytest_llmbench.sim.arith import ArithError, compute, format_number
from pytest_llmbench.sim.extract import extract, parse_request
from pytest_llmbench.sim.facts import answer_choice, lookup_fact, parse_options, wrong_fact
from pytest_llmbench.sim.faults import message_text, strip_directives

__all__ = ["GENERIC_ANSWER", "respond", "answer_text"]

GENERIC_ANSWER = "I am a simulated model."
UNKNOWN_ANSWER = "I cannot compute that."


def _upper(m: re.Match[str], wrong: bool) -> str:
    text = m.group(2).strip()
    out = text.upper() if m.group(1).lower() == "upper" else text.lower()
    if wrong:  # one letter keeps the other case: looks right at a glance
        i = max((i for i, c in enumerate(out) if c.isalpha()), default=-1)
        out = out[:i] + out[i].swapcase() + out[i + 1:] if i >= 0 else out + "?"
    return out


def _reverse_word(m: re.Match[str], wrong: bool) -> str:
    word = m.group(1).strip().strip("'\".")
    out = word[::-1]
    if wrong:
        out = out[1] + out[0] + out[2:] if len(out) > 1 and out[0] != out[1] else out + out[-1:]
    return out


def _reverse_words(m: re.Match[str], wrong: bool) -> str:
    words = m.group(1).strip().rstrip(".").split()
    out = words[::-1]
    if wrong and len(out) > 1:
        out[0], out[1] = out[1], out[0]
    elif wrong:
        out = out + out
    return " ".join(out)


def _count_words(m: re.Match[str], wrong: bool) -> str:
    return str(len(m.group(1).split()) + (1 if wrong else 0))


def _count_letters(m: re.Match[str], wrong: bool) -> str:
    word = m.group(1).strip().strip("'\".?")
    return str(sum(c.isalpha() for c in word) + (1 if wrong else 0))


def _count_letter(m: re.Match[str], wrong: bool) -> str:
    letter, text = m.group(1).lower(), m.group(2).lower()
    return str(text.count(letter) + (1 if wrong else 0))


def _repeat(m: re.Match[str], wrong: bool) -> str:
    text, count = m.group(1), int(m.group(2))
    sep = ", " if (m.group(3) or "").startswith("comma") else " "
    return sep.join([text] * min(count + (1 if wrong else 0), 1000))


def _exact_word(m: re.Match[str], wrong: bool) -> str:
    word = m.group(1).strip().strip("'\"").rstrip(".")
    if wrong:
        return word[::-1] if word[::-1] != word else word + "s"
    return word


def _sort(m: re.Match[str], wrong: bool) -> str:
    tokens = [t for t in re.split(r"[,\s]+", m.group(2).strip().rstrip(".")) if t]
    try:
        ordered = sorted(tokens, key=float, reverse=m.group(1).lower().startswith("desc"))
    except ValueError:
        return UNKNOWN_ANSWER
    if wrong and len(ordered) > 1:
        ordered[-1], ordered[-2] = ordered[-2], ordered[-1]
    return ", ".join(ordered)


_I = re.IGNORECASE | re.DOTALL
#: (pattern, handler): the first pattern found in the message wins.
INSTRUCTIONS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], bool], str]], ...] = (
    (re.compile(r"\breply (?:only )?in (upper|lower) ?case:\s*(.+)", _I), _upper),
    (re.compile(r"\breverse the word\b:?\s*(\S+)", _I), _reverse_word),
    (re.compile(r"\breverse the (?:order of the )?words(?: in)?:\s*(.+)", _I), _reverse_words),
    (re.compile(r"\bcount the words in:?\s*(.+)", _I), _count_words),
    (re.compile(r"\bhow many words are in:?\s*(.+)", _I), _count_words),
    (re.compile(r"\bcount the letter ['\"]?(\w)['\"]? in:?\s*(.+)", _I), _count_letter),
    (re.compile(r"\bhow many letters (?:are )?in the word:?\s*(\S+)", _I), _count_letters),
    (re.compile(r"\brepeat ['\"](.+?)['\"] (\d+) times(?: separated by (spaces|commas))?",
                _I), _repeat),
    (re.compile(r"\breply with (?:exactly|only) the word:?\s*(\S+)", _I), _exact_word),
    (re.compile(r"\bsort these numbers (?:in )?(ascending|descending)(?:ly| order)?:?\s*(.+)",
                _I), _sort),
)


def answer_text(text: str, *, previous: str | None = None, wrong: bool = False) -> str:
    """The answer to one user message. ``previous`` is the model's last answer, if any."""
    text = text.strip()
    if not text:
        return GENERIC_ANSWER
    for pattern, handler in INSTRUCTIONS:
        match = pattern.search(text)
        if match:
            return handler(match, wrong)
    request = parse_request(text)
    if request is not None:
        return extract(request[0], request[1], wrong=wrong)
    choice = parse_options(text)
    if choice is not None:
        return answer_choice(choice[0], choice[1], wrong=wrong)
    try:
        value = compute(text, previous)
    except ArithError:
        return UNKNOWN_ANSWER
    if value is not None:
        return format_number(value + 1 if wrong else value)
    fact = lookup_fact(text)
    if fact is not None:
        return wrong_fact(fact) if wrong else fact
    return "I do not know." if wrong else GENERIC_ANSWER


def respond(messages: Sequence[Mapping[str, Any]], *, wrong: bool = False) -> str:
    """The model's answer to a conversation: the last user message, in the context of the
    model's previous answer (for ``that`` / ``the result`` references)."""
    last_user = ""
    previous: str | None = None
    for message in messages:
        role = message.get("role")
        if role == "user":
            last_user = message_text(message.get("content"))
        elif role == "assistant":
            previous = message_text(message.get("content"))
    return answer_text(strip_directives(last_user), previous=previous, wrong=wrong)
