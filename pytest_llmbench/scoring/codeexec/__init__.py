"""Code-execution scoring: sandboxed runs, judge verdicts, the stdout-prefix TLE heuristic.

See ``docs/code-execution.md``. The scorer registry maps the suite scorer ``code`` to
``score_code``.
"""

from __future__ import annotations

from pytest_llmbench.scoring.codeexec.extract import Program, extract_program
from pytest_llmbench.scoring.codeexec.heuristic import (
    Decision,
    normalise,
    outputs_match,
    preset_for_chars,
    preset_limit,
    presets_from_history,
    tle_multiplier,
)
from pytest_llmbench.scoring.codeexec.judge import (
    VERDICTS,
    CodeOptions,
    classify,
    judge,
    sandbox_lease,
    score_code,
    validate_options,
)
from pytest_llmbench.scoring.codeexec.sandbox import (
    Isolation,
    Limits,
    RunResult,
    probe_isolation,
    run_program,
)

__all__ = [
    "VERDICTS",
    "CodeOptions",
    "Decision",
    "Isolation",
    "Limits",
    "Program",
    "RunResult",
    "classify",
    "extract_program",
    "judge",
    "normalise",
    "outputs_match",
    "preset_for_chars",
    "preset_limit",
    "presets_from_history",
    "probe_isolation",
    "run_program",
    "sandbox_lease",
    "score_code",
    "tle_multiplier",
    "validate_options",
]
