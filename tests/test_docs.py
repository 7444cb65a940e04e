"""The docs stay true: their examples run, their links resolve, the names they cite exist,
and every option, config key and environment variable the plugin reads is documented.

Which fenced blocks run is said in the docs themselves, so a reader sees it too:

* the info string: ```` ```toml file=pyproject.toml ```` writes the block to that file of a
  temporary project; ```` ```bash run ```` runs its pytest invocations there (each
  ``&&``-separated part that calls pytest; ``pip``/``venv`` parts are skipped);
  ```` ```python run ```` runs the block with Python there;
* an HTML comment on the line before the fence, ``<!-- docs-test: KEY=VALUE ... -->``:
  ``example=NAME`` puts the blocks of one document with that name in one project;
  ``copy=PATH`` copies a file or directory of the repository into it; ``cmd="pytest ..."``
  is the command when the example shows none; ``allow-failures`` accepts failed items (never
  errors); ``slow`` marks the example slow; ``norun`` says a suite or config block is a
  fragment, not an example.

An example without a command runs ``pytest`` in its project. Every run talks to the shared
simulator, and must end with exit code 0 (1 with ``allow-failures``) and no error items.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CONFIG_DOC = REPO / "docs" / "configuration.md"
SCORERS_DOC = REPO / "docs" / "scorers.md"
_COMMENT = re.compile(r"^\s*<!--\s*docs-test:(.*?)-->\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,})(.*)$")


@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    attrs: dict[str, str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


@dataclass
class Example:
    name: str
    blocks: list[Block] = field(default_factory=list)

    def attr(self, key: str) -> str | None:
        for block in self.blocks:
            if key in block.attrs:
                return block.attrs[key]
        return None


def _attrs(text: str) -> dict[str, str]:
    out = {}
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        out[key] = value if sep else ""
    return out


def blocks_of(doc: Path) -> Iterator[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    pending: dict[str, str] = {}
    i = 0
    while i < len(lines):
        comment = _COMMENT.match(lines[i])
        fence = _FENCE.match(lines[i])
        if comment:
            pending = _attrs(comment.group(1))
        elif fence:
            indent, ticks, info = fence.groups()
            words = info.split(None, 1)
            lang = words[0] if words else ""
            attrs = {**pending, **_attrs(words[1] if len(words) > 1 else "")}
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(ticks):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            yield Block(doc, i - len(body), lang, attrs, "\n".join(body) + "\n")
            pending = {}
        elif lines[i].strip():
            pending = {}
        i += 1


def all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in blocks_of(doc)]


def examples() -> list[Example]:
    found: dict[str, Example] = {}
    for block in all_blocks():
        runnable = "run" in block.attrs or "file" in block.attrs or "example" in block.attrs
        if not runnable or "norun" in block.attrs:
            continue
        name = block.attrs.get("example") or f"line{block.line}"
        key = f"{block.doc.relative_to(REPO)}::{name}"
        found.setdefault(key, Example(key)).blocks.append(block)
    return list(found.values())


def _params() -> list[object]:
    return [pytest.param(ex, id=ex.name, marks=[pytest.mark.slow] if ex.attr("slow") is not None
                         else []) for ex in examples()]


def _pytest_parts(line: str) -> list[list[str]]:
    """The pytest invocations of one shell line, as argument lists after ``pytest``."""
    out = []
    for part in line.split("&&"):
        words = shlex.split(part, comments=True)
        if not words:
            continue
        if words[0] == "pytest" or words[0].endswith("/pytest"):
            out.append(words[1:])
        elif len(words) > 2 and words[1:3] == ["-m", "pytest"] and "python" in words[0]:
            out.append(words[3:])
    return out


def _commands(example: Example) -> list[list[str]]:
    commands: list[list[str]] = []
    cmd = example.attr("cmd")
    if cmd:
        commands.extend(_pytest_parts(cmd))
    for block in example.blocks:
        if block.lang in ("bash", "sh", "console") and "run" in block.attrs:
            for line in block.text.splitlines():
                commands.extend(_pytest_parts(line))
    return commands


def _outcomes(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    lines = result.stdout.strip().splitlines()
    tail = lines[-1] if lines else ""
    return {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", tail)}


def _setup(example: Example, where: Path) -> None:
    for rel in filter(None, (b.attrs.get("copy") for b in example.blocks)):
        source = REPO / rel
        if source.is_dir():
            shutil.copytree(source, where / rel)
        else:
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, where / rel)
    for block in example.blocks:
        name = block.attrs.get("file")
        if name:
            target = where / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("a", encoding="utf-8") as fh:  # two blocks may build one file
                fh.write(block.text)


@pytest.mark.parametrize("example", _params())
def test_example_runs(example: Example, tmp_path: Path, sim_env: str) -> None:
    _setup(example, tmp_path)
    allow_failures = example.attr("allow-failures") is not None
    ran = 0
    for block in example.blocks:
        if block.lang == "python" and "run" in block.attrs and "file" not in block.attrs:
            done = subprocess.run([sys.executable, "-c", block.text], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{block.where}: {done.stderr[-2000:]}"
            ran += 1
    commands = _commands(example) or ([] if ran else [[]])
    for args in commands:
        argv = [sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        shown = f"{example.name}: pytest {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
        assert done.returncode in ((0, 1) if allow_failures else (0,)), shown
        assert "error" not in _outcomes(done) and "Traceback" not in done.stdout, shown
        for arg in args:  # the files the example says it writes are written
            for flag in ("--junitxml=", "--llmbench-jsonl="):
                if arg.startswith(flag):
                    assert (tmp_path / arg[len(flag):]).stat().st_size > 0, shown


def test_the_docs_have_runnable_examples() -> None:
    """A broken parser must not pass by finding nothing: these examples exist."""
    names = {ex.name for ex in examples()}
    for expected in ("README.md::readme-first", "README.md::readme-suite", "README.md::readme-plain",
                     "docs/scorers.md::scorer-guide", "docs/configuration.md::config-all"):
        assert expected in names


def test_every_suite_and_config_block_is_run_or_marked_as_a_fragment() -> None:
    loose = [b.where for b in all_blocks() if b.lang == "toml"
             and ("[[prompts]]" in b.text or "[tool.llmbench" in b.text)
             and not ({"file", "run", "example", "norun"} & set(b.attrs))]
    assert loose == [], "tag these blocks (file=...) or mark them <!-- docs-test: norun -->"


# --- links and names ---------------------------------------------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    in_fence = False
    anchors = set()
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


def _prose(doc: Path) -> str:
    """The text outside fenced blocks (links in code are not links)."""
    out, in_fence = [], False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence:
            out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_resolve(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(_prose(doc)):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with anchor #{anchor} in {file.name}")
    assert broken == []


def _hooks() -> set[str]:
    from pytest_llmbench import hookspecs

    return {name for name in dir(hookspecs) if name.startswith("pytest_llmbench_")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_hook_names_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    hooks = _hooks()
    unknown = sorted(set(re.findall(r"\bpytest_llmbench_\w+", text)) - hooks)
    assert unknown == [], f"not hooks of hookspecs.py: {unknown}"
    unprefixed = sorted({m for m in re.findall(r"(?<![\w])llmbench_\w+", text)
                         if f"pytest_{m}" in hooks})
    assert unprefixed == [], f"hook names need the pytest_ prefix: {unprefixed}"


@pytest.fixture(scope="module")
def registered() -> tuple[set[str], set[str]]:
    """The ``--llmbench-*`` options and ``llmbench_*`` ini keys, from ``pytest --help``."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    options = set(re.findall(r"^\s+(--llmbench-[a-z-]+)", done.stdout, re.MULTILINE))
    inis = set(re.findall(r"^\s+(llmbench_\w+) \(", done.stdout, re.MULTILINE))
    assert options and inis, done.stdout[-2000:]
    return options, inis


