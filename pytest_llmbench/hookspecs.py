"""Hooks that conftest files and other plugins can implement to extend pytest-llmbench.

The plugin registers this module in ``pytest_addhooks`` with
``pluginmanager.add_hookspecs(hookspecs)``. As in pytest-xdist's ``newhooks.py``, the marker's
project name is ``"pytest"`` and every hook name starts with ``pytest_``: pytest's plugin
manager ignores any conftest/plugin function whose name lacks that prefix, even one marked
with ``@pytest.hookimpl`` (``PytestPluginManager.parse_hookimpl_opts``), so an unprefixed
``llmbench_*`` hook could never be implemented. Implementations are plain functions named
after the hook, validated by pytest like any ``pytest_*`` hook: a misspelt argument name
fails at registration. Where pytest-llmbench may not be installed, mark implementations
``@pytest.hookimpl(optionalhook=True)`` (pytest rejects unknown ``pytest_*`` hooks).

Implementations may accept any subset of the argument names below (pluggy passes by
name), so arguments can be added later without breaking them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytest

    from pytest_llmbench.providers.base import Provider
    from pytest_llmbench.records import ItemResult, ModelSpec, Score, ScoreRequest
    from pytest_llmbench.report.exporters import Exporter
    from pytest_llmbench.store.protocol import ResultStore

hookspec = pluggy.HookspecMarker("pytest")


@hookspec(firstresult=True)
def pytest_llmbench_get_scorer(name: str) -> Callable[[ScoreRequest], Score] | None:
    """Return the scorer callable for the scorer ``name``, or ``None`` to pass.

    Called before the built-in scorers are looked up, so an implementation can add new
    scorer names or override a built-in one (the first non-``None`` result wins). The
    callable receives a :class:`~pytest_llmbench.records.ScoreRequest` and returns a
    :class:`~pytest_llmbench.records.Score` (a bare ``float``, ``int`` or ``bool`` in [0, 1]
    is accepted too). It runs in the item's own process, under the item's task deadline.

    Because the suite loader asks this hook at collection time, an implementation should be
    cheap and side-effect free: return the callable, do the work when it is called.
    """


@hookspec
def pytest_llmbench_result(result: ItemResult, nodeid: str, item: pytest.Item | None) -> None:
    """Called exactly once per reported item, on the process that reports it: the xdist
    controller under ``-n W`` (never in a worker), the pytest process in a plain run.

    ``result`` is the :class:`~pytest_llmbench.records.ItemResult` as stored (``cached``
    is true when it came from the result store rather than a run now); it reached the
    controller inside the item's report. A plain test that used the ``llm`` fixture has a
    result too (``identity["kind"] == "test"``, suite = its module). ``nodeid`` is the
    item's node id; ``item`` is the pytest item in a plain run and ``None`` on the xdist
    controller (which has no items). Called when pytest logs the report that carries the
    result (the setup report of a suite item, the teardown report of a plain test). Do not
    mutate ``result``: it has been written to the store, so changes would not persist.
    For an export, implement ``pytest_llmbench_exporters`` instead.
    """


@hookspec
def pytest_llmbench_exporters(config: pytest.Config) -> list[Exporter] | None:
    """Return exporters for this run (a list, possibly empty), or ``None``.

    Every implementation is called (not first-result) and the lists are joined; the
    plugin's own implementation returns its JSONL and HTML exporters when
    ``--llmbench-jsonl`` / ``--llmbench-html`` are set. Called once, on the reporting
    process only (the xdist controller under ``-n W``), before the first result. Each
    exporter follows :class:`~pytest_llmbench.report.exporters.Exporter`: ``start(run)``
    once, ``add(result)`` once per reported item, ``finish(end)`` once at the end of the
    session (its returned line, if any, is printed in the terminal summary).
    """


@hookspec
def pytest_llmbench_modify_request(body: dict[str, Any], model: ModelSpec) -> None:
    """Edit the outgoing chat-completion JSON ``body`` in place before it is sent.

    Called for every request to ``model`` (a :class:`~pytest_llmbench.records.ModelSpec`),
    on every attempt, with the body the model's provider will send, in the process that
    sends it (the item's process, or pytest's for the ``llm`` fixture). Every
    implementation is called (not first-result); each mutates ``body`` (e.g. to add a
    vendor-specific field). The return value is ignored.

    The item's process has no plugin manager: the implementing *functions* are handed to it
    with the item's job (pickled by reference), so an implementation must be a module-level
    function of an importable module or conftest, and must not rely on state set up in the
    pytest process at run time. Keep edits deterministic: a result reported from the store
    was produced by the body as it was edited then.
    """


@hookspec(firstresult=True)
def pytest_llmbench_get_provider(model: ModelSpec) -> Provider | None:
    """Return the :class:`~pytest_llmbench.providers.base.Provider` that reaches ``model``,
    or ``None`` to pass.

    Asked once per model in the pytest process (controller and each xdist worker); the
    first non-``None`` answer wins, and when none answers the plugin's own
    OpenAI-compatible provider (the ``openai`` SDK) is used, as pytest-xdist does for its
    schedulers. The provider object is pickled into each item's job, so it must be an
    instance of a module-level class of an importable module (or conftest); create clients
    lazily in its methods, which run in the item's process. See docs/providers.md.
    """


@hookspec(firstresult=True)
def pytest_llmbench_get_store(config: pytest.Config) -> ResultStore | None:
    """Return the result store of this run, or ``None`` for the default file store.

    The returned object implements :class:`~pytest_llmbench.store.protocol.ResultStore`
    (lookups, claims, writes, runs; no file paths). It is asked once per pytest process,
    the xdist controller and every worker, so each must reach the same data; item
    processes open it again through its ``ref()``. The first non-``None`` result wins; the
    plugin's own implementation (``trylast``) opens the file store at
    ``--llmbench-store``.
    """
