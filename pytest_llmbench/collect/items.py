"""pytest collection nodes: a suite file and one item per prompt x instance x model x repeat."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_llmbench.errors import LLMBenchError, SuiteError
from pytest_llmbench.records import ERROR, FAILED, Case, ItemResult, ModelSpec

if TYPE_CHECKING:
    from pytest_llmbench.session.run import LLMBenchSession

SUITE_MARKER = b"[[prompts]]"
NOT_SUITES = frozenset({"pyproject.toml", "llmbench.toml"})


def looks_like_suite(path: Path) -> bool:
    """A ``.toml`` file is a suite when it has ``[[prompts]]`` tables; others are ignored."""
    if path.suffix != ".toml" or path.name in NOT_SUITES:
        return False
    try:
        with path.open("rb") as fh:
            return SUITE_MARKER in fh.read()
    except OSError:
        return False


class SuiteFile(pytest.File):
    """One TOML suite; a schema violation is one collection error for this file only."""

    def collect(self) -> Iterator[LLMItem]:
        from pytest_llmbench.collect.suite import load_suite

        session = _session(self.config)
        session.warm()  # the fork server starts beside the parsing
        try:
            suite = load_suite(
                self.path,
                rootdir=self.config.rootpath,
                scorer_check=session.check_scorer,
                expected_check=session.check_expected,
            )
        except SuiteError as exc:
            raise self.CollectError(str(exc)) from None
        except LLMBenchError as exc:
            raise self.CollectError(f"{self.path}: {exc}") from None
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


def _session(config: pytest.Config) -> LLMBenchSession:
    from pytest_llmbench.session.run import SESSION_KEY

    return config.stash[SESSION_KEY]


__all__ = ["LLMItem", "SuiteFile", "looks_like_suite"]
