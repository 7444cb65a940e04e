"""The pure parts of code execution: normalisation, the TLE heuristic, presets, extraction."""

from __future__ import annotations

import pytest

from pytest_llmbench.scoring.codeexec import (
    extract_program,
    normalise,
    outputs_match,
    preset_limit,
    presets_from_history,
    tle_multiplier,
)
from pytest_llmbench.scoring.codeexec.heuristic import first_difference, multiplier_for

EXPECTED_100 = "x" * 100  # one line of 100 chars: completion = len(actual) / 100


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("1 2\n3\n", "1 2\n3"),
        ("1 2  \r\n3\t\n\n\n", "1 2\n3"),
        ("  indented\n", "  indented"),
        ("a  b", "a  b"),  # inner spaces are kept
        ("\n\n", ""),
        ("", ""),
        ("x\n\ny\n", "x\n\ny"),  # inner blank lines are kept
    ],
)
def test_normalise(text: str, normalised: str) -> None:
    assert normalise(text) == normalised


def test_outputs_match_uses_the_normalisation() -> None:
    assert outputs_match("5  \r\n\n", "5")
    assert not outputs_match("5 ", " 5")
    assert first_difference("1\n2\n4\n", "1\n2\n3\n") == (3, "3", "4")
    assert first_difference("1\n", "1\n2\n") == (2, "2", "<end of output>")


# (actual, expected, is_prefix, completion, multiplier); boundaries: 0.9 and 0.5 belong to
# the middle (linear) segment, which meets the outer segments there (2.0 and 3.0).
HEURISTIC_TABLE = [
    ("x" * 100, EXPECTED_100, True, 1.0, 2.0),  # all printed but did not exit
    ("x" * 95, EXPECTED_100, True, 0.95, 2.0),
    ("x" * 91, EXPECTED_100, True, 0.91, 2.0),
    ("x" * 90, EXPECTED_100, True, 0.9, 2.0),  # boundary
    ("x" * 80, EXPECTED_100, True, 0.8, 2.25),
    ("x" * 70, EXPECTED_100, True, 0.7, 2.5),
    ("x" * 60, EXPECTED_100, True, 0.6, 2.75),
    ("x" * 50, EXPECTED_100, True, 0.5, 3.0),  # boundary
    ("x" * 49, EXPECTED_100, True, 0.49, 3.14),
    ("x" * 40, EXPECTED_100, True, 0.4, 4.4),
    ("x" * 25, EXPECTED_100, True, 0.25, 6.5),
    ("x" * 10, EXPECTED_100, True, 0.1, 8.6),
    ("x" * 1, EXPECTED_100, True, 0.01, 9.86),
    ("1\n2\n12", "1\n2\n123\n4\n", True, 6 / 9, 17 / 4 - 10 / 4 * 6 / 9),  # half a line
    ("1\n2\n", "1\n2\n3\n4\n", True, 3 / 7, 10 - 14 * 3 / 7),  # trailing newline stripped
    ("1\n3\n", "1\n2\n3\n4\n", False, 0.0, None),  # not a prefix: a wrong answer, stop
    ("x" * 101, EXPECTED_100, False, 0.0, None),  # longer than expected
    ("", EXPECTED_100, False, 0.0, None),  # no output: no raise
    (" \n\n", EXPECTED_100, False, 0.0, None),  # whitespace only is no output
    (None, EXPECTED_100, False, 0.0, None),
    ("x", None, False, 0.0, None),  # no expected output (HumanEval style)
]


@pytest.mark.parametrize(("actual", "expected", "is_prefix", "completion", "multiplier"),
                         HEURISTIC_TABLE)
def test_tle_multiplier_table(actual: str | None, expected: str | None, is_prefix: bool,
                              completion: float, multiplier: float | None) -> None:
    d = tle_multiplier(actual, expected)
    assert d.is_prefix is is_prefix
    assert d.completion == pytest.approx(completion)
    if multiplier is None:
        assert d.multiplier is None
    else:
        assert d.multiplier == pytest.approx(multiplier, abs=1e-12)


def test_exact_table_points_are_exact_floats() -> None:
    assert tle_multiplier("x" * 70, EXPECTED_100).multiplier == 2.5
    assert tle_multiplier("x" * 25, EXPECTED_100).multiplier == 6.5
    assert tle_multiplier("x" * 50, EXPECTED_100).multiplier == 3.0
    assert tle_multiplier("x" * 90, EXPECTED_100).multiplier == 2.0


