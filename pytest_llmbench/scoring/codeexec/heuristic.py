"""Output normalisation and the TLE heuristic of seed 004, as pure functions.

A program killed at its time limit is either slow or wrong. Its partial stdout tells which:
if what it printed so far is a *prefix* of the expected output (after the same normalisation
as the OK comparison) it was on the right track, and how far it got says how much more time
it needs. Everything here is deterministic and side-effect free (apart from logging in the
callers), so the table-driven tests pin every branch and boundary.

The multiplier, with ``c = completion`` in [0, 1] (see ``tle_multiplier``)::

    c > 0.9          2.0                      nearly done: double the limit
    0.5 <= c <= 0.9  3.0 -> 2.0 linearly      (17 - 10c) / 4      c=0.5: 3.0, c=0.7: 2.5
    0 < c < 0.5      10.0 -> 3.0 linearly     10 - 14c            c=0.25: 6.5
    never above 10.0; not a prefix or no output: no raise (None)

The function is continuous: at 0.9 both sides give 2.0, at 0.5 both give 3.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

#: Highest multiplier any single raise may apply.
MAX_MULTIPLIER = 10.0

#: Start-up presets of seed 004: (stripped output longer than N chars, preset seconds).
PRESET_STEPS: tuple[tuple[int, float], ...] = ((1000, 100.0), (100, 50.0), (0, 30.0))


def normalise(text: str) -> str:
    """The one output normalisation used for OK/WA and for the prefix test.

    Lines are split on ``\\n`` (a ``\\r`` before it is trailing whitespace), each line loses its
    trailing whitespace, and trailing blank lines are dropped. Leading whitespace and inner
    spaces are kept: ``"1 2"`` and ``"1  2"`` differ.
    """
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def outputs_match(actual: str, expected: str) -> bool:
    """True when the outputs are equal after ``normalise``."""
    return normalise(actual) == normalise(expected)


def first_difference(actual: str, expected: str) -> tuple[int, str, str] | None:
    """``(1-based line, expected line, actual line)`` of the first differing line, for reports."""
    got, want = normalise(actual).split("\n"), normalise(expected).split("\n")
    for number in range(max(len(got), len(want))):
        g = got[number] if number < len(got) else "<end of output>"
        w = want[number] if number < len(want) else "<end of output>"
        if g != w:
            return number + 1, w, g
    return None


@dataclass(frozen=True)
class Decision:
    """What the heuristic concluded about one TLE, with the numbers it used."""

    is_prefix: bool
    """The normalised partial output is a prefix of the normalised expected output."""
    completion: float
    """``len(actual) / len(expected)`` after normalisation (0.0 when not computed)."""
    multiplier: float | None
    """Factor to apply to the current limit, or ``None``: do not raise."""
    reason: str
    """``raise``, ``no output``, ``no expected output`` or ``not a prefix``."""
    actual_chars: int = 0
    expected_chars: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def multiplier_for(completion: Fraction | float) -> float:
    """The multiplier for a completion ratio in (0, 1], exact at the table's points.

    Computed on fractions so that 0.7 gives exactly 2.5 and 0.25 exactly 6.5.
    """
    c = Fraction(completion)
    if c > Fraction(9, 10):
        value = Fraction(2)
    elif c >= Fraction(1, 2):
        value = (17 - 10 * c) / 4
    else:
        value = 10 - 14 * c
    return float(min(value, Fraction(MAX_MULTIPLIER)))


def tle_multiplier(actual: str | None, expected: str | None) -> Decision:
    """Decide whether (and by how much) to raise the limit of a program that timed out.

    ``actual`` is the stdout captured up to the kill, ``expected`` the test's expected stdout
    (``None`` when the test has none, e.g. HumanEval-style tests). Both are normalised with
    ``normalise``, so a half-written last line still counts as a prefix ("12" of "123").
    """
    got = normalise(actual or "")
    if expected is None:
        return Decision(False, 0.0, None, "no expected output", len(got), 0)
    want = normalise(expected)
    if not got:
        return Decision(False, 0.0, None, "no output", 0, len(want))
    if not want.startswith(got):
        return Decision(False, 0.0, None, "not a prefix", len(got), len(want))
    ratio = Fraction(len(got), len(want))
    return Decision(True, float(ratio), multiplier_for(ratio), "raise", len(got), len(want))


def preset_for_chars(chars: int | None) -> float | None:
    """Start-up preset for a real TLE whose stripped stdout had ``chars`` characters."""
    if not chars:
        return None
    for above, seconds in PRESET_STEPS:
        if chars > above:
            return seconds
    return None  # pragma: no cover - the last step (> 0) always matches


def preset_limit(history_stdout: str | None, had_real_tle: bool) -> float | None:
    """Seed 004's start-up preset for a program that timed out in a stored earlier run.

    Only a *real* TLE (the program's own limit, not a sandbox failure) with some output
    counts: stripped output over 1000 chars gives 100 s, over 100 chars 50 s, any other
    non-empty output 30 s. No TLE or no output gives ``None``: start with the normal limit
    and, for a silent TLE, do not retry with more time at all.
    """
    if not had_real_tle or history_stdout is None:
        return None
    return preset_for_chars(len(history_stdout.strip()))


def presets_from_history(history: Iterable[Mapping[str, Any]]) -> dict[int, float]:
    """Per-test presets from the ``details`` of stored results of the same item.

    ``history`` holds the ``details`` dicts that ``score_code`` returned in earlier runs (any
    order; non-code or malformed entries are skipped). A test gets a preset when its final
    verdict in some stored run was ``TLE``; its stored ``stdout_chars`` picks the preset and
    the largest preset over all runs wins. Keys are the 1-based test numbers, as in
    ``details["tests"][i]["test"]``; pass the result as ``options["preset_limits"]``.
    """
    presets: dict[int, float] = {}
    for details in history:
        tests = details.get("tests") if isinstance(details, Mapping) else None
        if not isinstance(tests, list):
            continue
        for test in tests:
            if not isinstance(test, Mapping) or test.get("verdict") != "TLE":
                continue
            number, chars = test.get("test"), test.get("stdout_chars")
            if not isinstance(number, int) or not isinstance(chars, int):
                continue
            seconds = preset_for_chars(chars)
            if seconds is not None and seconds > presets.get(number, 0.0):
                presets[number] = seconds
    return presets
