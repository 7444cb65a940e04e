"""Generated projects for ``bench/run.py``: one suite, its bare-xdist twin, its Inspect twin.

Every side asks the simulator exactly the same questions (one user message, no system
prompt, ``max_tokens`` 16), so the simulator's work is identical and only the runner differs:

- ``write_suite``: a TOML suite of N instances of ``What is {{a}} + {{b}}?``, scorer
  ``numeric`` (the plugin's side);
- ``write_bare_tests``: N parametrized pytest tests, each making the same chat call with the
  ``openai`` SDK, one client per worker process (bare pytest / pytest-xdist);
- ``write_inspect_task``: an Inspect AI task with the same N samples.

Each project gets its own ``pytest.ini`` so its rootdir is the temp dir, never this repo.
"""

from __future__ import annotations

from pathlib import Path

MODEL = "sim-1"
MAX_TOKENS = 16


def operands(i: int) -> tuple[int, int]:
    """Item ``i``'s operands: distinct questions, so every item is its own conversation."""
    return i, (i * 7919 + 13) % 100_000


def question(i: int) -> str:
    a, b = operands(i)
    return f"What is {a} + {b}?"


def answer(i: int) -> str:
    a, b = operands(i)
    return str(a + b)


def messages(i: int) -> list[dict[str, str]]:
    """The messages every side sends for item ``i`` (what the simulator hashes)."""
    return [{"role": "user", "content": question(i)}]


def _ini(folder: Path, extra: str = "") -> None:
    (folder / "pytest.ini").write_text("[pytest]\n" + extra, encoding="utf-8")


def write_suite(folder: Path, n: int, *, name: str = "bench") -> Path:
    """A suite file with ``n`` items; node ids are ``<file>::add[i<k>-<model>]``."""
    folder.mkdir(parents=True, exist_ok=True)
    _ini(folder)
    lines = [
        "[suite]",
        f'name = "{name}"',
        'scorer = "numeric"',
        f"params = {{ max_tokens = {MAX_TOKENS} }}",
        "",
        "[[prompts]]",
        'id = "add"',
        'template = "What is {{a}} + {{b}}?"',
        "",
    ]
    for i in range(n):
        a, b = operands(i)
        lines += [
            "[[prompts.instances]]",
            f'id = "i{i}"',
            f"vars = {{ a = {a}, b = {b} }}",
            f'expected = "{a + b}"',
            "",
        ]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_model_config(folder: Path, *, name: str, base_url: str, rpm: int) -> None:
    """Declare a model with a request quota in ``pyproject.toml`` (``--llmbench-model NAME``).

    ``api_key_env`` names a variable that is never set: the simulator needs no key, and none
    is sent.
    """
    (folder / "pyproject.toml").write_text(
        f"[tool.llmbench.models.{name}]\n"
        f'base_url = "{base_url}"\n'
        f'model = "{MODEL}"\n'
        f"rpm = {rpm}\n"
        'api_key_env = "LLMBENCH_BENCH_UNSET_KEY"\n',
        encoding="utf-8",
    )


BARE_TEST = '''\
"""Bare pytest(-xdist) baseline: one openai SDK chat call per test, one client per process."""

import functools
import os

import openai
import pytest

N = {n}


@functools.cache
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=os.environ["LLMBENCH_SIM_URL"], api_key="x", max_retries=0)


@pytest.mark.parametrize("i", range(N))
def test_add(i: int) -> None:
    a, b = i, (i * 7919 + 13) % 100_000
    reply = client().chat.completions.create(
        model="{model}",
        messages=[{{"role": "user", "content": f"What is {{a}} + {{b}}?"}}],
        max_tokens={max_tokens},
    )
    assert float(reply.choices[0].message.content) == a + b
'''


def write_bare_tests(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _ini(folder)
    path = folder / "test_bare.py"
    path.write_text(BARE_TEST.format(n=n, model=MODEL, max_tokens=MAX_TOKENS), encoding="utf-8")
    return path


INSPECT_TASK = '''\
"""Inspect AI baseline: the same N questions as samples, generate() then a numeric match."""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import match
from inspect_ai.solver import generate

N = {n}


def _sample(i: int) -> Sample:
    a, b = i, (i * 7919 + 13) % 100_000
    return Sample(id=i, input=f"What is {{a}} + {{b}}?", target=str(a + b))


@task
def bench() -> Task:
    return Task(dataset=[_sample(i) for i in range(N)], solver=generate(), scorer=match(numeric=True))
'''


def write_inspect_task(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bench_task.py"
    path.write_text(INSPECT_TASK.format(n=n), encoding="utf-8")
    return path


def write_empty(folder: Path) -> Path:
    """A project with no tests at all: pytest's (and xdist's) start-up alone."""
    folder.mkdir(parents=True, exist_ok=True)
    _ini(folder)
    return folder


TRIVIAL_TEST = '''\
"""Bare pytest reporting N trivial parametrized tests: the floor of reporting N items."""

import pytest


@pytest.mark.parametrize("i", range({n}))
def test_trivial(i: int) -> None:
    pass
'''


def write_trivial_tests(folder: Path, n: int) -> Path:
    """``test_trivial.py``: ``n`` parametrized tests that do nothing (the scale baseline)."""
    folder.mkdir(parents=True, exist_ok=True)
    _ini(folder)
    path = folder / "test_trivial.py"
    path.write_text(TRIVIAL_TEST.format(n=n), encoding="utf-8")
    return path
