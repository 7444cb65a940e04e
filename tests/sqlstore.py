"""A minimal third-party ``ResultStore``: one SQLite file (WAL), for the seam's tests.

Not part of the plugin: it shows what a backend implements (``store/protocol.py``) and is
chosen by a conftest's ``pytest_llmbench_get_store``. SQLite's own locking (``BEGIN
IMMEDIATE``) makes claims atomic across the xdist workers and item processes; a connection
is opened per process (a connection must not cross a fork).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pytest_llmbench.records import ERROR, ItemResult
from pytest_llmbench.store.claims import ClaimHolder, ClaimResult
from pytest_llmbench.store.runs import RunManifest, manifest_from_dict

SCHEMA = """
CREATE TABLE IF NOT EXISTS results(key TEXT PRIMARY KEY, rk TEXT, body TEXT, stored REAL);
CREATE INDEX IF NOT EXISTS results_rk ON results(rk, stored);
CREATE TABLE IF NOT EXISTS claims(key TEXT PRIMARY KEY, holder TEXT);
CREATE TABLE IF NOT EXISTS runs(id TEXT PRIMARY KEY, started REAL, body TEXT);
"""


@dataclass(frozen=True)
class SqliteRef:
    path: str

    def open(self) -> SqliteStore:
        return SqliteStore(self.path)


class SqliteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        self._pid = -1
        self._conn: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._pid != os.getpid() or self._conn is None:
            # check_same_thread off: an xdist worker prefetches on a thread, then hands the
            # engine (and its store) to the main thread; never two threads at once.
            self._conn = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(SCHEMA)
            self._pid = os.getpid()
        return self._conn

    def ref(self) -> SqliteRef:
        return SqliteRef(self.path)

    # -- lookups ------------------------------------------------------------------------

    @staticmethod
    def _decode(body: str) -> ItemResult:
        return ItemResult.from_dict(json.loads(body))

    def get(self, key: str) -> ItemResult | None:
        row = self.db.execute("SELECT body FROM results WHERE key = ?", (key,)).fetchone()
        return self._decode(row[0]) if row else None

    def lookup_many(self, keys: Iterable[str]) -> dict[str, ItemResult]:
        found = {}
        for key in keys:
            result = self.get(key)
            if result is not None:
                found[key] = result
        return found

    def has_result(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    def seen_since(self, key: str, since: float) -> bool:
        if self.db.execute("SELECT 1 FROM claims WHERE key = ?", (key,)).fetchone():
            return True
        row = self.db.execute("SELECT stored FROM results WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0] >= since)

    def answer_for(self, request_key: str) -> ItemResult | None:
        rows = self.db.execute(
            "SELECT body FROM results WHERE rk = ? ORDER BY stored DESC", (request_key,))
        for (body,) in rows:
            result = self._decode(body)
            if result.answer is not None and result.completions:
                return result
        return None

    def results(self, *, on_corrupt: Callable[[str, str], None] | None = None) -> Iterator[ItemResult]:
        for (body,) in self.db.execute("SELECT body FROM results ORDER BY key").fetchall():
            yield self._decode(body)

    # -- writes and claims --------------------------------------------------------------

    def _holder(self, key: str) -> ClaimHolder | None:
        row = self.db.execute("SELECT holder FROM claims WHERE key = ?", (key,)).fetchone()
        return ClaimHolder.from_dict(json.loads(row[0])) if row else None

    def _set_claim(self, key: str, holder: ClaimHolder) -> None:
        self.db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?)", (key, json.dumps(holder.to_dict())))

    def put(self, result: ItemResult, *, holder: ClaimHolder | None = None) -> None:
        owners = [holder] if holder is not None else [
            ClaimHolder.current(run_id="", deadline=0.0, pid=pid) for pid in (os.getpid(), os.getppid())]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            current = self._holder(result.key)
            ours = current is not None and any(current.same_process(o) for o in owners)
            stored = self.get(result.key)
            if result.status == ERROR and not ours and stored is not None and stored.status != ERROR:
                return  # a late error never replaces a finished result
            db.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?)",
                       (result.key, result.identity.get("request_key"),
                        json.dumps(result.to_dict()), time.time()))
            if ours:
                db.execute("DELETE FROM claims WHERE key = ?", (result.key,))
        finally:
            db.execute("COMMIT")

    def claim(self, key: str, *, holder: ClaimHolder, force: bool = False,
              fresh_run_id: str | None = None, run_id: str | None = None) -> ClaimResult:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            return self._claim(key, holder, force, fresh_run_id, run_id)
        finally:
            db.execute("COMMIT")

    def _claim(self, key: str, holder: ClaimHolder, force: bool, fresh_run_id: str | None,
               run_id: str | None) -> ClaimResult:
        result = self.get(key)
        produced_by = result.identity.get("run_id") if result is not None else None
        if result is not None and (
            (run_id is not None and produced_by == run_id)
            or (result.status != ERROR and (fresh_run_id is None or produced_by == fresh_run_id))
        ):
            return ClaimResult(kind="done", result=result)
        current = self._holder(key)
        if current is None or current.same_process(holder):
            self._set_claim(key, holder)
            return ClaimResult(kind="claimed")
        past_deadline = time.time() > current.deadline
        if force or not current.is_alive() or (not current.is_local() and past_deadline):
            self._set_claim(key, holder)
            return ClaimResult(kind="claimed", took_over=current)
        return ClaimResult(kind="overdue" if past_deadline else "busy", holder=current)

    def claim_holder(self, key: str) -> ClaimHolder | None:
        return self._holder(key)

    def release(self, key: str, holder: ClaimHolder) -> bool:
        current = self._holder(key)
        if current is None or not current.same_process(holder):
            return False
        self.db.execute("DELETE FROM claims WHERE key = ?", (key,))
        return True

    # -- runs ---------------------------------------------------------------------------

    def put_run(self, manifest: RunManifest) -> None:
        self.db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)",
                        (manifest.run_id, manifest.started_at, json.dumps(manifest.to_dict())))

    def runs(self) -> list[RunManifest]:
        rows = self.db.execute("SELECT body FROM runs ORDER BY started, id").fetchall()
        return [manifest_from_dict(json.loads(body)) for (body,) in rows]

    def get_run(self, run_id: str) -> RunManifest | None:
        row = self.db.execute("SELECT body FROM runs WHERE id = ?", (run_id,)).fetchone()
        return manifest_from_dict(json.loads(row[0])) if row else None


def counts(path: str) -> dict[str, Any]:
    db = sqlite3.connect(path)
    try:
        return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
                for table in ("results", "claims", "runs")}
    finally:
        db.close()
