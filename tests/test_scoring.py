"""Scorers, scorer resolution (hook, built-in, module:function), option validation and
the hookspecs."""

from __future__ import annotations

import fnmatch
import math
import os
import pickle
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest

from pytest_llmbench import hookspecs
from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import ItemResult, ModelSpec, Score, ScoreRequest, ScorerSpec
from pytest_llmbench.scoring.resolve import (
    BUILTIN_SCORERS,
    NamedScorer,
    extract_choice,
    extract_last_number,
    resolve_scorer,
    run_scorer,
    scorer_exists,
    validate_options,
)

hookimpl = pluggy.HookimplMarker("pytest")


def score(name: str, answer: str, expected: Any, **options: Any) -> Score:
    scorer = resolve_scorer(ScorerSpec(name=name, options=options))
    return scorer(ScoreRequest(answer=answer, expected=expected, options=options))


@pytest.fixture
def clean_modules() -> Iterator[None]:
    """Forget modules and sys.path entries a test added (scorer modules written to tmp)."""
    before, path = set(sys.modules), list(sys.path)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]
    sys.path[:] = path


# --- built-in scorers, table-driven --------------------------------------------------------

CASES: list[tuple[str, str, Any, dict[str, Any], float]] = [
    # exact
    ("exact", "5", "5", {}, 1.0),
    ("exact", " 5\n", "5", {}, 1.0),
    ("exact", "5", 5, {}, 1.0),
    ("exact", "6", "5", {}, 0.0),
    ("exact", " 5", "5", {"strip": False}, 0.0),
    ("exact", "Paris", "paris", {}, 0.0),
    ("exact", "Paris", "paris", {"case_sensitive": False}, 1.0),
    ("exact", "NYC", ["New York", "NYC"], {}, 1.0),
    ("exact", "The answer is 5", "5", {}, 0.0),
    # normalized
    ("normalized", '"Paris."', "paris", {}, 1.0),
    ("normalised", "  The   Eiffel\nTower ", "the eiffel tower", {}, 1.0),
    ("normalized", "**Paris**!", "Paris", {}, 1.0),
    ("normalized", "\u201cParis\u201d", "'Paris'", {}, 1.0),
    ("normalized", "STRASSE", "strasse", {}, 1.0),
    ("normalized", "Lyon", "Paris", {}, 0.0),
    ("normalized", "-3", "3", {}, 0.0),
    ("normalized", "(B)", "B", {}, 0.0),
    ("normalized", "new  york", ["Paris", "New York."], {}, 1.0),
    # contains
    ("contains", "The capital is Paris.", "paris", {}, 1.0),
    ("contains", "The capital is Paris.", "paris", {"case_sensitive": True}, 0.0),
    ("contains", "red and blue", ["red", "blue"], {}, 1.0),
    ("contains", "red and green", ["red", "blue"], {}, 0.0),
    ("contains", "red and green", ["red", "blue"], {"any": True}, 1.0),
    ("contains", "green", ["red", "blue"], {"any": True}, 0.0),
    ("contains", "it is 42", 42, {}, 1.0),
    # regex
    ("regex", "The answer is 42", r"\b42\b", {}, 1.0),
    ("regex", "The answer is 421", r"\b42\b", {}, 0.0),
    ("regex", "abc", 123, {"pattern": "b"}, 1.0),
    ("regex", "abc", "b", {"fullmatch": True}, 0.0),
    ("regex", " abc\n", "a.c", {"fullmatch": True}, 1.0),
    ("regex", "ABC", "abc", {}, 0.0),
    ("regex", "ABC", "abc", {"ignorecase": True}, 1.0),
    ("regex", "a\nb", "^b$", {}, 0.0),
    ("regex", "a\nb", "^b$", {"multiline": True}, 1.0),
    ("regex", "a\nb", "a.b", {}, 0.0),
    ("regex", "a\nb", "a.b", {"dotall": True}, 1.0),
    # numeric
    ("numeric", "The answer is 42.", "42", {}, 1.0),
    ("numeric", "It is -3.5", -3.5, {}, 1.0),
    ("numeric", "Total: 1,234 apples", 1234, {}, 1.0),
    ("numeric", "1234", "1,234", {}, 1.0),
    ("numeric", "1e3", 1000, {}, 1.0),
    ("numeric", "2.5E-1", 0.25, {}, 1.0),
    ("numeric", "x = \u22127", -7, {}, 1.0),
    ("numeric", "First 5, then 7", 5, {}, 0.0),
    ("numeric", "First 5, then 7", 7, {}, 1.0),
    ("numeric", "between 3-5 items", 5, {}, 1.0),
    ("numeric", "0.1 + 0.2 = 0.30000000000000004", 0.3, {}, 1.0),
    ("numeric", "3.14159", 3.14, {}, 0.0),
    ("numeric", "3.14159", 3.14, {"tolerance": 0.01}, 1.0),
    ("numeric", "105", 100, {"rel_tolerance": 0.1}, 1.0),
    ("numeric", "115", 100, {"rel_tolerance": 0.1}, 0.0),
    ("numeric", "I do not know", 1, {}, 0.0),
    ("numeric", "CO2", 2, {}, 0.0),
    # choice
    ("choice", "B", "B", {}, 1.0),
    ("choice", "b", "B", {}, 1.0),
    ("choice", "B)", "B", {}, 1.0),
    ("choice", "(B)", "B", {}, 1.0),
    ("choice", "**B**", "B", {}, 1.0),
    ("choice", "Answer: B", "B", {}, 1.0),
    ("choice", "The answer is B.", "B", {}, 1.0),
    ("choice", "The correct answer is (b) because...", "B", {}, 1.0),
    ("choice", "B) 42, since 6 x 7 = 42", "B", {}, 1.0),
    ("choice", "A good choice here is B", "B", {}, 1.0),
    ("choice", "A is correct", "A", {}, 1.0),
    ("choice", "The answer is C, not option A", "C", {}, 1.0),
    ("choice", "Option A is wrong; the correct option is D.", "D", {}, 1.0),
    ("choice", "A or C", "A", {}, 0.0),
    ("choice", "A and C look right", "C", {}, 0.0),
    ("choice", "C", "B", {}, 0.0),
    ("choice", "E", "A", {}, 0.0),
    ("choice", "The answer is that it depends", "A", {}, 0.0),
    ("choice", "C", ["B", "C"], {}, 1.0),
    ("choice", "E", "E", {}, 1.0),
    ("choice", "The answer is E", "A", {"choices": "ABCD"}, 0.0),
    ("choice", "C", "A", {"choices": ["A", "B"]}, 0.0),
    ("choice", "answer: F", "F", {"choices": "ABCDEF"}, 1.0),
    # json
    ("json", '{"a": 1, "b": "x"}', {"a": 1, "b": "x"}, {}, 1.0),
    ("json", 'Sure:\n```json\n{"a": 1.0000000001, "b": " x "}\n```', {"a": 1, "b": "x"}, {}, 1.0),
    ("json", 'Here: {"a": 1, "b": "y"} hope it helps', {"a": 1, "b": "x"}, {}, 0.5),
    ("json", 'set {x} then {"a": 1, "b": "x"}', {"a": 1, "b": "x"}, {}, 1.0),
    ("json", '{"a": 1}', {"a": 1, "b": "x"}, {}, 0.5),
    ("json", '{"a": 2, "b": "y", "c": 3}', {"a": 1, "b": "y", "c": 3}, {"fields": ["b", "c"]}, 1.0),
    ("json", '{"a": true}', {"a": 1}, {}, 0.0),
    ("json", '{"a": [1, {"b": 2}]}', {"a": [1.0, {"b": 2}]}, {}, 1.0),
    ("json", '{"a": [1, 2, 3]}', {"a": [1, 2]}, {}, 0.0),
    ("json", '{"a": 1}', '{"a": 1}', {}, 1.0),
    ("json", "[1, 2]", {"a": 1}, {}, 0.0),
    ("json", "not json at all", {"a": 1}, {}, 0.0),
]