def test_reasons_name_the_branch() -> None:
    assert tle_multiplier("", "1").reason == "no output"
    assert tle_multiplier("2", "1").reason == "not a prefix"
    assert tle_multiplier("1", None).reason == "no expected output"
    d = tle_multiplier("1", "1\n2")
    assert (d.reason, d.actual_chars, d.expected_chars) == ("raise", 1, 3)


def test_multiplier_is_capped_continuous_and_non_increasing() -> None:
    grid = [i / 1000 for i in range(1, 1001)]
    values = [multiplier_for(c) for c in grid]
    assert max(values) <= 10.0
    assert multiplier_for(0) == 10.0
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    # continuity at the boundaries
    assert multiplier_for(0.5 - 1e-9) == pytest.approx(3.0, abs=1e-6)
    assert multiplier_for(0.9 + 1e-9) == 2.0


@pytest.mark.parametrize(
    ("stdout", "had_tle", "preset"),
    [
        ("x" * 1001, True, 100.0),
        ("x" * 1000, True, 50.0),  # "over 1000" is strict
        ("x" * 101, True, 50.0),
        ("x" * 100, True, 30.0),
        ("x", True, 30.0),
        ("  x \n", True, 30.0),  # stripped, as the seed does
        ("", True, None),  # a silent TLE is not retried
        (" \n", True, None),
        (None, True, None),
        ("x" * 5000, False, None),  # no real TLE: no preset
    ],
)
def test_preset_limit(stdout: str | None, had_tle: bool, preset: float | None) -> None:
    assert preset_limit(stdout, had_tle) == preset


def test_presets_from_history_takes_the_largest_real_tle_per_test() -> None:
    history = [
        {"verdict": "TLE", "tests": [
            {"test": 1, "verdict": "OK", "stdout_chars": 5000},
            {"test": 2, "verdict": "TLE", "stdout_chars": 150},
            {"test": 3, "verdict": "TLE", "stdout_chars": 0},
        ]},
        {"verdict": "TLE", "tests": [{"test": 2, "verdict": "TLE", "stdout_chars": 20}]},
        {"verdict": "TLE", "tests": [{"test": 4, "verdict": "TLE", "stdout_chars": 2000}]},
        {"verdict": "SANDBOX_ERROR", "tests": [
            {"test": 5, "verdict": "SANDBOX_ERROR", "stdout_chars": 9000}]},
        {"no": "tests"},
        {"tests": "garbage"},
        {"tests": [{"test": "6", "verdict": "TLE", "stdout_chars": 10}, "garbage"]},
    ]
    assert presets_from_history(history) == {2: 50.0, 4: 100.0}
    assert presets_from_history([]) == {}


# --- extraction ---------------------------------------------------------------------------


def test_extract_prefers_the_language_block_and_the_longest() -> None:
    answer = (
        "Here:\n```python\nprint(1)\n```\nUsage:\n```bash\npython main.py\n```\n"
        "Better:\n```py\nimport sys\nprint(2)\n```\n"
    )
    p = extract_program(answer)
    assert (p.language, p.source, p.origin, p.blocks) == (
        "python", "import sys\nprint(2)\n", "fence:py", 3)


def test_extract_ties_go_to_the_last_block_and_tags_set_the_language() -> None:
    answer = "```cpp\nint main(){}\n```\n```c++\nint main(){;}\n```"
    p = extract_program(answer)
    assert (p.language, p.source) == ("cpp", "int main(){;}\n")
    tie = extract_program("```python\nprint(1)\n```\n```python\nprint(2)\n```")
    assert tie.source == "print(2)\n"


def test_extract_with_a_language_option() -> None:
    answer = "```cpp\nint main() { return 0; }\n```\n```python\nprint(3)\n```"
    assert extract_program(answer, "python").source == "print(3)\n"
    assert extract_program(answer, "cpp").language == "cpp"
    untagged = extract_program("```\nprint(4)\n```\n```text\nsample output that is long\n```",
                               "python")
    assert (untagged.source, untagged.origin) == ("print(4)\n", "fence")


def test_extract_unterminated_fence_and_whole_answer() -> None:
    cut = extract_program("Sure:\n```python\nfor i in range(3):\n    print(i)\n")
    assert cut.source == "for i in range(3):\n    print(i)\n"
    whole = extract_program("print('no fence')\n")
    assert (whole.source, whole.origin, whole.language) == ("print('no fence')\n",
                                                            "whole answer", "python")
    longer_fence = extract_program("````python\nx = '```'\nprint(x)\n````\n")
    assert longer_fence.source == "x = '```'\nprint(x)\n"
