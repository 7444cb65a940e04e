"""example_suites/code.toml end to end below pytest: the simulator's answers, judged.

Each case's rendered messages go to the real simulator over HTTP; its answer (a canned
program, ``sim/programs.py``) is scored by ``score_code`` with the real lease pool. Every
item must pass: the non-OK ones through their ``expect_verdict``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from pytest_llmbench.collect.suite import load_suite
from pytest_llmbench.records import Case, ScoreRequest
from pytest_llmbench.scoring.codeexec import score_code
from pytest_llmbench.sim.programs import PROGRAMS

REPO = Path(__file__).resolve().parent.parent
SUITE = REPO / "example_suites" / "code.toml"
CASES = load_suite(SUITE, rootdir=REPO).cases


def ask(base_url: str, case: Case) -> str:
    body = json.dumps({"model": "sim", "messages": list(case.turns[0])}).encode()
    request = urllib.request.Request(f"{base_url}/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer: str = json.load(response)["choices"][0]["message"]["content"]
    return answer


def test_every_program_of_the_simulator_is_used_by_the_suite() -> None:
    text = SUITE.read_text()
    used = {name for name in PROGRAMS if f"program={name}" in text or f"program = \"{name}\"" in text}
    assert used == set(PROGRAMS) - {"hello"}


@pytest.mark.parametrize("case", CASES, ids=[c.case_id for c in CASES])
def test_code_suite_item(case: Case, shared_sim: str, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    if case.scorer.options.get("language") == "cpp":
        import shutil

        if shutil.which("g++") is None:
            pytest.skip("g++ is not installed")
    monkeypatch.setenv("LLMBENCH_STATE_DIR", str(tmp_path))
    answer = ask(shared_sim, case)
    assert "```" in answer
    score = score_code(ScoreRequest(answer=answer, expected=case.expected,
                                    options=case.scorer.options, extra=case.extra))
    want = case.extra.get("expect_verdict", "OK")
    assert score.details["verdict"] == want, score.explanation
    assert score.value >= case.scorer.threshold, score.explanation