@pytest.mark.parametrize(("name", "answer", "expected", "options", "value"), CASES)
def test_builtin_scorers(name: str, answer: str, expected: Any, options: dict[str, Any], value: float) -> None:
    result = score(name, answer, expected, **options)
    assert result.value == pytest.approx(value), result.explanation
    assert result.explanation


@pytest.mark.parametrize(
    ("name", "answer", "expected", "options", "explanation"),
    [
        ("exact", "6", "5", {}, "expected '5', got '6'"),
        ("numeric", "The result is 6.", 5, {}, "expected 5, got 6"),
        ("numeric", "none", 5, {}, "expected 5, no number in answer 'none'"),
        ("contains", "red", ["red", "blue"], {}, "'blue' not in answer 'red'"),
        ("regex", "abc", "x+", {}, "pattern 'x+' not found in answer 'abc'"),
        ("choice", "C", "B", {}, "expected B, chose C"),
        ("choice", "A or C", "A", {}, "expected A: answer names several choices (A, C) *"),
        ("choice", "E", "A", {}, "expected A: chose E, which is not among the choices ABCD"),
        ("json", "nope", {"a": 1}, {}, "answer is not JSON: Expecting value*"),
        ("json", '{"a": 2, "b": 1}', {"a": 1, "b": 1}, {}, "1/2 fields match; a: expected 1, got 2"),
        ("json", '{"b": "y"}', {"a": 1, "b": "x"}, {}, '0/2 fields match; a: missing; b: expected "x", got "y"'),
    ],
)
def test_failure_explanations(
    name: str, answer: str, expected: Any, options: dict[str, Any], explanation: str
) -> None:
    result = score(name, answer, expected, **options)
    assert result.value < 1.0
    assert fnmatch.fnmatchcase(result.explanation, explanation), result.explanation