def test_every_option_and_ini_twin_is_documented(registered: tuple[set[str], set[str]]) -> None:
    options, inis = registered
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert sorted(o for o in options if f"`{o}" not in text) == []
    assert sorted(i for i in inis if f"`{i}`" not in text) == []
    # an option without an ini twin of the same name
    assert sorted(o for o in options
                  if o[2:].replace("-", "_") not in inis and o != "--llmbench-model") == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_options_mentioned_exist(doc: Path, registered: tuple[set[str], set[str]]) -> None:
    options, _inis = registered
    mentioned = set(re.findall(r"--llmbench-[a-z-]*[a-z]", doc.read_text(encoding="utf-8")))
    assert sorted(mentioned - options) == []


def _allowed_keys(message: str) -> set[str]:
    match = re.search(r"allowed: (.*)$", message)
    assert match, message
    return set(re.findall(r"[a-z_]+", match.group(1)))


def test_every_config_key_is_documented(pytester: pytest.Pytester) -> None:
    from pytest_llmbench.config import DEADLINE_SOURCES, SIM_KEYS, parse_model_table
    from pytest_llmbench.errors import ConfigError

    pytester.makefile(".toml", llmbench="bogus_key = 1\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    line = next(line for line in result.stderr.lines if "bogus_key" in line)
    top = _allowed_keys(line)
    with pytest.raises(ConfigError) as info:
        parse_model_table("m", {"bogus_key": 1}, "here")
    model = _allowed_keys(str(info.value))
    assert {"models", "store", "sim", "resources"} <= top and {"headers", "base_url"} <= model
    text = CONFIG_DOC.read_text(encoding="utf-8")
    for keys in (top, model, set(DEADLINE_SOURCES), set(SIM_KEYS)):
        assert sorted(k for k in keys if f"| `{k}` |" not in text) == []


def test_every_environment_variable_is_documented() -> None:
    names = set()
    for path in (REPO / "pytest_llmbench").rglob("*.py"):
        names |= set(re.findall(r"[\"']((?:LLMBENCH|OPENAI|TASK|RESOURCE)_[A-Z0-9_]+)[\"']",
                                path.read_text(encoding="utf-8")))
    assert "OPENAI_TIMEOUT" in names and "LLMBENCH_SIM_URL" in names
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert sorted(n for n in names if f"`{n}`" not in text) == []


def test_every_builtin_scorer_option_is_documented_under_its_scorer() -> None:
    from pytest_llmbench.scoring.builtin import _BUILTINS

    text = SCORERS_DOC.read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### `(\w+)`\n(.*?)(?=^#|\Z)", text, re.MULTILINE | re.DOTALL))
    missing = [f"{name}.{option}" for name, builtin in _BUILTINS.items()
               for option in builtin.options
               if f"| `{option}` |" not in sections.get(name, "")]
    assert set(_BUILTINS) <= set(sections) and missing == []
