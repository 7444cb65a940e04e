"""The built-in scorers and the checks of their options and ``expected`` values.

``exact``, ``normalized``, ``contains``, ``regex``, ``numeric``, ``choice`` and ``json`` live
here, with the text extractors they use (``extract_last_number``, ``extract_choice``,
``parse_json_object``, ...); ``code`` lives in ``codeexec`` and is only reached through
``_score_code``. Resolving a name to a scorer, aliases and running scorers are in
``scoring.py``, which imports this module and re-exports its public names.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import numbers
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import Score, ScoreRequest


class _Bad(Exception):
    """A bad option or expected value; re-raised as ScorerError prefixed with the scorer."""


# --- small helpers ----------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """A short quoted rendering of an answer or expectation for explanations."""
    return repr(_clip(value if isinstance(value, str) else json.dumps(value, default=str), limit))


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)


def _alternatives(values: tuple[str, ...]) -> str:
    return " or ".join(_show(v) for v in values)


# --- option checks (return the normalised value or raise _Bad) ----------------------------


def _opt_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"option {key!r} must be true or false, not {value!r}")
    return value


def _opt_tolerance(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        math.isfinite(value) and float(value) >= 0
    ):
        raise _Bad(f"option {key!r} must be a non-negative number, not {value!r}")
    return float(value)


def _opt_pattern(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Bad(f"option {key!r} must be a non-empty string, not {value!r}")
    _compile(value, 0)
    return value


def _opt_letters(key: str, value: Any) -> str:
    items = list(value) if isinstance(value, (str, list, tuple)) else None
    if not items or not all(
        isinstance(c, str) and len(c.strip()) == 1 and c.strip() in string.ascii_letters for c in items
    ):
        raise _Bad(f"option {key!r} must be letters like \"ABCDE\" or [\"A\", \"B\"], not {value!r}")
    return "".join(dict.fromkeys(c.strip().upper() for c in items))


def _opt_keys(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(k, str) for k in value):
        raise _Bad(f"option {key!r} must be a non-empty list of key names, not {value!r}")
    return tuple(value)


def _compile(pattern: str, flags: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise _Bad(f"invalid regular expression {pattern!r}: {exc}") from None


# --- exact / normalized / contains ----------------------------------------------------


def _expected_texts(expected: Any, opts: Mapping[str, Any]) -> tuple[str, ...]:
    """One acceptable text, or a list of alternatives (numbers are written as text)."""
    items = expected if isinstance(expected, (list, tuple)) else [expected]
    if not items:
        raise _Bad("expected is an empty list")
    for item in items:
        if item is None or isinstance(item, (bool, Mapping, list, tuple)):
            raise _Bad(f"expected must be a string or number (or a list of them), not {item!r}")
    return tuple(str(item) for item in items)


def _exact(answer: str, expected: tuple[str, ...], opts: Mapping[str, Any]) -> Score:
    def prep(text: str) -> str:
        text = text.strip() if opts["strip"] else text
        return text if opts["case_sensitive"] else text.casefold()

    got = prep(answer)
    if any(prep(e) == got for e in expected):
        return Score(value=1.0, explanation=f"answer is {_show(answer.strip())}")
    return Score(value=0.0, explanation=f"expected {_alternatives(expected)}, got {_show(answer)}")


#: Characters stripped from both ends by ``normalized``: quotes, markdown emphasis and
#: sentence punctuation. Brackets and signs stay: they carry meaning ("(B)", "-3").
_EDGE = " \t\r\n\"'`*_.,;:!?\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e"


def normalize_text(text: str) -> str:
    """Casefold, collapse whitespace, strip surrounding quotes/punctuation (``normalized``)."""
    return " ".join(text.casefold().split()).strip(_EDGE)


def _normalized(answer: str, expected: tuple[str, ...], opts: Mapping[str, Any]) -> Score:
    got = normalize_text(answer)
    if any(normalize_text(e) == got for e in expected):
        return Score(value=1.0, explanation=f"answer normalises to {_show(got)}")
    wanted = tuple(normalize_text(e) for e in expected)
    return Score(value=0.0, explanation=f"expected {_alternatives(wanted)}, got {_show(got)}")


def _contains(answer: str, expected: tuple[str, ...], opts: Mapping[str, Any]) -> Score:
    fold: Callable[[str], str] = (lambda s: s) if opts["case_sensitive"] else str.casefold
    hay = fold(answer)
    missing = [e for e in expected if fold(e) not in hay]
    found = [e for e in expected if e not in missing]
    ok = bool(found) if opts["any"] else not missing
    details = {"found": found, "missing": missing}
    if ok:
        return Score(value=1.0, explanation=f"answer contains {_alternatives(tuple(found))}", details=details)
    what = f"none of {', '.join(map(_show, expected))}" if opts["any"] else ", ".join(map(_show, missing))
    return Score(value=0.0, explanation=f"{what} not in answer {_show(answer)}", details=details)


# --- regex -------------------------------------------------------------------------------


def _expected_regex(expected: Any, opts: Mapping[str, Any]) -> re.Pattern[str]:
    pattern = opts["pattern"] if opts["pattern"] is not None else expected
    if not isinstance(pattern, str) or not pattern:
        raise _Bad(f"needs option 'pattern' or a non-empty string as expected, not {pattern!r}")
    flags = (re.IGNORECASE if opts["ignorecase"] else 0) | (re.MULTILINE if opts["multiline"] else 0)
    return _compile(pattern, flags | (re.DOTALL if opts["dotall"] else 0))


def _regex(answer: str, pattern: re.Pattern[str], opts: Mapping[str, Any]) -> Score:
    if opts["fullmatch"]:
        match = pattern.fullmatch(answer.strip())
        verb = "does not fully match"
    else:
        match = pattern.search(answer)
        verb = "not found in"
    if match is None:
        return Score(value=0.0, explanation=f"pattern {_show(pattern.pattern)} {verb} answer {_show(answer)}")
    return Score(value=1.0, explanation=f"pattern matched {_show(match.group(0))}")


# --- numeric -----------------------------------------------------------------------------

#: A number not glued to a word or another number: "-3.5", "1,234", "1e3", ".5".
#: "3-5" reads as 3 and 5 (a range), not 3 and -5; "CO2" holds no number.
_NUMBER = re.compile(
    r"(?<![\w.])([-+\u2212]?)((?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)([eE][-+]?\d+)?"
)


def extract_last_number(text: str) -> float | None:
    """The last number written in ``text`` (what ``numeric`` compares), or ``None``."""
    matches = list(_NUMBER.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    sign = "-" if last.group(1) in ("-", "\u2212") else ""
    return float(sign + last.group(2).replace(",", "") + (last.group(3) or ""))


def _expected_number(expected: Any, opts: Mapping[str, Any]) -> float:
    value: float | None = None
    if isinstance(expected, numbers.Real) and not isinstance(expected, bool):
        value = float(expected)
    elif isinstance(expected, str):
        try:
            value = float(expected.strip().replace(",", "").replace("\u2212", "-"))
        except ValueError:
            value = None
    if value is None or not math.isfinite(value):
        raise _Bad(f"expected must be a finite number, not {expected!r}")
    return value


def _numeric(answer: str, expected: float, opts: Mapping[str, Any]) -> Score:
    got = extract_last_number(answer)
    if got is None:
        return Score(value=0.0, explanation=f"expected {_num(expected)}, no number in answer {_show(answer)}")
    ok = math.isclose(got, expected, rel_tol=opts["rel_tolerance"], abs_tol=opts["tolerance"])
    details = {"extracted": got}
    if ok:
        return Score(value=1.0, explanation=f"got {_num(got)}", details=details)
    return Score(value=0.0, explanation=f"expected {_num(expected)}, got {_num(got)}", details=details)


# --- choice ------------------------------------------------------------------------------

_LETTER = r"(\()?([A-Za-z])(\))?(?![A-Za-z0-9'])"
_WHOLE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_LEADING = re.compile(r"^\(?([A-Za-z])(?:\)|[.:])(?:\s|$)")
_VERB = r"(?:\s+(?i:is|would\s+be|should\s+be|must\s+be|will\s+be)\b)?\s*[:=\-]?\s*"
_BY_ANSWER = re.compile(r"(?i:\banswer)" + _VERB + r"(?:(?i:option|choice)\s*)?" + _LETTER)
_BY_OPTION = re.compile(r"(?i:\b(?:option|choice))" + _VERB + _LETTER)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])" + _LETTER)
#: After a capital "A", these words mean the letter is named ("A is correct"); any other
#: lowercase word means it is the article ("A good choice is C").
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
_A_NAMED = frozenset(
    {"is", "was", "seems", "appears", "would", "should", "looks", "fits", "matches", "and", "or", "because"}
)


def _letters(matches: list[re.Match[str]], choices: str) -> list[str]:
    """The chosen letters of these matches; a lowercase letter counts only in parentheses."""
    found = []
    for m in matches:
        letter = m.group(2)
        if (letter.isupper() or (m.group(1) and m.group(3))) and letter.upper() in choices:
            found.append(letter.upper())
    return found


def extract_choice(answer: str, choices: str) -> tuple[str | None, str]:
    """The letter an answer chooses among ``choices``, and how it was found (or why not).

    Clear forms win in this order: the whole answer is a letter; the last "answer is X";
    the last "option X"; a leading "X)" / "X." ; otherwise every standalone capital letter
    in ``choices`` must agree, or the answer is ambiguous.
    """
    text = answer.replace("**", "").replace("`", "").strip()
    whole = _WHOLE.match(text)
    if whole:
        letter = whole.group(1).upper()
        if letter in choices:
            return letter, "whole answer"
        return None, f"chose {letter}, which is not among the choices {choices}"
    for regex, how in ((_BY_ANSWER, "answer is"), (_BY_OPTION, "option")):
        letters = _letters(list(regex.finditer(text)), choices)
        if letters:
            return letters[-1], how
    leading = _LEADING.match(text)
    if leading and leading.group(1).upper() in choices:
        return leading.group(1).upper(), "leading letter"
    candidates = set()
    for m in _STANDALONE.finditer(text):
        letter = m.group(2)
        word = _NEXT_WORD.match(text, m.end())
        if letter == "A" and not m.group(1) and word and word.group(1) not in _A_NAMED:
            continue
        candidates.update(_letters([m], choices))
    if len(candidates) == 1:
        return candidates.pop(), "only letter named"
    if candidates:
        return None, f"answer names several choices ({', '.join(sorted(candidates))}) without saying which is the answer"
    return None, f"no choice among {choices} found in answer {_show(answer)}"


def _expected_choice(expected: Any, opts: Mapping[str, Any]) -> tuple[frozenset[str], str]:
    items = expected if isinstance(expected, (list, tuple)) else [expected]
    try:
        letters = frozenset(_opt_letters("expected", items))
    except _Bad:
        raise _Bad(f"expected must be a letter or a list of letters, not {expected!r}") from None
    choices = opts["choices"] or string.ascii_uppercase[: max(4, ord(max(letters)) - ord("A") + 1)]
    outside = sorted(letters - set(choices))
    if outside:
        raise _Bad(f"expected {', '.join(outside)} is not among the choices {choices}")
    return letters, choices


def _choice(answer: str, expected: tuple[frozenset[str], str], opts: Mapping[str, Any]) -> Score:
    letters, choices = expected
    chosen, how = extract_choice(answer, choices)
    want = " or ".join(sorted(letters))
    if chosen is None:
        return Score(value=0.0, explanation=f"expected {want}: {how}")
    details = {"chosen": chosen, "found_by": how}
    if chosen in letters:
        return Score(value=1.0, explanation=f"chose {chosen}", details=details)
    return Score(value=0.0, explanation=f"expected {want}, chose {chosen}", details=details)


# --- json --------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n(.*?)```", re.DOTALL)
_MAX_OBJECT_STARTS = 200


def parse_json_object(answer: str) -> tuple[dict[str, Any] | None, str]:
    """The JSON object in an answer: the whole text, a fenced block, or the first ``{...}``
    that parses. Returns ``(object, "")`` or ``(None, why not)``."""
    try:
        value = json.loads(answer)
    except ValueError as exc:
        why = str(exc)
    else:
        if isinstance(value, dict):
            return value, ""
        why = f"top-level value is {type(value).__name__}, not an object"
    for block in _FENCE.finditer(answer):
        try:
            value = json.loads(block.group(1))
        except ValueError:
            continue
        if isinstance(value, dict):
            return value, ""
    decoder = json.JSONDecoder()
    start = answer.find("{")
    for _ in range(_MAX_OBJECT_STARTS):
        if start < 0:
            break
        try:
            value, _end = decoder.raw_decode(answer, start)
        except ValueError:
            pass
        else:
            if isinstance(value, dict):
                return value, ""
        start = answer.find("{", start + 1)
    return None, why


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality for scoring: numbers as floats within 1e-9, strings stripped."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        return a.strip() == b.strip()
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _expected_json(expected: Any, opts: Mapping[str, Any]) -> tuple[Mapping[str, Any], tuple[str, ...]]:
    if isinstance(expected, str):
        try:
            expected = json.loads(expected)
        except ValueError as exc:
            raise _Bad(f"expected is a string but not JSON: {exc}") from None
    if not isinstance(expected, Mapping):
        raise _Bad(f"expected must be an object (a table, or a JSON object string), not {expected!r}")
    fields = opts["fields"] or tuple(expected)
    absent = [f for f in fields if f not in expected]
    if absent:
        raise _Bad(f"fields {absent} are not keys of expected (keys: {sorted(expected)})")
    return expected, fields


def _json(answer: str, expected: tuple[Mapping[str, Any], tuple[str, ...]], opts: Mapping[str, Any]) -> Score:
    want, fields = expected
    got, why = parse_json_object(answer)
    if got is None:
        return Score(value=0.0, explanation=f"answer is not JSON: {why}")
    if not fields:
        return Score(value=1.0, explanation="answer is a JSON object")
    wrong, mismatched = [], []
    for name in fields:
        if name not in got:
            wrong.append(f"{name}: missing")
        elif not json_equal(want[name], got[name]):
            shown = [_clip(json.dumps(v, default=str), 30) for v in (want[name], got[name])]
            wrong.append(f"{name}: expected {shown[0]}, got {shown[1]}")
        else:
            continue
        mismatched.append(name)
    right = len(fields) - len(wrong)
    text = f"{right}/{len(fields)} fields match"
    if wrong:
        text += "; " + "; ".join(wrong[:3]) + ("; ..." if len(wrong) > 3 else "")
    return Score(value=right / len(fields), explanation=text, details={"mismatched": mismatched})


# --- registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Builtin:
    score: Callable[[str, Any, Mapping[str, Any]], Score]
    """(answer, converted expected, checked options) -> Score."""
    expected: Callable[[Any, Mapping[str, Any]], Any]
    """Validates and converts the expected value (raises _Bad)."""
    options: Mapping[str, tuple[Any, Callable[[str, Any], Any]]]
    """option -> (default, check)."""


_CASE = {"case_sensitive": (True, _opt_bool)}
_BUILTINS: Mapping[str, _Builtin] = {
    "exact": _Builtin(_exact, _expected_texts, {"strip": (True, _opt_bool), **_CASE}),
    "normalized": _Builtin(_normalized, _expected_texts, {}),
    "contains": _Builtin(
        _contains, _expected_texts, {"case_sensitive": (False, _opt_bool), "any": (False, _opt_bool)}
    ),
    "regex": _Builtin(_regex, _expected_regex, {
        "pattern": (None, _opt_pattern), "fullmatch": (False, _opt_bool),
        "ignorecase": (False, _opt_bool), "multiline": (False, _opt_bool), "dotall": (False, _opt_bool),
    }),
    "numeric": _Builtin(_numeric, _expected_number, {
        "tolerance": (1e-6, _opt_tolerance), "rel_tolerance": (0.0, _opt_tolerance),
    }),
    "choice": _Builtin(_choice, _expected_choice, {"choices": (None, _opt_letters)}),
    "json": _Builtin(_json, _expected_json, {"fields": (None, _opt_keys)}),
}


def _check_options(name: str, options: Any) -> dict[str, Any]:
    spec = _BUILTINS[name].options
    if not isinstance(options, Mapping):
        raise _Bad(f"options must be a table, not {options!r}")
    checked = {key: default for key, (default, _check) in spec.items()}
    for key, value in options.items():
        if key not in spec:
            close = difflib.get_close_matches(str(key), list(spec), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = f"known options: {', '.join(spec)}" if spec else "it takes no options"
            raise _Bad(f"unknown option {key!r}{hint}; {known}")
        checked[key] = spec[key][1](key, value)
    return checked


def _run_builtin(name: str, req: ScoreRequest) -> Score:
    """A built-in scorer: options and expected are re-checked here, since a request may
    come from a store re-score or a Python test that never went through the suite loader."""
    builtin = _BUILTINS[name]
    try:
        opts = _check_options(name, req.options)
        expected = builtin.expected(req.expected, opts)
    except _Bad as exc:
        raise ScorerError(f"scorer {name!r}: {exc}") from None
    return builtin.score(req.answer, expected, opts)


def _score_code(req: ScoreRequest) -> Score:
    """The ``code`` scorer, imported at call time: only suites that use it need it."""
    try:
        module = importlib.import_module("pytest_llmbench.scoring.codeexec")
        score_code = module.score_code
    except (ImportError, AttributeError) as exc:
        raise ScorerError(f"scorer 'code' is unavailable: {type(exc).__name__}: {exc}") from exc
    result: Score = score_code(req)
    return result