def test_long_answers_are_truncated_in_explanations() -> None:
    result = score("exact", "x" * 1000, "y")
    assert len(result.explanation) < 120


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("The answer is 42.", 42.0),
        ("-3.5", -3.5),
        ("1,234", 1234.0),
        ("$1,234.50!", 1234.5),
        ("1e3", 1000.0),
        (".5 cups", 0.5),
        ("answer: 12. Done", 12.0),
        ("v1.2.3", None),
        ("no digits", None),
    ],
)
def test_extract_last_number(text: str, number: float | None) -> None:
    assert extract_last_number(text) == number


def test_extract_choice_says_how() -> None:
    assert extract_choice("The answer is B.", "ABCD") == ("B", "answer is")
    assert extract_choice("(c)", "ABCD") == ("C", "whole answer")
    chosen, why = extract_choice("I like it", "ABCD")
    assert chosen is None and "no choice among ABCD" in why


def test_json_scorer_reports_partial_credit_details() -> None:
    result = score("json", '{"a": 1, "b": 2, "c": 3}', {"a": 1, "b": 0, "c": 0})
    assert result.value == pytest.approx(1 / 3)
    assert result.details["mismatched"] == ["b", "c"]


def test_numeric_scorer_records_the_extracted_number() -> None:
    assert score("numeric", "about 7.5 km", 7.5).details == {"extracted": 7.5}


# --- code scorer (lazy import of codeexec) -------------------------------------------------


def test_code_scorer_delegates_to_codeexec_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ScoreRequest] = []

    def score_code(req: ScoreRequest) -> Score:
        seen.append(req)
        return Score(value=1.0, explanation="OK")

    fake = types.ModuleType("pytest_llmbench.scoring.codeexec")
    fake.score_code = score_code  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pytest_llmbench.scoring.codeexec", fake)
    scorer = resolve_scorer(ScorerSpec(name="code"))
    req = ScoreRequest(answer="print(1)", expected=None, extra={"tests": []})
    assert scorer(req) == Score(value=1.0, explanation="OK")
    assert seen == [req]


def test_code_scorer_resolves_without_codeexec_and_fails_only_when_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pytest_llmbench.scoring.codeexec", None)  # import raises
    assert scorer_exists("code")
    validate_options(ScorerSpec(name="code", options={"time_limit": 2}))
    scorer = resolve_scorer(ScorerSpec(name="code"))
    with pytest.raises(ScorerError, match="scorer 'code' is unavailable: ModuleNotFoundError"):
        scorer(ScoreRequest(answer="x", expected=None))


# --- resolution and unknown names ----------------------------------------------------------


def test_unknown_scorer_message_lists_every_way_to_provide_one() -> None:
    with pytest.raises(ScorerError) as info:
        resolve_scorer(ScorerSpec(name="numerc"))
    message = str(info.value)
    assert "unknown scorer 'numerc'" in message
    assert "did you mean 'numeric'?" in message
    for name in BUILTIN_SCORERS:
        assert name in message
    assert "or a 'module:function' reference, or a plugin implementing pytest_llmbench_get_scorer" in message


