"""The ``ResultStore`` seam: what the engine, the item processes and the session need from a
result store, and nothing about files.

The plugin's own backend is the file store (``filestore.Store``); another backend (a
database, a server) implements these methods and is chosen by implementing the
``pytest_llmbench_get_store(config)`` hook (``firstresult``, as pytest-xdist chooses its
scheduler). ``tests/test_store_seam.py`` holds a minimal SQLite backend that passes the
plugin's runs, plain and under ``-n 2``.

What a backend must guarantee (the engine relies on it):

- ``put`` is atomic: a reader sees the old result or the new one, never a part.
- ``claim`` is atomic across every process that uses the store (xdist workers, concurrent
  runs): for one key at most one holder is ``claimed`` at a time. A stored non-error result
  answers ``done``; see ``Store.claim`` for ``fresh_run_id``, ``run_id`` and ``force``.
- An ``error`` result from a process that no longer holds the item's claim never replaces a
  finished result.
- It is used by one thread at a time, but not always the same one: an xdist worker's
  engine starts items on a prefetch thread, then hands over to the main thread. A store
  that may be called from several threads at once says so with a class attribute
  ``threadsafe = True``: the threads of an item host that runs several items at once then
  call it without taking turns (``engine/child.py``).
- ``ref()`` returns a picklable, hashable object whose ``open()`` gives a store working on
  the same data in another process (the item hosts, forked from the fork server, write
  their results through it).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Protocol, runtime_checkable

from pytest_llmbench.records import ItemResult
from pytest_llmbench.store.claims import ClaimHolder, ClaimResult
from pytest_llmbench.store.runs import RunManifest

__all__ = ["ResultStore", "StoreRef"]


@runtime_checkable
class StoreRef(Hashable, Protocol):
    """A picklable, hashable name of a store, opened again in an item process."""

    def open(self) -> ResultStore: ...


@runtime_checkable
class ResultStore(Protocol):
    """Lookups, claims, writes and runs of one result store."""

    # -- lookups ---------------------------------------------------------------------------

    def get(self, key: str) -> ItemResult | None:
        """The stored result of ``key``, ``None`` if none (or unusable: never raise for
        bad data, the item then runs again)."""

    def lookup_many(self, keys: Iterable[str]) -> dict[str, ItemResult]:
        """Every stored result among ``keys`` (the resume and summary fast path)."""

    def has_result(self, key: str) -> bool:
        """Whether some result of ``key`` is stored (cheap; need not parse it)."""

    def seen_since(self, key: str, since: float) -> bool:
        """Whether ``key`` is claimed now by a holder that may still finish it (not a dead
        run's leftover claim), or has a result stored at or after ``since`` (Unix time).
        Asked for every item of the lookahead: keep it to a couple of syscalls or a
        dictionary lookup."""

    def answer_for(self, request_key: str) -> ItemResult | None:
        """The newest stored result with a whole answer to this request (``identity
        ["request_key"]``), whichever scorer judged it; ``None`` if none."""

    def results(
        self, *, on_corrupt: Callable[[str, str], None] | None = None
    ) -> Iterator[ItemResult]:
        """Every valid stored result; ``on_corrupt(location, reason)`` hears of bad ones."""

    # -- writes and claims -----------------------------------------------------------------

    def put(self, result: ItemResult, *, holder: ClaimHolder | None = None) -> object:
        """Store ``result`` atomically and drop the claim on its item if ``holder``'s
        (default: this process's or its parent's). The return value is the backend's."""

    def claim(
        self,
        key: str,
        *,
        holder: ClaimHolder,
        force: bool = False,
        fresh_run_id: str | None = None,
        run_id: str | None = None,
    ) -> ClaimResult:
        """Try to become the one process that runs ``key`` (see ``Store.claim``)."""

    def claim_holder(self, key: str) -> ClaimHolder | None:
        """The current holder of ``key``'s claim, if any."""

    def release(self, key: str, holder: ClaimHolder) -> bool:
        """Drop ``holder``'s claim on ``key``; whether there was one."""

    def ref(self) -> StoreRef:
        """How an item process opens this store again."""

    # -- runs ------------------------------------------------------------------------------

    def put_run(self, manifest: RunManifest) -> None:
        """Write or replace the manifest of ``manifest.run_id``."""

    def runs(self) -> list[RunManifest]:
        """Every run, oldest first."""

    def get_run(self, run_id: str) -> RunManifest | None:
        """One run's manifest, ``None`` if unknown."""
