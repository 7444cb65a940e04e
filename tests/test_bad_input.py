"""Bad suites and bad paths: one clear error each, nothing skipped in silence (issue 14.6).

Includes a seeded fuzz test that mutates the example suites and drives every mutant through
what collection does (``suite_source`` then ``load_suite``), plus a sample of mutants
through pytest itself.
"""

from __future__ import annotations

import random
import re
import signal
import sys
from pathlib import Path

import pytest

from pytest_llmbench.collect.items import DEFAULT_SUITE_FILES, suite_source
from pytest_llmbench.collect.suite import load_suite
from pytest_llmbench.errors import SuiteError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent

SPACED = """
[suite]
scorer = "numeric"

[[ prompts ]]
id = "hello"
template = "What is 2 + 3?"

[[ prompts.instances ]]
id = "one"
expected = "5"
"""

INLINE = """
prompts = [
  { id = "hello", template = "What is 2 + 3?", scorer = "numeric", instances = [
      { id = "one", expected = "5" } ] },
]
"""


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


@pytest.mark.parametrize("text", [SPACED, INLINE], ids=["spaced-header", "inline-array"])
def test_a_suite_is_found_however_the_prompts_are_spelled(pytester: pytest.Pytester,
                                                         sim_env: str, text: str) -> None:
    pytester.makefile(".toml", greet=text)
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["greet.toml::hello[[]one-sim[]]"])


def test_a_broken_suite_is_a_collection_error_and_the_others_run(pytester: pytest.Pytester,
                                                                sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED, broken='[[prompts]]\nid = "x\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*ERROR collecting broken.toml*", "*broken.toml: invalid TOML*",
                                 "*1 passed, 1 error*"])
    assert result.ret != 0


def test_other_toml_files_are_left_alone(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED, settings='[tool.other]\nx = 1\n',
                      notes='this is [not toml at all')
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == 0
    assert "settings.toml" not in result.stdout.str() and "notes.toml" not in result.stdout.str()


def test_the_ini_option_limits_which_files_may_be_suites(pytester: pytest.Pytester,
                                                        sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED, eval_greet=SPACED)
    pytester.makeini("[pytest]\nllmbench_suite_files = eval_*.toml\n")
    result = pytester.runpytest("--collect-only", "-q")
    out = result.stdout.str()
    assert "eval_greet.toml::hello" in out and "\ngreet.toml::" not in out


@pytest.mark.parametrize(("text", "message"), [
    (SPACED.replace('id = "one"', 'id = "one"\nrepeats = 100000000'),
     "repeats = 100,000,000 is over the limit of 10,000"),
    ("[suite]\nextra = { x = " + "[" * 400 + "]" * 400 + " }\n" + SPACED.split("[suite]")[1],
     "nested deeper than 32 levels"),
    (SPACED.replace('id = "one"', 'id = "one"\ndeadlines = { api_retries = 100 }'),
     "api_retries = 100 is over the limit of 20"),
])
def test_bounds_give_one_clear_error(pytester: pytest.Pytester, sim_env: str, text: str,
                                     message: str) -> None:
    pytester.makefile(".toml", greet=text)
    result = _run(pytester, "--collect-only")
    out = result.stdout.str() + result.stderr.str()
    assert message in out
    assert "Traceback" not in out and "RecursionError" not in out


def test_a_store_path_that_is_a_file_is_one_usage_error(pytester: pytest.Pytester,
                                                       sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED, other=SPACED)
    store = pytester.path / "store"
    store.write_text("not a directory")
    result = _run(pytester, f"--llmbench-store={store}")
    err = result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert err.count("exists and is not a directory") == 1 and "--llmbench-store" in err
    assert "Traceback" not in err + result.stdout.str()


