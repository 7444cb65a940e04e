"""The ``code`` scorer: build the answer's program, run it on every test, judge it.

Verdicts, per run, per test (its last run) and per item (the first failing test decides;
tests after it are not run unless ``run_all``)::

    OK            the output matches (``heuristic.normalise`` on both sides)
    OK_EXTENDED   OK, but only with a limit raised by the TLE heuristic or a preset
    WA            wrong output (HumanEval style: an assertion of ``check`` failed)
    TLE           killed at the time limit (wall time minus CPU wait, see sandbox.py; or
                  the CPU-time backstop); compilation too slow
    RE            non-zero exit or a signal; HumanEval: exited before check
    CE            the C/C++ compiler rejected the program
    MLE           RE with signs of memory exhaustion (MemoryError, std::bad_alloc, ENOMEM,
                  a peak RSS within 10 % of the cap, or the whole-tree cgroup limit hit)
    OLE           stdout or stderr longer than ``output_limit_kb``
    SANDBOX_ERROR the sandbox failed (retried as is, ``sandbox_retries`` times, default 1)

A test whose run ends in TLE goes through ``heuristic.tle_multiplier``; while it says raise,
at most ``max_raises`` times (default 3), the test runs again with ``limit * multiplier``
(never above ``max_time_limit``, default 100 s, nor above the time left before the item's
task deadline, ``ScoreRequest.deadline``, minus ``DEADLINE_MARGIN``: a raise that does not
fit ends the test as ``TLE``, reason "no time left to raise"). Every decision is logged and
returned in ``details["raises"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import Score, ScoreRequest
from pytest_llmbench.scoring.codeexec.extract import LANGUAGES, extract_program
from pytest_llmbench.scoring.codeexec.heuristic import (
    first_difference,
    outputs_match,
    tle_multiplier,
)
from pytest_llmbench.scoring.codeexec.languages import (
    HARNESS_SOURCE,
    Built,
    Runner,
    build,
    humaneval_program,
    humaneval_secret,
)
from pytest_llmbench.scoring.codeexec.sandbox import (
    Isolation,
    Limits,
    RunResult,
    probe_isolation,
    run_program,
)

log = logging.getLogger("pytest_llmbench.scoring.codeexec")

OK, OK_EXTENDED, WA, TLE, RE, CE, MLE, OLE, SANDBOX_ERROR = (
    "OK", "OK_EXTENDED", "WA", "TLE", "RE", "CE", "MLE", "OLE", "SANDBOX_ERROR")
VERDICTS = (OK, OK_EXTENDED, WA, TLE, RE, CE, MLE, OLE, SANDBOX_ERROR)
PASSING = frozenset({OK, OK_EXTENDED})

LeaseFactory = Callable[[str], AbstractContextManager[Any]]
"""``label -> context manager`` held while one program runs (a sandbox slot)."""

_MEMORY_SIGNS = ("MemoryError", "std::bad_alloc", "Cannot allocate memory")
_LIMIT_KEYS = ("time_limit", "memory_mb", "output_limit_kb", "compile_time_limit", "max_processes",
               "disk_mb")
DEADLINE_MARGIN = 1.0
"""Seconds kept free before the item's task deadline, to return the verdict and store it."""


@dataclass(frozen=True, kw_only=True)
class CodeOptions:
    """The ``code`` scorer's options (suite ``scorer = { name = "code", ... }``)."""

    language: str | None = None
    """Expected language (``python``, ``cpp``, ``c``); default: the fence tag, else Python."""
    time_limit: float = 2.0
    """Wall seconds per test run."""
    memory_mb: int = 256
    output_limit_kb: int = 1024
    compile_time_limit: float = 10.0
    max_processes: int = 32
    disk_mb: int = 64
    """Size of each run's private tmpfs (work dir, /tmp, /var/tmp, /dev/shm together)."""
    max_raises: int = 3
    sandbox_retries: int = 1
    max_time_limit: float = 100.0
    """No raise or preset goes above this."""
    max_wall_factor: float = 3.0
    """The kill waits for the time the program spent waiting for a CPU, up to this multiple
    of the limit (``sandbox.Limits.max_wall_factor``); 1.0 makes the limit a strict wall."""
    python: str = "auto"
    expect_verdict: str | None = None
    """Pass when the item's verdict equals this (demonstration suites); default: OK or OK_EXTENDED."""
    preset_limits: Mapping[int, float] = field(default_factory=dict)
    """Start limits per 1-based test number, from ``presets_from_history`` (set by the engine)."""
    run_all: bool = False
    """Run every test even after a failure (the item verdict is still the first failure's)."""
    lease: bool = True
    """Take a slot of the ``sandbox`` lease pool around every run."""
    sandbox_slots: int | None = None
    """Slots of the pool; default ``os.cpu_count()``."""

    @classmethod
    def parse(cls, options: Mapping[str, Any], extra: Mapping[str, Any]) -> CodeOptions:
        """Options with per-problem overrides from ``extra`` (limits and ``expect_verdict``)."""
        merged = {k: v for k, v in options.items() if k != "name"}
        merged.update({k: extra[k] for k in (*_LIMIT_KEYS, "expect_verdict") if k in extra})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ScorerError(f"code scorer: unknown option(s) {unknown}; known: {sorted(known)}")
        try:
            opts = cls(**merged)
            _validate(opts)
        except (TypeError, ValueError) as exc:
            raise ScorerError(f"code scorer: bad option: {exc}") from exc
        return opts


