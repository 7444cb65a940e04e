"""Where the store was: a new store where a previous run of the same suites used another one.

The store's default place is ``.llmbench`` in the rootdir, and pytest's rootdir follows the
directory pytest is started from when no ini file pins it: the same suites run from another
directory would silently start an empty store, and every item would be bought again. So the
place of each run's store is remembered per set of suites (the run's path arguments,
absolute and sorted) in a small per-user state file, ``stores.json`` in
``$XDG_CACHE_HOME/pytest-llmbench`` (default ``~/.cache/pytest-llmbench``), and the header
says so when a run is about to create a store while the last run of the same suites used
another one that still exists. Nothing is moved or refused: the line names both places and
how to pin one (``--llmbench-store``, ``llmbench_store``, ``[tool.llmbench] store``).

The state file is rewritten atomically under a ``filelock.FileLock``; it keeps the newest
``MAX_ENTRIES`` suite sets. An unreadable state file is ignored (it is a convenience, never
a reason to stop a run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("pytest_llmbench.storeplace")

__all__ = ["MAX_ENTRIES", "StorePlaces", "moved_store_warning", "suites_key"]

MAX_ENTRIES = 500
_STATE = "stores.json"


def suites_key(args: Sequence[str], invocation_dir: Path) -> str:
    """The run's path arguments (node ids cut at ``::``), absolute, sorted, hashed."""
    paths = sorted({
        os.path.normpath(invocation_dir / arg.split("::", 1)[0])
        for arg in args if not arg.startswith("-")
    })
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:32]


class StorePlaces:
    """The per-user record of which store each set of suites used last."""

    def __init__(self, root: Path) -> None:
        self.path = root / _STATE

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def previous(self, key: str) -> Path | None:
        """The store the last run of these suites used, if it is recorded."""
        entry = self._read().get(key)
        where = entry.get("store") if isinstance(entry, dict) else None
        return Path(where) if isinstance(where, str) else None

    def remember(self, key: str, store_dir: Path) -> None:
        """Record ``store_dir`` as the store of these suites (best effort)."""
        from filelock import FileLock

        from pytest_llmbench.coord.atomic import atomic_write

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=5):
                data = self._read()
                data.pop(key, None)
                data[key] = {"store": str(store_dir), "t": round(time.time())}
                while len(data) > MAX_ENTRIES:  # dicts keep insertion order: oldest first
                    data.pop(next(iter(data)))
                atomic_write(self.path, json.dumps(data).encode("utf-8"))
        except (OSError, TimeoutError) as exc:
            log.debug("could not record the store's place in %s: %s", self.path, exc)


def moved_store_warning(places: StorePlaces, key: str, store_dir: Path) -> str | None:
    """The header line when ``store_dir`` is new and these suites used another store."""
    if (store_dir / "store.json").exists():
        return None
    before = places.previous(key)
    if before is None or before == store_dir or not (before / "store.json").exists():
        return None
    return (f"llmbench WARNING: a new result store will be created at {store_dir}, but the "
            f"last run of these suites used {before} (rootdir or store setting changed); to "
            f"reuse its results pass --llmbench-store {before} (or set llmbench_store / "
            "[tool.llmbench] store)")