@pytest.mark.parametrize("name", [*BUILTIN_SCORERS, "normalised"])
def test_builtins_exist(name: str) -> None:
    assert scorer_exists(name)


def test_scorer_exists_is_false_for_unknown_and_broken_references(clean_modules: None) -> None:
    assert not scorer_exists("nope")
    assert not scorer_exists("no_such_module_xyz:score")
    assert not scorer_exists("json:no_such_function")


def test_alias_resolves_to_canonical_name() -> None:
    assert resolve_scorer(ScorerSpec(name="normalised")).name == "normalized"


def test_resolved_builtin_pickles() -> None:
    """Resolved scorers may cross into forked or spawned item processes."""
    scorer = pickle.loads(pickle.dumps(resolve_scorer(ScorerSpec(name="numeric"))))
    assert scorer(ScoreRequest(answer="2", expected=2)).value == 1.0


def test_builtins_check_options_at_scoring_time_too() -> None:
    scorer = resolve_scorer(ScorerSpec(name="numeric"))
    with pytest.raises(ScorerError, match="scorer 'numeric': unknown option 'tolerence'"):
        scorer(ScoreRequest(answer="1", expected=1, options={"tolerence": 1}))


def test_invalid_regex_names_the_pattern() -> None:
    with pytest.raises(ScorerError, match=r"invalid regular expression '\(unclosed'"):
        score("regex", "abc", "(unclosed")
    with pytest.raises(ScorerError, match=r"scorer 'regex': .*'a\['"):
        validate_options(ScorerSpec(name="regex", options={"pattern": "a["}))


# --- module:function references ------------------------------------------------------------


