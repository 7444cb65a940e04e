"""The package's shape: no import cycle, no function of radon grade D or worse without a
comment saying why it must be one piece (issue 11)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_no_import_cycle() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "import_cycles.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(importlib.util.find_spec("radon") is None, reason="radon not installed")
def test_no_complex_function_without_a_reason() -> None:
    from radon.complexity import cc_rank, cc_visit

    offenders = []
    for path in sorted((REPO / "pytest_llmbench").rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for block in cc_visit(source):
            if cc_rank(block.complexity) < "D":
                continue
            # the reason is a comment right above the def (or its decorators), "one piece:"
            above = "\n".join(lines[max(0, block.lineno - 4): block.lineno - 1])
            if "one piece:" not in above:
                offenders.append(f"{path.relative_to(REPO)}:{block.lineno} {block.name} "
                                 f"{cc_rank(block.complexity)} ({block.complexity})")
    assert not offenders, offenders


def test_the_vocabularies_are_string_enums_matching_the_tables() -> None:
    from pytest_llmbench.errors import ERROR_CLASSES, OUTCOME_TO_ERROR_CLASS, ErrorClass, Outcome
    from pytest_llmbench.records import ERROR, FAILED, PASSED, Status

    assert [e.value for e in ErrorClass] == list(ERROR_CLASSES)
    assert set(OUTCOME_TO_ERROR_CLASS) | {"ok"} == {o.value for o in Outcome}
    assert set(OUTCOME_TO_ERROR_CLASS.values()) <= set(ERROR_CLASSES)
    assert (PASSED, FAILED, ERROR) == (Status.PASSED, Status.FAILED, Status.ERROR)
    assert type(PASSED) is str and f"{Status.ERROR}" == "error"