def test_an_unusable_jsonl_path_fails_before_the_run(pytester: pytest.Pytester,
                                                    sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED)
    result = _run(pytester, "--llmbench-jsonl=missing/dir/out.jsonl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "does not exist; create it or choose another file" in result.stderr.str()
    assert "passed" not in result.stdout.str()


def test_absurd_retries_are_a_usage_error(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", greet=SPACED)
    result = _run(pytester, "--llmbench-api-retries=100000000000000000000")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "must be at most 20" in result.stderr.str()


# --- fuzz ---------------------------------------------------------------------------------

_SUITE_WORDS = re.compile(rb"prompts?|\[\s*suite\s*\]", re.IGNORECASE)


def _mutate(text: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    op = rng.randrange(8)
    i = rng.randrange(len(lines)) if lines else 0
    if op == 0 and lines:  # drop a line
        del lines[i]
    elif op == 1 and lines:  # duplicate a line
        lines.insert(i, lines[i])
    elif op == 2 and lines:  # swap two lines
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 3:  # flip a byte
        s = "".join(lines)
        k = rng.randrange(len(s))
        return s[:k] + chr(rng.randrange(32, 127)) + s[k + 1:]
    elif op == 4:  # truncate
        s = "".join(lines)
        return s[: rng.randrange(len(s))]
    elif op == 5 and lines:  # a value of another type
        lines[i] = re.sub(r"= .*", rng.choice(["= 1", "= true", '= ""', "= []", "= {}",
                                                 "= 1979-05-27", "= -1", "= 1e400"]), lines[i])
    elif op == 6:  # deep nesting or a huge repeat
        lines.insert(i, rng.choice(["x = " + "[" * 200 + "]" * 200 + "\n", "repeats = 99999999\n"]))
    else:  # header noise
        lines.insert(i, rng.choice(["[[prompts]]\n", "[suite]\n", "[[ prompts.instances ]]\n",
                                    "[[prompts.instances]]\nid = 'dup'\n"]))
    return "".join(lines)


def test_fuzzed_example_suites_never_crash_hang_or_vanish(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    sources = sorted((REPO / "example_suites").glob("*.toml"))
    assert sources, "the example suites are the fuzz seeds"
    seeds = [p.read_text() for p in sources]

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError("a mutant took more than 10 s")

    old = signal.signal(signal.SIGALRM, alarm)
    outcomes = {"suite": 0, "error": 0, "ignored": 0}
    try:
        for n in range(300):
            text = _mutate(rng.choice(seeds), rng)
            path = tmp_path / f"mutant_{n}.toml"
            path.write_text(text)
            signal.alarm(10)
            source = suite_source(path, tmp_path, DEFAULT_SUITE_FILES)
            if source is None:
                # ignored only when it is not a suite: parses without prompts/suite keys, or
                # does not parse and never mentions prompts or a [suite] table
                try:
                    keys = {k.lower() for k in tomllib.loads(text)}
                    assert not keys & {"prompts", "prompt", "suite"}, f"mutant {n}:\n{text}"
                except tomllib.TOMLDecodeError:
                    assert not _SUITE_WORDS.search(text.encode()), f"mutant {n}:\n{text}"
                outcomes["ignored"] += 1
            elif source.error is not None:
                outcomes["error"] += 1
            else:
                try:
                    load_suite(path, rootdir=tmp_path, parsed=source.parsed)
                    outcomes["suite"] += 1
                except SuiteError:
                    outcomes["error"] += 1
            signal.alarm(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert outcomes["suite"] > 10 and outcomes["error"] > 50, outcomes


def test_fuzzed_mutants_through_pytest_show_no_traceback(pytester: pytest.Pytester,
                                                        sim_env: str) -> None:
    rng = random.Random(7)
    seeds = [p.read_text() for p in sorted((REPO / "example_suites").glob("*.toml"))]
    for n in range(12):
        pytester.makefile(".toml", **{f"m{n}": _mutate(rng.choice(seeds), rng)})
    result = _run(pytester, "--collect-only", "-q")
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out and "INTERNALERROR" not in out
    collected = {m.group(1) for m in re.finditer(r"^(m\d+)\.toml::", out, re.M)}
    errored = set(re.findall(r"ERROR collecting (m\d+)\.toml", out))
    for n in range(12):
        text = (pytester.path / f"m{n}.toml").read_text()
        if re.search(r"^\s*\[\[\s*prompts\s*\]\]", text, re.M):
            assert f"m{n}" in collected | errored, f"m{n}.toml vanished:\n{text}\n{out}"