def write_module(directory: Path, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


def test_module_function_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None) -> None:
    write_module(tmp_path, "my_scorers_a", """
        from pytest_llmbench.records import Score

        def shout(req):
            ok = req.answer == str(req.expected).upper()
            return Score(value=float(ok), explanation="shouted" if ok else "too quiet")

        def half(req):
            return 0.5

        class Judge:
            @staticmethod
            def strict(req):
                return req.answer == req.expected

        NOT_CALLABLE = 3
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    shout = resolve_scorer(ScorerSpec(name="my_scorers_a:shout"))
    assert shout(ScoreRequest(answer="HI", expected="hi")) == Score(value=1.0, explanation="shouted")
    assert shout(ScoreRequest(answer="hi", expected="hi")).value == 0.0
    assert resolve_scorer(ScorerSpec(name="my_scorers_a:half"))(
        ScoreRequest(answer="", expected=None)
    ) == Score(value=0.5)
    strict = resolve_scorer(ScorerSpec(name="my_scorers_a:Judge.strict"))
    assert strict(ScoreRequest(answer="x", expected="x")).value == 1.0
    assert scorer_exists("my_scorers_a:shout")
    validate_options(ScorerSpec(name="my_scorers_a:shout", options={"anything": [1, 2]}))
    with pytest.raises(ScorerError, match="'my_scorers_a:NOT_CALLABLE' is not callable"):
        resolve_scorer(ScorerSpec(name="my_scorers_a:NOT_CALLABLE"))
    with pytest.raises(ScorerError, match="has no attribute 'missing'"):
        resolve_scorer(ScorerSpec(name="my_scorers_a:missing"))


def test_module_reference_found_through_rootdir(tmp_path: Path, clean_modules: None) -> None:
    """Like a conftest helper: the module sits in the rootdir, which is not on sys.path."""
    write_module(tmp_path, "my_scorers_b", "def ok(req):\n    return True\n")
    assert str(tmp_path) not in sys.path
    scorer = resolve_scorer(ScorerSpec(name="my_scorers_b:ok"), rootdir=tmp_path)
    assert scorer(ScoreRequest(answer="", expected=None)) == Score(value=1.0)
    assert sys.path[0] == str(tmp_path)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise RuntimeError('bad config')\n", "RuntimeError: bad config"),
        ("import no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'"),
    ],
)
def test_module_reference_import_errors_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None, source: str, message: str
) -> None:
    write_module(tmp_path, "my_scorers_c", source)
    monkeypatch.syspath_prepend(str(tmp_path))
    path_before = list(sys.path)
    with pytest.raises(ScorerError, match="cannot import module 'my_scorers_c' for scorer 'my_scorers_c:f'") as info:
        resolve_scorer(ScorerSpec(name="my_scorers_c:f"))
    assert message in str(info.value)
    assert sys.path == path_before


def test_missing_module_is_an_error_and_leaves_sys_path_alone(tmp_path: Path, clean_modules: None) -> None:
    path_before = list(sys.path)
    with pytest.raises(ScorerError, match="cannot import module 'nowhere_xyz' for scorer 'nowhere_xyz:f'"):
        resolve_scorer(ScorerSpec(name="nowhere_xyz:f"), rootdir=tmp_path)
    assert sys.path == path_before


@pytest.mark.parametrize("name", [":f", "module:"])
def test_malformed_reference(name: str) -> None:
    with pytest.raises(ScorerError, match="must look like 'module:function'"):
        resolve_scorer(ScorerSpec(name=name))


# --- validate_options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected", "message"),
    [
        (ScorerSpec(name="numeric", options={"tolerance": "0.1"}), 1, "option 'tolerance' must be a non-negative number, not '0.1'"),
        (ScorerSpec(name="numeric", options={"tolerance": -1}), 1, "option 'tolerance' must be a non-negative number"),
        (ScorerSpec(name="numeric", options={"rel_tolerance": True}), 1, "option 'rel_tolerance' must be"),
        (ScorerSpec(name="numeric", options={"tolerence": 0.1}), 1, "unknown option 'tolerence' (did you mean 'tolerance'?); known options: tolerance, rel_tolerance"),
        (ScorerSpec(name="numeric"), "many", "expected must be a finite number, not 'many'"),
        (ScorerSpec(name="numeric"), True, "expected must be a finite number"),
        (ScorerSpec(name="exact", options={"case_sensitive": "no"}), "x", "option 'case_sensitive' must be true or false, not 'no'"),
        (ScorerSpec(name="exact"), None, "expected must be a string or number"),
        (ScorerSpec(name="exact", options={"zzz": 1}), "x", "unknown option 'zzz'; known options: strip, case_sensitive"),
        (ScorerSpec(name="normalised", options={"strip": True}), "x", "unknown option 'strip'; it takes no options"),
        (ScorerSpec(name="contains"), [], "expected is an empty list"),
        (ScorerSpec(name="contains", options={"ani": True}), "x", "did you mean 'any'?"),
        (ScorerSpec(name="regex"), 5, "needs option 'pattern' or a non-empty string as expected, not 5"),
        (ScorerSpec(name="regex", options={"pattern": ""}), 5, "option 'pattern' must be a non-empty string"),
        (ScorerSpec(name="regex", options={"full_match": True}), "x", "did you mean 'fullmatch'?"),
        (ScorerSpec(name="choice"), "AB", "expected must be a letter or a list of letters, not 'AB'"),
        (ScorerSpec(name="choice", options={"choices": "ABCD"}), "E", "expected E is not among the choices ABCD"),
        (ScorerSpec(name="choice", options={"choices": 4}), "A", "option 'choices' must be letters"),
        (ScorerSpec(name="choice", options={"choices": "AB\u00c9"}), "A", "option 'choices' must be letters"),
        (ScorerSpec(name="json"), [1], "expected must be an object"),
        (ScorerSpec(name="json"), "{oops", "expected is a string but not JSON"),
        (ScorerSpec(name="json", options={"fields": ["a", "z"]}), {"a": 1}, "fields ['z'] are not keys of expected"),
        (ScorerSpec(name="json", options={"fields": "a"}), {"a": 1}, "option 'fields' must be a non-empty list of key names"),
        (ScorerSpec(name="exact", threshold=1.5), "x", "threshold must be a number in [0, 1], not 1.5"),
        (ScorerSpec(name="nope"), "x", "unknown scorer 'nope'"),
        (ScorerSpec(name="no_such_module_xyz:f"), "x", "cannot import module 'no_such_module_xyz'"),
    ],
)
def test_validate_options_errors(spec: ScorerSpec, expected: Any, message: str, clean_modules: None) -> None:
    with pytest.raises(ScorerError) as info:
        validate_options(spec, expected)
    assert message in str(info.value)
    if spec.name in BUILTIN_SCORERS or spec.name == "normalised":
        assert str(info.value).startswith(f"scorer {spec.name!r}: ")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (ScorerSpec(name="numeric", options={"tolerance": 0, "rel_tolerance": 0.01}), "1,234"),
        (ScorerSpec(name="regex", options={"pattern": r"\d+", "fullmatch": True}), 5),
        (ScorerSpec(name="choice", options={"choices": ["a", "b", "c"]}), ["a", "C"]),
        (ScorerSpec(name="json", options={"fields": ["a"]}), {"a": 1, "b": 2}),
        (ScorerSpec(name="contains", options={"any": True, "case_sensitive": True}), ["x", "y"]),
        (ScorerSpec(name="exact", threshold=0), 5),
    ],
)
def test_validate_options_accepts_valid_specs(spec: ScorerSpec, expected: Any) -> None:
    validate_options(spec, expected)


def test_validate_options_without_expected_checks_options_only() -> None:
    validate_options(ScorerSpec(name="regex"))  # the pattern may come from each instance
    with pytest.raises(ScorerError, match="must be true or false"):
        validate_options(ScorerSpec(name="regex", options={"fullmatch": 1}))


# --- run_scorer ----------------------------------------------------------------------------

REQ = ScoreRequest(answer="a", expected="a")


@pytest.mark.parametrize(
    ("returned", "value"),
    [(Score(value=0.5, explanation="half"), 0.5), (0.25, 0.25), (True, 1.0), (False, 0.0), (1, 1.0), (0, 0.0), (Score(value=1), 1.0)],
)
def test_run_scorer_converts_return_values(returned: Any, value: float) -> None:
    result, passed = run_scorer(lambda req: returned, REQ, threshold=0.5)
    assert result.value == value and type(result.value) is float
    assert passed is (value >= 0.5)
    if isinstance(returned, Score):
        assert result.explanation == returned.explanation


def test_run_scorer_threshold_is_inclusive() -> None:
    assert run_scorer(lambda req: 0.5, REQ, threshold=0.5)[1] is True
    assert run_scorer(lambda req: 0.49, REQ, threshold=0.5)[1] is False
    assert run_scorer(resolve_scorer(ScorerSpec(name="exact")), REQ, 1.0) == (Score(value=1.0, explanation="answer is 'a'"), True)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (1.5, "returned score 1.5, outside [0, 1]"),
        (-0.1, "returned score -0.1, outside [0, 1]"),
        (math.nan, "returned score nan, outside [0, 1]"),
        (Score(value=2.0), "returned score 2.0, outside [0, 1]"),
        ("0.5", "returned str"),
        (None, "returned NoneType"),
    ],
)
def test_run_scorer_rejects_bad_values_naming_the_scorer(returned: Any, message: str) -> None:
    def my_scorer(req: ScoreRequest) -> Any:
        return returned

    with pytest.raises(ScorerError) as info:
        run_scorer(my_scorer, REQ, 1.0)
    assert "scorer 'test_run_scorer_rejects_bad_values_naming_the_scorer.<locals>.my_scorer'" in str(info.value)
    assert message in str(info.value)


def test_run_scorer_wraps_exceptions_with_type_and_message() -> None:
    def broken(req: ScoreRequest) -> Score:
        raise ValueError("cannot parse tests")

    with pytest.raises(ScorerError) as info:
        run_scorer(NamedScorer("mine", broken), REQ, 1.0)
    assert str(info.value) == "scorer 'mine' raised ValueError: cannot parse tests"
    assert isinstance(info.value.__cause__, ValueError)
    copy = pickle.loads(pickle.dumps(info.value))  # crosses from the item process
    assert str(copy) == str(info.value)


def test_run_scorer_passes_scorer_errors_through() -> None:
    with pytest.raises(ScorerError, match=r"^scorer 'regex': invalid regular expression"):
        run_scorer(resolve_scorer(ScorerSpec(name="regex")), ScoreRequest(answer="", expected="("), 1.0)


# --- hooks ---------------------------------------------------------------------------------


def make_pluginmanager(*plugins: object) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("pytest")
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class ShoutPlugin:
    @hookimpl
    def pytest_llmbench_get_scorer(self, name: str) -> Any:
        if name == "shout":
            return lambda req: Score(value=float(req.answer.isupper()), explanation="shout")
        if name == "exact":  # override a built-in
            return lambda req: 1.0
        return None


def test_hook_provides_and_overrides_scorers() -> None:
    pm = make_pluginmanager(ShoutPlugin())
    shout = resolve_scorer(ScorerSpec(name="shout"), pm)
    assert shout(ScoreRequest(answer="HEY", expected=None)) == Score(value=1.0, explanation="shout")
    assert resolve_scorer(ScorerSpec(name="exact"), pm)(ScoreRequest(answer="a", expected="b")).value == 1.0
    assert resolve_scorer(ScorerSpec(name="numeric"), pm)(ScoreRequest(answer="2", expected=3)).value == 0.0
    assert scorer_exists("shout", pm.hook) and scorer_exists("shout", pm.hook.pytest_llmbench_get_scorer)
    assert not scorer_exists("shout") and not scorer_exists("whisper", pm.hook)
    # the plugin owns the options of the names it provides, even a built-in's
    validate_options(ScorerSpec(name="exact", options={"plugin_option": 1}), 5, hook=pm.hook)
    with pytest.raises(ScorerError, match="unknown option 'plugin_option'"):
        validate_options(ScorerSpec(name="exact", options={"plugin_option": 1}), 5)


def test_hook_is_firstresult_last_registered_first() -> None:
    class Second:
        @hookimpl
        def pytest_llmbench_get_scorer(self, name: str) -> Any:
            return (lambda req: 0.0) if name == "shout" else None

    pm = make_pluginmanager(ShoutPlugin(), Second())
    assert resolve_scorer(ScorerSpec(name="shout"), pm)(ScoreRequest(answer="HEY", expected=None)).value == 0.0
    assert resolve_scorer(ScorerSpec(name="exact"), pm)(ScoreRequest(answer="a", expected="b")).value == 1.0


@pytest.mark.parametrize(
    ("impl_result", "message"),
    [(42, r"pytest_llmbench_get_scorer\('x'\) returned 42, which is not callable"), (KeyError("k"), "raised KeyError")],
)
def test_bad_hook_results_are_scorer_errors(impl_result: Any, message: str) -> None:
    class Bad:
        @hookimpl
        def pytest_llmbench_get_scorer(self, name: str) -> Any:
            if isinstance(impl_result, Exception):
                raise impl_result
            return impl_result

    with pytest.raises(ScorerError, match=message):
        resolve_scorer(ScorerSpec(name="x"), make_pluginmanager(Bad()))


def test_hookspecs_validate_argument_names() -> None:
    class Misspelt:
        @hookimpl
        def pytest_llmbench_result(self, reslt: Any) -> None:
            pass

    with pytest.raises(pluggy.PluginValidationError, match="reslt"):
        make_pluginmanager(Misspelt())


def test_notification_hooks_call_every_implementation() -> None:
    calls: list[str] = []

    class A:
        @hookimpl
        def pytest_llmbench_modify_request(self, body: dict[str, Any]) -> None:
            body["seed"] = 1

        @hookimpl
        def pytest_llmbench_result(self, result: ItemResult) -> None:
            calls.append(f"A:{result.status}")

    class B:
        @hookimpl
        def pytest_llmbench_modify_request(self, body: dict[str, Any], model: ModelSpec) -> None:
            body["extra"] = model.name

        @hookimpl
        def pytest_llmbench_result(self, result: ItemResult, item: Any) -> None:
            calls.append(f"B:{item}")

    pm = make_pluginmanager(A(), B())
    body: dict[str, Any] = {"model": "m"}
    pm.hook.pytest_llmbench_modify_request(body=body, model=ModelSpec(name="sim", model="m", base_url="sim"))
    assert body == {"model": "m", "seed": 1, "extra": "sim"}
    pm.hook.pytest_llmbench_result(result=ItemResult(key="k", identity={}, status="passed"),
                              nodeid="a.toml::x", item="the-item")
    assert sorted(calls) == ["A:passed", "B:the-item"]


def test_conftest_implements_hooks_in_a_real_pytest_run(pytester: pytest.Pytester) -> None:
    """Plain conftest functions validate against the specs (registered by the installed
    plugin) and resolve through pytest's own plugin manager."""
    pytester.makeconftest(
        """
        from pytest_llmbench.records import Score

        def pytest_llmbench_get_scorer(name):
            if name == "length":
                return lambda req: Score(value=min(1.0, len(req.answer) / 10), explanation="len")
        """
    )
    pytester.makepyfile(
        helper_scorers="def yes(req):\n    return 1\n",
        test_it="""
        from pytest_llmbench.records import ScoreRequest, ScorerSpec
        from pytest_llmbench.scoring.resolve import resolve_scorer, run_scorer, scorer_exists

        def test_hook(request):
            pm = request.config.pluginmanager
            scorer = resolve_scorer(ScorerSpec(name="length"), pm)
            result, passed = run_scorer(scorer, ScoreRequest(answer="12345", expected=None), 0.5)
            assert (result.value, passed) == (0.5, True)
            assert scorer_exists("length", request.config.hook)
            assert not scorer_exists("length")

        def test_reference_from_rootdir(request):
            scorer = resolve_scorer(ScorerSpec(name="helper_scorers:yes"), request.config.pluginmanager)
            assert scorer(ScoreRequest(answer="", expected=None)).value == 1.0
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--import-mode=importlib")
    result.assert_outcomes(passed=2)


def test_conftest_with_misspelt_hook_argument_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        from pytest_llmbench import hookspecs

        def pytest_addhooks(pluginmanager):
            pluginmanager.add_hookspecs(hookspecs)

        def pytest_llmbench_get_scorer(scorer_name):
            return None
        """
    )
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--import-mode=importlib")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*pytest_llmbench_get_scorer*scorer_name*"])


