"""pytest collection nodes: a suite file and one item per prompt x instance x model x repeat."""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from pytest_llmbench.errors import LLMBenchError, SuiteError
from pytest_llmbench.records import ERROR, FAILED, Case, ItemResult, ModelSpec, ScorerSpec

if TYPE_CHECKING:
    from pytest_llmbench.collect.suite import Suite
    from pytest_llmbench.config import Settings

NOT_SUITES = frozenset({"pyproject.toml", "llmbench.toml"})
DEFAULT_SUITE_FILES = ("*.toml",)
#: Top-level keys that make a parsed ``.toml`` file a suite (any letter case; ``prompt`` so
#: that a misspelt suite is reported by the schema instead of skipped).
SUITE_TOP_KEYS = frozenset({"prompts", "prompt", "suite"})
#: What a file that does not parse must mention to be reported rather than ignored.
SUITE_HINT_RE = re.compile(rb"prompts?|\[\s*suite\s*\]", re.IGNORECASE)


@dataclass(frozen=True)
class SuiteSource:
    """A file collection decided is a suite: its parsed text, or why it cannot be read."""

    parsed: tuple[str, dict[str, Any]] | None
    error: SuiteError | None = None


def suite_patterns(config: pytest.Config) -> Sequence[str]:
    """The file name patterns a suite may have (ini ``llmbench_suite_files``)."""
    patterns: Sequence[str] = config.getini("llmbench_suite_files") or DEFAULT_SUITE_FILES
    return patterns


def _named_like_suite(path: Path, patterns: Sequence[str]) -> bool:
    return (path.suffix == ".toml" and path.name not in NOT_SUITES
            and any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns))


def suite_source(path: Path, rootdir: Path, patterns: Sequence[str],
                 likely_suite: Callable[[], object] | None = None) -> SuiteSource | None:
    """Is ``path`` a suite? Parsed once here; ``None`` for any other file.

    A ``.toml`` file whose name matches ``patterns`` (ini ``llmbench_suite_files``) is a
    suite when its top level has a ``prompts`` or ``suite`` key, however the TOML spells it
    (``[[prompts]]``, ``[[ prompts ]]``, ``prompts = [...]``). One that does not parse is a
    collection error when it mentions prompts or a ``[suite]`` table: a broken suite is never
    skipped in silence. ``pyproject.toml`` and ``llmbench.toml`` are never suites.
    ``likely_suite()`` is called before the parse when the file's bytes mention prompts or
    a ``[suite]`` table (the fork server then starts beside the parse: a 2000-instance suite
    takes ~0.3 s to parse, which the first item used to wait for on top of its warm-up).
    """
    if not _named_like_suite(path, patterns):
        return None
    from pytest_llmbench.collect.tomlcheck import MAX_FILE_BYTES, display_path, read_toml

    raw = None
    if likely_suite is not None:
        with contextlib.suppress(OSError):  # (read_toml reports an unreadable file)
            if path.stat().st_size <= MAX_FILE_BYTES:
                raw = path.read_bytes()  # read once: the parse below takes these bytes
                if SUITE_HINT_RE.search(raw):
                    likely_suite()
    try:
        parsed = read_toml(path, display_path(path, rootdir), raw)
    except SuiteError as exc:
        try:
            head = raw if raw is not None else path.read_bytes()
        except OSError:
            return SuiteSource(None, exc)
        return SuiteSource(None, exc) if SUITE_HINT_RE.search(head) else None
    if not {key.lower() for key in parsed[1]} & SUITE_TOP_KEYS:
        return None
    return SuiteSource(parsed)


#: Bytes of a file named on the command line read at configure time for the hint: a suite
#: names its prompts or its ``[suite]`` table near the top. One that does not is still
#: found at collection (its server then starts there); the collection reads it whole.
_HINT_HEAD = 1 << 16


def names_likely_suite(args: Sequence[str], invocation_dir: Path, patterns: Sequence[str]) -> bool:
    """Whether a command-line argument is a file named like a suite whose head mentions
    prompts or a ``[suite]`` table (``suite_source``'s checks, the parse left to the
    collection): the fork server can then start at configure time, before pytest's session
    start and collection."""
    for arg in args:
        path = invocation_dir / arg.split("::", 1)[0]
        if not _named_like_suite(path, patterns):
            continue
        with contextlib.suppress(OSError), path.open("rb") as fh:
            if SUITE_HINT_RE.search(fh.read(_HINT_HEAD)):
                return True
    return False


