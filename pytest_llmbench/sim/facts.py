"""A small fact table and multiple-choice answering for the rule-based model.

A fact is found by keywords: every keyword of an entry must occur in the question as whole
words; the entry with the most keywords wins, so ``capital`` + ``france`` beats a looser
match. Multiple-choice questions are answered by computing the answer (arithmetic or a fact)
and picking the option that says it: the model really solves the question; the option
letters are never looked up.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

from pytest_llmbench.sim.arith import ArithError, compute

__all__ = ["FACTS", "answer_choice", "lookup_fact", "parse_options", "wrong_fact"]

#: (keywords, answer). Keywords are lower case; each must appear as a whole word/phrase.
FACTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("capital", "france"), "Paris"),
    (("capital", "germany"), "Berlin"),
    (("capital", "italy"), "Rome"),
    (("capital", "spain"), "Madrid"),
    (("capital", "japan"), "Tokyo"),
    (("capital", "canada"), "Ottawa"),
    (("capital", "australia"), "Canberra"),
    (("capital", "egypt"), "Cairo"),
    (("capital", "kenya"), "Nairobi"),
    (("capital", "norway"), "Oslo"),
    (("capital", "portugal"), "Lisbon"),
    (("capital", "brazil"), "Brasilia"),
    (("symbol", "gold"), "Au"),
    (("symbol", "silver"), "Ag"),
    (("symbol", "iron"), "Fe"),
    (("symbol", "sodium"), "Na"),
    (("symbol", "potassium"), "K"),
    (("symbol", "oxygen"), "O"),
    (("symbol", "lead"), "Pb"),
    (("symbol", "helium"), "He"),
    (("largest", "planet"), "Jupiter"),
    (("red", "planet"), "Mars"),
    (("planet", "closest", "sun"), "Mercury"),
    (("planet", "nearest", "sun"), "Mercury"),
    (("planet", "rings"), "Saturn"),
    (("planet", "farthest", "sun"), "Neptune"),
    (("hottest", "planet"), "Venus"),
    (("legs", "spider"), "8"),
    (("legs", "insect"), "6"),
    (("sides", "hexagon"), "6"),
    (("sides", "triangle"), "3"),
    (("days", "leap year"), "366"),
    (("continents",), "7"),
    (("largest", "ocean"), "Pacific"),
    (("tallest", "mountain"), "Everest"),
    (("wrote", "hamlet"), "Shakespeare"),
    (("boiling point", "water"), "100"),
    (("freezing point", "water"), "0"),
)

_FACT_PATTERNS = tuple(
    (tuple(re.compile(rf"\b{re.escape(k)}\b") for k in keys), answer) for keys, answer in FACTS
)

_OPTION_RE = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=[(\[]))\(?([A-H])[).:]\s+", re.MULTILINE)
_TAIL_RE = re.compile(r"\s*(?:answer with|reply with|respond with|choose|pick|select)\b.*$",
                      re.IGNORECASE | re.DOTALL)


def lookup_fact(question: str) -> str | None:
    """The answer of the best-matching fact, or ``None``."""
    text = question.lower()
    best: tuple[int, str] | None = None
    for patterns, answer in _FACT_PATTERNS:
        if all(p.search(text) for p in patterns) and (best is None or len(patterns) > best[0]):
            best = (len(patterns), answer)
    return None if best is None else best[1]


def wrong_fact(answer: str) -> str:
    """A plausible wrong answer: a number off by one, else the next entry's answer (another
    capital for a capital, another symbol for a symbol)."""
    if answer.isdigit():
        return str(int(answer) + 1)
    answers = [a for _, a in FACTS]
    start = answers.index(answer) if answer in answers else 0
    return next(a for a in answers[start + 1:] + answers[:start] if a != answer)


def parse_options(text: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``(question, [(letter, option text), ...])`` when ``text`` lists options ``A)``,
    ``B)``... (or ``A.``/``A:``) in order from A; otherwise ``None``."""
    marks = list(_OPTION_RE.finditer(text))
    # Keep the first run A, B, C... (a stray "I." earlier in the text is not an option).
    start = next((i for i, m in enumerate(marks) if m.group(1) == "A"), None)
    if start is None:
        return None
    run = [marks[start]]
    for mark in marks[start + 1:]:
        if ord(mark.group(1)) == ord(run[-1].group(1)) + 1:
            run.append(mark)
    if len(run) < 2:
        return None
    options = []
    for i, mark in enumerate(run):
        end = run[i + 1].start() if i + 1 < len(run) else len(text)
        body = text[mark.end():end]
        if i + 1 == len(run):
            body = _TAIL_RE.sub("", body.split("\n")[0])
        options.append((mark.group(1), body.strip().rstrip(",;")))
    return text[:run[0].start()].strip(), options


def _norm(text: str) -> str:
    text = re.sub(r"[^\w\s.-]", "", text.lower()).strip().rstrip(".")
    return re.sub(r"^(?:the|a|an|mount|mt)\s+", "", text)


def _matches(option: str, answer: str, number: float | None) -> bool:
    if number is not None:
        try:
            return abs(float(option.replace(",", "")) - number) < 1e-9
        except ValueError:
            return False
    a, o = _norm(answer), _norm(option)
    return a == o or re.search(rf"\b{re.escape(a)}\b", o) is not None


def answer_choice(question: str, options: Sequence[tuple[str, str]], *, wrong: bool) -> str:
    """The letter of the option that answers ``question`` (another letter when ``wrong``)."""
    number: float | None = None
    answer: str | None = None
    try:
        value = compute(question)
    except ArithError:
        value = None
    if value is not None:
        number = float(value)
    else:
        answer = lookup_fact(question)
        if answer is not None and re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
            number = float(answer)
    index = None
    if number is not None or answer is not None:
        index = next((i for i, (_, text) in enumerate(options)
                      if _matches(text, answer or "", number)), None)
    if index is None:
        # Unknown: a deterministic guess, as a model would still pick something.
        index = zlib.crc32(question.encode()) % len(options)
    if wrong:
        index = (index + 1) % len(options)
    return options[index][0]