def _validate(o: CodeOptions) -> None:
    if o.language is not None and o.language not in LANGUAGES:
        raise ValueError(f"language {o.language!r} is not one of {LANGUAGES}")
    for name in ("time_limit", "compile_time_limit", "max_time_limit", "max_wall_factor"):
        if not isinstance(getattr(o, name), (int, float)) or getattr(o, name) <= 0:
            raise ValueError(f"{name} must be a positive number, got {getattr(o, name)!r}")
    for name in ("memory_mb", "output_limit_kb", "max_processes", "max_raises", "sandbox_retries",
                 "disk_mb"):
        value = getattr(o, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if o.max_wall_factor < 1:
        raise ValueError("max_wall_factor must be >= 1")
    if o.sandbox_retries > 2:
        raise ValueError("sandbox_retries is at most 2")
    if o.expect_verdict is not None and o.expect_verdict not in VERDICTS:
        raise ValueError(f"expect_verdict {o.expect_verdict!r} is not one of {VERDICTS}")


def validate_options(options: Mapping[str, Any]) -> None:
    """Check the scorer options at collection time (raises ``ScorerError``)."""
    CodeOptions.parse(options, {})


# --- leases -------------------------------------------------------------------------------


def state_dir() -> Path:
    """Where the lease pool lives: ``LLMBENCH_STATE_DIR`` or a temp dir (the engine's lease
    monitor watches the same place: ``coord.lease.default_state_dir``)."""
    from pytest_llmbench.coord.lease import default_state_dir

    return default_state_dir()


def sandbox_lease(slots: int | None = None) -> LeaseFactory:
    """A lease factory over the ``sandbox`` pool (default slots: the number of cores)."""
    from pytest_llmbench.coord.lease import (
        LeasePool,  # lazy: unit tests of the judge need no lease machinery
    )

    root = state_dir()
    root.mkdir(parents=True, exist_ok=True)
    pool = LeasePool(root, "sandbox", slots or os.cpu_count() or 1)

    def acquire(label: str) -> AbstractContextManager[Any]:
        return pool.acquire(timeout=None, label=label)

    return acquire


def make_runner(lease: LeaseFactory | None, isolation: Isolation | None = None) -> Runner:
    """``run_program`` holding a lease around each run (not around waiting for it)."""

    def run(argv: list[str], *, limits: Limits, label: str = "", **kwargs: Any,
            ) -> tuple[RunResult, dict[str, bytes]]:
        with lease(label) if lease is not None else nullcontext():
            return run_program(argv, limits=limits, isolation=isolation, **kwargs)

    return run


# --- one run -> verdict -------------------------------------------------------------------


def _memory_exhausted(r: RunResult) -> bool:
    if r.oom_kills:
        return True
    tail = r.stderr[-4000:]
    if any(sign in tail for sign in _MEMORY_SIGNS):
        return True
    cap = r.limits.memory_mb * 1024
    return bool(cap) and r.maxrss_kb >= 0.9 * cap


def classify(r: RunResult, expected: str | None, nonce: str | None = None) -> str:
    """The verdict of one run: ``expected`` stdout, or (HumanEval) the harness's report,
    which must carry this run's ``nonce``."""
    if r.error:
        return SANDBOX_ERROR
    if r.stdout_over or r.stderr_over or r.signal == signal.SIGXFSZ:
        return OLE
    cpu_kill = r.signal == signal.SIGXCPU or (
        r.signal == signal.SIGKILL and r.cpu >= r.limits.cpu_seconds - 0.05)
    if r.timed_out or cpu_kill:
        return TLE
    if nonce is not None:
        said = set(r.report.splitlines())
        if r.exit_code == 0 and f"ok {nonce}" in said:
            return OK
        if f"wa {nonce}" in said:
            return WA
    if r.exit_code != 0:
        return MLE if _memory_exhausted(r) else RE
    if nonce is not None:
        return RE  # exited 0 before check() ran (sys.exit in the program's top level)
    return OK if outputs_match(r.stdout, expected or "") else WA


# --- one test with the TLE heuristic ------------------------------------------------------


@dataclass
class _Test:
    number: int
    stdin: str
    expected: str | None
    harness: dict[str, str] | None = None
    """HumanEval: the harness's input (``languages.humaneval_program``), sent with a fresh
    nonce per run."""


class _Clock:
    """The time the item's task deadline leaves for runs (None: no deadline known)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def left(self) -> float | None:
        if self.deadline is None:
            return None
        return self.deadline - DEADLINE_MARGIN - time.monotonic()


def _summary(r: RunResult, verdict: str) -> dict[str, Any]:
    return {"limit": r.limits.time, "verdict": verdict, "wall": r.wall,
            "cpu_wait": r.cpu_wait, "cpu": r.cpu,
            "exit_code": r.exit_code, "signal": r.signal}


def _run_once(test: _Test, built: Built, limits: Limits, runner: Runner,
              ) -> tuple[RunResult, str]:
    nonce = secrets.token_hex(16) if test.harness is not None else None
    secret = humaneval_secret(test.harness, nonce) if test.harness and nonce else None
    r, _ = runner(built.argv, limits=limits, stdin=test.stdin, files=built.files,
                  label=f"test {test.number}", secret=secret)
    return r, classify(r, test.expected, nonce)


def _raise_decision(test: _Test, r: RunResult, limit: float, runs: int, raised: int,
                    opts: CodeOptions, clock: _Clock) -> dict[str, Any]:
    """The heuristic's decision on one TLE, with the caps applied (``new_limit`` None: stop)."""
    d = tle_multiplier(r.stdout, test.expected)
    entry: dict[str, Any] = {"test": test.number, "run": runs, "limit": limit,
                             "wall": r.wall, **d.to_dict(), "new_limit": None}
    if d.multiplier is None:
        return entry
    new_limit = round(min(limit * d.multiplier, opts.max_time_limit), 4)
    left = clock.left()
    if raised >= opts.max_raises:
        entry["reason"] = f"{opts.max_raises} raises max"
    elif limit >= opts.max_time_limit:
        entry["reason"] = f"limit cap {opts.max_time_limit:g} s"
    elif left is not None and new_limit > left:
        entry["reason"] = (f"no time left to raise: {max(left, 0.0):.2f} s left before the "
                           f"task deadline, {new_limit:g} s needed")
    else:
        entry["new_limit"] = new_limit
    return entry


def _judge_test(test: _Test, built: Built, opts: CodeOptions, limits: Limits, runner: Runner,
                raises: list[dict[str, Any]], clock: _Clock) -> dict[str, Any]:
    base = limits.time
    preset = opts.preset_limits.get(test.number)
    limit = min(max(base, preset), opts.max_time_limit) if preset else base
    runs: list[dict[str, Any]] = []
    raised = retried = 0
    while True:
        left = clock.left()
        run_limits = dataclasses.replace(limits, time=limit,
                                         wall_cap=None if left is None else max(left, 0.01))
        r, verdict = _run_once(test, built, run_limits, runner)
        runs.append(_summary(r, verdict))
        if verdict == SANDBOX_ERROR and retried < opts.sandbox_retries:
            retried += 1
            log.warning("test %d: sandbox error (%s), retrying as is (%d/%d)",
                        test.number, r.error, retried, opts.sandbox_retries)
            continue
        if verdict != TLE:
            break
        entry = _raise_decision(test, r, limit, len(runs), raised, opts, clock)
        raises.append(entry)
        log.info(
            "TLE heuristic: test %d run %d at limit %.3g s: output %d/%d chars (%.1f%%), "
            "prefix=%s, multiplier=%s -> %s",
            test.number, len(runs), limit, entry["actual_chars"], entry["expected_chars"],
            100 * entry["completion"], entry["is_prefix"], entry["multiplier"],
            f"new limit {entry['new_limit']:g} s" if entry["new_limit"] else entry["reason"])
        if entry["new_limit"] is None:
            break
        raised += 1
        limit = entry["new_limit"]
    if verdict == OK and limit > base:
        verdict = OK_EXTENDED
    return {
        "test": test.number, "verdict": verdict, "wall": r.wall, "cpu_wait": r.cpu_wait,
        "cpu": r.cpu, "limit": limit,
        "base_limit": base, "exit_code": r.exit_code, "signal": r.signal,
        "stdout_head": r.stdout[:200], "stdout_chars": len(r.stdout.strip()),
        "stderr_tail": r.stderr[-500:], "maxrss_kb": r.maxrss_kb,
        "tree_peak_memory_kb": r.peak_memory_kb, "oom_kills": r.oom_kills,
        "output_limit_kb": limits.output_kb,
        "leftovers_killed": r.killed_leftovers, "error": r.error, "runs": runs,
        "_stdout": r.stdout, "_expected": test.expected,
    }


# --- the item -----------------------------------------------------------------------------


def _tests_of(extra: Mapping[str, Any]) -> list[_Test]:
    if "tests" in extra:
        tests = extra["tests"]
        if not isinstance(tests, list) or not tests:
            raise ScorerError("code scorer: extra.tests must be a non-empty list")
        out = []
        for i, t in enumerate(tests, 1):
            if not isinstance(t, Mapping) or not isinstance(t.get("stdout"), str):
                raise ScorerError(f"code scorer: extra.tests[{i - 1}] needs a string `stdout`")
            out.append(_Test(i, str(t.get("stdin", "")), t["stdout"]))
        return out
    if "test" in extra:
        if not isinstance(extra.get("entry_point"), str):
            raise ScorerError("code scorer: HumanEval style needs extra.entry_point")
        return [_Test(1, "", None, harness={})]  # filled in by judge() with the program
    raise ScorerError("code scorer: the instance needs extra.tests or extra.test + entry_point")


def _explain_pass(verdict: str, tests: list[dict[str, Any]]) -> str:
    passed = sum(t["verdict"] in PASSING for t in tests)
    text = f"{verdict}: {passed}/{len(tests)} tests passed"
    slow = [t for t in tests if t["verdict"] == OK_EXTENDED]
    if slow:
        text += "; " + ", ".join(
            f"test {t['test']} needed a {t['limit']:g} s limit (base {t['base_limit']:g} s, "
            f"wall {t['wall']:.2f} s)" for t in slow)
    return text


def _explain_tle(t: dict[str, Any], raises: list[dict[str, Any]]) -> str:
    mine = [d for d in raises if d["test"] == t["test"]]
    note = ""
    if mine:
        last = mine[-1]
        ups = [d for d in mine if d["new_limit"]]
        if last["multiplier"] is not None:
            note = (f"; output {100 * last['completion']:.0f}% of expected, "
                    f"not raised further: {last['reason']}")
        else:
            note = f"; {last['reason']}, not raised"
        if ups:
            note += " (raised " + ", ".join(
                f"x{d['multiplier']:g} to {d['new_limit']:g} s" for d in ups) + ")"
    return f"TLE on test {t['test']} (limit {t['limit']:g} s, wall {t['wall']:.2f} s{note})"


def _explain_failure(verdict: str, t: dict[str, Any]) -> str:
    where = f"{verdict} on test {t['test']}"
    if verdict == WA:
        if t["_expected"] is None:
            return f"{where} (an assertion of check() failed)"
        diff = first_difference(t["_stdout"], t["_expected"])
        if diff is None:
            return where
        line, want, got = diff
        return f"{where} (line {line}: expected {want[:60]!r}, got {got[:60]!r})"
    if verdict in (RE, MLE):
        last_line = next((ln for ln in reversed(t["stderr_tail"].splitlines()) if ln.strip()), "")
        how = f"signal {t['signal']}" if t["signal"] else f"exit code {t['exit_code']}"
        if t.get("oom_kills"):
            how += f", {t['oom_kills']} process(es) killed at the whole-tree memory limit"
        return f"{where} ({how}{': ' + last_line[:120] if last_line else ''})"
    if verdict == OLE:
        return f"{where} (stdout or stderr over {t['output_limit_kb']} KB)"
    return f"{where} ({t['error']})"


def _explain(verdict: str, tests: list[dict[str, Any]], raises: list[dict[str, Any]],
             built: Built) -> str:
    if built.failure:
        return f"{verdict}: {built.message}"
    if verdict in PASSING:
        return _explain_pass(verdict, tests)
    t = next(t for t in tests if t["verdict"] == verdict)
    if verdict == TLE:
        return _explain_tle(t, raises)
    return _explain_failure(verdict, t)


def _build(req: ScoreRequest, opts: CodeOptions, tests: list[_Test], iso: Isolation,
           runner: Runner, clock: _Clock) -> tuple[Built, str, str]:
    """The runnable program (or why not), its language and where in the answer it was."""
    program = extract_program(req.answer, opts.language)
    source = program.source
    if tests[0].harness is not None:
        if program.language != "python":
            raise ScorerError("code scorer: HumanEval-style tests need Python")
        tests[0].harness = humaneval_program(
            source, str(req.extra["test"]), str(req.extra["entry_point"]),
            str(req.extra.get("prompt", "")))
        source = HARNESS_SOURCE.decode()
    left = clock.left()
    if left is not None and left <= 0:
        return (Built([], {}, failure=TLE, message="no time left before the task deadline"),
                program.language, program.origin)
    built = build(program.language, source, python=opts.python, isolation=iso,
                  compile_time_limit=opts.compile_time_limit, max_processes=opts.max_processes,
                  runner=runner, wall_cap=left)
    return built, program.language, program.origin


def _run_tests(tests: list[_Test], built: Built, opts: CodeOptions, runner: Runner,
               clock: _Clock) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Item verdict, per-test results and heuristic decisions."""
    limits = Limits(time=float(opts.time_limit), memory_mb=opts.memory_mb,
                    output_kb=opts.output_limit_kb, processes=opts.max_processes,
                    disk_mb=opts.disk_mb, max_wall_factor=float(opts.max_wall_factor))
    results: list[dict[str, Any]] = []
    raises: list[dict[str, Any]] = []
    if built.failure:
        return built.failure, results, raises
    for test in tests:
        results.append(_judge_test(test, built, opts, limits, runner, raises, clock))
        if results[-1]["verdict"] not in PASSING and not opts.run_all:
            break
    failing = next((t["verdict"] for t in results if t["verdict"] not in PASSING), None)
    extended = any(t["verdict"] == OK_EXTENDED for t in results)
    return failing or (OK_EXTENDED if extended else OK), results, raises


def judge(req: ScoreRequest, *, lease: LeaseFactory | None | bool = True,
          isolation: Isolation | None = None) -> Score:
    """``score_code`` with the lease and the isolation pluggable (tests pass ``lease=None``).

    ``lease=True`` means the ``sandbox`` pool of ``sandbox_lease`` (if the ``lease`` option
    allows it); a callable is used as is; ``None``/``False`` runs without leases.
    """
    started = time.monotonic()
    clock = _Clock(req.deadline)
    opts = CodeOptions.parse(req.options, req.extra)
    tests = _tests_of(req.extra)
    if lease is True:
        factory: LeaseFactory | None = sandbox_lease(opts.sandbox_slots) if opts.lease else None
    else:
        factory = lease or None
    iso = isolation or probe_isolation()
    runner = make_runner(factory, iso)
    built, language, origin = _build(req, opts, tests, iso, runner, clock)
    verdict, results, raises = _run_tests(tests, built, opts, runner, clock)
    explanation = _explain(verdict, results, raises, built)
    for t in results:
        del t["_stdout"], t["_expected"]
    if opts.expect_verdict is not None:
        value = 1.0 if verdict == opts.expect_verdict else 0.0
        explanation += f" [expected verdict {opts.expect_verdict}]"
    else:
        value = 1.0 if verdict in PASSING else 0.0
    details: dict[str, Any] = {
        "verdict": verdict, "tests": results, "raises": raises,
        "tests_total": len(tests), "tests_passed": sum(t["verdict"] in PASSING for t in results),
        "language": language, "program_origin": origin,
        "interpreter": built.interpreter, "compile": built.compile,
        "isolation": iso.to_dict(), "limits": {"time_limit": opts.time_limit,
        "memory_mb": opts.memory_mb, "output_limit_kb": opts.output_limit_kb,
        "max_processes": opts.max_processes, "disk_mb": opts.disk_mb},
        "elapsed": round(time.monotonic() - started, 3),
    }
    if req.deadline is not None:
        details["task_time_left"] = round(req.deadline - time.monotonic(), 3)
    if opts.expect_verdict is not None:
        details["expect_verdict"] = opts.expect_verdict
    if verdict == SANDBOX_ERROR:
        details["error_class"] = "sandbox_error"
    log.debug("code scorer: %s", explanation)
    return Score(value=value, explanation=explanation, details=details)


def score_code(req: ScoreRequest) -> Score:
    """The ``code`` scorer: 1.0 for OK / OK_EXTENDED (or the ``expect_verdict``), else 0.0."""
    return judge(req)
