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

    from pytest_llmbench.records import ItemResult, ModelSpec, Score, ScoreRequest
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
def pytest_llmbench_result(result: ItemResult, item: pytest.Item) -> None:
    """Called once an item's result is known, before pytest reports the item.

    ``result`` is the :class:`~pytest_llmbench.records.ItemResult` as stored (``cached``
    is true when it came from the result store rather than a run now); ``item`` is the
    pytest item. Use it for live dashboards or extra exports; do not mutate ``result``:
    it has already been written to the store, so changes would not persist.
    """


@hookspec
def pytest_llmbench_modify_request(body: dict[str, Any], model: ModelSpec) -> None:
    """Edit the outgoing chat-completion JSON ``body`` in place before it is sent.

    Called for every request to ``model`` (a :class:`~pytest_llmbench.records.ModelSpec`),
    on every attempt, in the item's process. Every implementation is called (not
    first-result); each mutates ``body`` (e.g. to add a vendor-specific field). The return
    value is ignored. Keep edits deterministic: a result reported from the store was
    produced by the body as it was edited then.
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