class SuiteFile(pytest.File):
    """One TOML suite; a schema violation is one collection error for this file only."""

    source: SuiteSource | None = None
    """Set by the collection hook: the file parsed once (or why it could not be)."""

    def collect(self) -> Iterator[LLMItem]:
        from pytest_llmbench.collect.suite import load_suite

        session = _session(self.config)
        session.warm()  # the fork server starts beside the parsing
        source = self.source or SuiteSource(None)
        try:
            if source.error is not None:
                raise source.error
            suite = load_suite(
                self.path,
                rootdir=self.config.rootpath,
                scorer_check=session.check_scorer,
                expected_check=session.check_expected,
                parsed=source.parsed,
            )
        except SuiteError as exc:
            raise self.CollectError(str(exc)) from None
        except LLMBenchError as exc:
            raise self.CollectError(f"{self.path}: {exc}") from None
        session.check_suite_hierarchy(suite)
        for tag in suite.tags:
            session.register_marker(tag)
        for case in suite.cases:
            for tag in case.tags:
                session.register_marker(tag)
            for model in session.settings.models:
                for repeat in range(case.repeats):
                    name = f"{case.prompt_id}[{case.instance_id}-{model.name}"
                    name += f"-r{repeat}]" if case.repeats > 1 else "]"
                    item = LLMItem.from_parent(
                        self, name=name, case=case, model=model, repeat=repeat
                    )
                    for tag in case.tags:
                        item.add_marker(tag)
                    yield item


class LLMItem(pytest.Item):
    """One model call chain, scored. The work happens in a child process (engine)."""

    def __init__(self, *, case: Case, model: ModelSpec, repeat: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.model = model
        self.repeat = repeat
        self.result: ItemResult | None = None

    @cached_property
    def key(self) -> str:
        return _session(self.config).key_for(self)

    @property
    def identity(self) -> dict[str, Any]:
        return {
            "suite": self.case.suite_name,
            "suite_path": self.case.suite_path,
            "prompt": self.case.prompt_id,
            "instance": self.case.instance_id,
            "model": self.model.name,
            "repeat": self.repeat,
            "nodeid": self.nodeid,
        }

    def setup(self) -> None:
        session = _session(self.config)
        result = session.result_for(self)
        self.result = result
        for name, value in session.properties(result):
            self.user_properties.append((name, value))
        if result.status == ERROR:
            pytest.fail(session.describe(self, result), pytrace=False)

    def runtest(self) -> None:
        assert self.result is not None
        if self.result.status == FAILED:
            pytest.fail(_session(self.config).describe(self, self.result), pytrace=False)

    def teardown(self) -> None:
        # Reported: let the result go. Items live for the whole session, and each kept its
        # parsed record (~4.6 KB: a cached re-run of 100,000 items held ~460 MB of them).
        self.result = None

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, (self.case.line - 1 if self.case.line else None), self.name


class ItemServices(Protocol):
    """What collection and items need from the run (``session.run.LLMBenchSession``).

    Declared here, on the consuming side, so ``collect`` never imports ``session``: the
    session registers itself under ``SERVICES_KEY`` at configure time."""

    settings: Settings

    def warm(self) -> None: ...
    def check_scorer(self, spec: ScorerSpec) -> None: ...
    def check_expected(self, spec: ScorerSpec, expected: Any) -> None: ...
    def register_marker(self, tag: str) -> None: ...
    def check_suite_hierarchy(self, suite: Suite) -> None: ...
    def key_for(self, item: LLMItem) -> str: ...
    def result_for(self, item: LLMItem) -> ItemResult: ...
    def properties(self, result: ItemResult) -> list[tuple[str, object]]: ...
    def describe(self, item: LLMItem, result: ItemResult) -> str: ...


SERVICES_KEY = pytest.StashKey[ItemServices]()


def _session(config: pytest.Config) -> ItemServices:
    return config.stash[SERVICES_KEY]


__all__ = ["SERVICES_KEY", "ItemServices", "LLMItem", "SuiteFile", "SuiteSource", "suite_source"]