def test_score_takes_value_and_explanation_positionally() -> None:
    from pytest_llmbench.records import Score

    assert Score(0.0, "no number") == Score(value=0.0, explanation="no number")
    assert Score(1.0, "ok", details={"n": 1}).details == {"n": 1}
    with pytest.raises(TypeError, match="positional"):
        Score(1.0, "ok", {"n": 1})  # type: ignore[misc]


STALE_V1 = "def judge(req):\n    return 1.0\n"
STALE_V2 = "def judge(req):\n    return 0.0\n"  # same size: Python's cache check cannot tell


def test_a_scorer_edited_within_the_same_second_runs_its_new_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.pyc`` whose recorded source mtime (whole seconds) and size still match is used by
    Python as it is: the scorer would run its old code under its new source's fingerprint."""
    import importlib
    import importlib.util
    import py_compile

    from pytest_llmbench.scoring import resolve

    source = tmp_path / "stale_scorer_mod.py"
    source.write_text(STALE_V1)
    before = os.stat(source)
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)),
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    source.write_text(STALE_V2)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(resolve, "_CHECKED", set())
    # What Python alone does with it: the old code.
    plain = importlib.import_module("stale_scorer_mod")
    assert plain.judge(None) == 1.0
    monkeypatch.delitem(sys.modules, "stale_scorer_mod")

    fn = resolve._import_reference("stale_scorer_mod:judge", tmp_path)
    assert fn(None) == 0.0  # type: ignore[arg-type]
    # Re-imported from source, its cache written afresh or gone: the next process runs the
    # new code too.
    monkeypatch.delitem(sys.modules, "stale_scorer_mod")
    monkeypatch.setattr(resolve, "_CHECKED", set())
    assert importlib.import_module("stale_scorer_mod").judge(None) == 0.0


def test_a_scorer_module_whose_cache_is_current_is_not_imported_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util
    import py_compile

    from pytest_llmbench.scoring import resolve

    source = tmp_path / "current_scorer_mod.py"
    source.write_text(STALE_V1 + "\n\ndef helper():\n    return [x * 2 for x in range(3)]\n")
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)),
                       invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(resolve, "_CHECKED", set())
    fn = resolve._import_reference("current_scorer_mod:judge", tmp_path)
    assert sys.modules["current_scorer_mod"].judge is fn  # the module imported, not reloaded
    assert os.path.exists(importlib.util.cache_from_source(str(source)))
    monkeypatch.delitem(sys.modules, "current_scorer_mod")
