"""The crash-safe per-item result store, and the claims that make execution exactly-once.

Keys and the record format are in ``store_records.py``, claim holders in ``claims.py``, the
per-shard index in ``store_index.py``; this module does the files and the locking.

Layout under the store root (see ``docs/store.md``)::

    store.json                     {"format": 1, "created": "..."}: written once, checked on open
    results/<key[:2]>/<key>.json   one ItemResult per item, with "_v": 1
    results/<key[:2]>/.index       a cache of the shard's records for fast resume (derived)
    claims/<key[:2]>/<key>.claim   who is running the item right now (a ClaimHolder)
    locks/<key[:2]>.lock           one flock per shard (coord/flock.py: a descriptor kept open)

Why it is shaped this way:

- A result is written to a temp file in its final directory, fsynced, then ``os.replace``-d
  over the final name: a ``kill -9`` at any instant leaves the final file absent or whole,
  so readers never need the lock. The claim holder's own ``put`` uses the claim file as
  that temp file (``_put_through_claim``): one new file per item, none deleted.
- Writers and claimers of one shard serialise on its flock, which the kernel drops when the
  holder dies; nothing has to clean a lock up after a crash.
- Resuming 10^5 items must take seconds, and JSON-parsing 10^5 files does not: each shard
  keeps an index of its records in marshal format, checked against every file's inode, size
  and mtime, so the JSON files stay the only truth (see "The index" below).
- Bad data is never fatal: a torn, empty, hand-edited or misplaced result file is logged with
  its path and reason, moved aside to ``*.corrupt``, and the item simply runs again.
- The claim of an item names a process (pid + start time, so a reused pid is not mistaken
  for the holder). A claim whose process is gone is stale and taken over; a live holder past
  its deadline is reported ``overdue`` so the engine can kill it and ``force`` the claim.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.coord.atomic import atomic_write, temp_name, write_new
from pytest_llmbench.coord.flock import KeptFlock, LockTimeout
from pytest_llmbench.errors import StoreError
from pytest_llmbench.records import ERROR, ItemResult
from pytest_llmbench.store.claims import ClaimHolder, ClaimKind, ClaimResult
from pytest_llmbench.store.format import (
    _KEY_RE,
    FORMAT_VERSION,
    KEY_VERSION,
    _check_key,
    _encode_result,
    _json_default,
    _parse_result,
    item_key,
)
from pytest_llmbench.store.index import (
    _INDEX,
    _PLAIN_RESULT,
    _RECORD_FIELDS,
    IndexEntry,
    _append_index,
    _index_entry,
    _index_frame,
    _load_index,
    _read_file,
    _shared,
)
from pytest_llmbench.store.runs import RunManifest, check_run_id, manifest_from_dict

log = logging.getLogger("pytest_llmbench.store.filestore")

__all__ = [
    "FORMAT_VERSION",
    "KEY_VERSION",
    "ClaimHolder",
    "ClaimKind",
    "ClaimResult",
    "FileStoreRef",
    "Store",
    "item_key",
]

LOCK_TIMEOUT = 120.0
"""Seconds to wait for a shard lock; the lock is held for microseconds, so this only fires
when a holder is frozen (SIGSTOP) or the file system does not honour flock."""

_LOCK_POLL = 0.002
#: What a store directory may hold; ``leases`` is the lease pools' (coord/lease.py), which a
#: concurrent run may create before this run opens the store.
_OWN_NAMES = frozenset({"store.json", "results", "claims", "locks", "answers", "runs", "leases"})


# --- file helpers and the per-shard index ---------------------------------------------------


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sweep_temp_files(folder: str, names: Iterable[str]) -> None:
    """Remove the temp files (``.KEY.PID.RAND.tmp``) of writers that died mid-write (kill
    -9 between the write and the rename); a live writer's are left alone. Readers never
    look at them, this only gives the space back."""
    for name in names:
        if name[0] != "." or not name.endswith(".tmp"):
            continue
        parts = name.split(".")
        try:
            pid = int(parts[2])
        except (IndexError, ValueError):
            continue
        if pid > 0 and not proc.pid_alive(pid):
            _unlink_quiet(f"{folder}/{name}")
            log.debug("removed %s/%s, left by dead writer %d", folder, name, pid)


def _unlink_quiet(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Building 10^5 records with nested containers triggers a cyclic GC pass every few
    hundred objects (up to 40 % of lookup time, measured); none of them is garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Gone:
    """Type of ``_GONE``, the scan helpers' "no record this way" (file gone, entry stale)."""


_GONE = _Gone()


def _from_entry(path: str, entry: IndexEntry) -> ItemResult | _Gone:
    """The record of an index entry if the file is still the one it was made from, else
    ``_GONE``: read the file (one ``stat``; the index spares the JSON parse)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return _GONE
    if st.st_ino != entry[1] or st.st_mtime_ns != entry[3] or st.st_size != entry[2]:
        return _GONE
    values = entry[4]
    fields = _RECORD_FIELDS
    if _PLAIN_RESULT and type(values) is tuple and len(values) == len(fields):
        result: ItemResult = object.__new__(ItemResult)
        attrs = result.__dict__
        attrs.update(zip(fields, values, strict=True))
        attrs["cached"] = False
        return result
    try:
        return ItemResult(**dict(zip(fields, values, strict=True)))
    except (TypeError, ValueError):
        return _GONE  # a malformed entry: read the file


def _from_file(
    path: str, key: str, fresh: list[IndexEntry], on_corrupt: Callable[[str, str], None]
) -> ItemResult | None | _Gone:
    """Parse the result file (``_GONE`` if it vanished, ``None`` if corrupt: reported);
    a good record is added to ``fresh`` for the index."""
    try:
        raw, st = _read_file(path)
    except FileNotFoundError:
        return _GONE
    except OSError as exc:
        on_corrupt(path, f"unreadable ({exc})")
        return None
    result, why = _parse_result(raw, key)
    if result is None:
        on_corrupt(path, why)
        return None
    values = tuple(getattr(result, f) for f in _RECORD_FIELDS)  # JSON types already
    fresh.append((key, st.st_ino, st.st_size, st.st_mtime_ns, values))
    return result


# --- the store ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileStoreRef:
    """Picklable, hashable name of a file store: item hosts open it again from this."""

    root: str
    fsync: bool = True

    def open(self) -> Store:
        return Store(Path(self.root), fsync=self.fsync)



class Store:
    """A result store rooted at one directory; open it with ``Store.open``.

    One instance per process is enough (it caches lock objects and created directories;
    both are reset after a fork). Reads take no lock; writes and claims lock one shard.
    """

    threadsafe = True
    """Threads may call it at once (``store/protocol.py``): every write and claim takes its
    shard's flock, which also excludes threads (``KeptFlock``); the caches are a dict and a
    set whose races only repeat a ``mkdir`` or drop a spare lock object."""

    def __init__(self, root: Path, *, readonly: bool = False, fsync: bool = True) -> None:
        self.root = root
        self.readonly = readonly
        self.fsync = fsync
        self._results = root / "results"
        self._claims = root / "claims"
        self._results_s, self._claims_s = str(self._results), str(self._claims)
        self._lockdir = root / "locks"
        self._answers = root / "answers"
        self._runs = root / "runs"
        self._pid = os.getpid()
        self._locks: dict[str, KeptFlock] = {}
        self._made: set[str] = set()
        self._me: tuple[ClaimHolder, ...] = ()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, readonly={self.readonly})"

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(
        cls, root: Path, *, create: bool = True, readonly: bool = False, fsync: bool = True
    ) -> Store:
        """Open (and with ``create`` make) the store at ``root``, checking its format.

        ``readonly`` (for the report CLI) never writes: corrupt files are reported but not
        moved aside, and ``put``/``claim`` raise. Raises ``StoreError`` for a missing store
        (``create=False``), a directory that is not a store, or another format version.
        """
        root = Path(root)
        meta = root / "store.json"
        if not meta.exists():
            if not create or readonly:
                raise StoreError(f"no result store at {root} (missing {meta})")
            cls._create(root, meta)
        cls._check_meta(root, meta)
        store = cls(root, readonly=readonly, fsync=fsync)
        if not readonly:
            for sub in (store._results, store._claims, store._lockdir):
                sub.mkdir(exist_ok=True)
        return store

    @staticmethod
    def _create(root: Path, meta: Path) -> None:
        if root.exists() and not root.is_dir():
            raise StoreError(f"cannot use {root} as a result store: it is not a directory "
                             "(point --llmbench-store to a directory)")
        if root.is_dir():
            foreign = [p.name for p in root.iterdir() if p.name not in _OWN_NAMES]
            foreign = [n for n in foreign if not n.startswith(".store.json.")]
            if foreign:
                raise StoreError(
                    f"{root} is not a pytest-llmbench result store (it has no store.json "
                    f"but holds {', '.join(sorted(foreign)[:3])}...): point --llmbench-store "
                    "to a new or empty directory"
                )
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".store.json.{os.getpid()}.{uuid.uuid4().hex}"
            created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            body = json.dumps({"format": FORMAT_VERSION, "created": created}) + "\n"
            write_new(str(tmp), body.encode(), fsync=True)
            try:
                os.link(tmp, meta)  # first creator wins; a concurrent one reads ours
            except FileExistsError:
                pass
            finally:
                _unlink_quiet(str(tmp))
        except OSError as exc:
            raise StoreError(f"cannot create the result store at {root}: {exc}") from None

    @staticmethod
    def _check_meta(root: Path, meta: Path) -> None:
        try:
            data = json.loads(meta.read_bytes())
            found = data["format"]
            if not isinstance(found, int) or isinstance(found, bool):
                raise TypeError(f"format {found!r} is not an integer")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise StoreError(
                f"result store metadata {meta} is unreadable ({exc!r}): use another "
                f"--llmbench-store directory, or delete {root} to start afresh"
            ) from None
        if found == FORMAT_VERSION:
            return
        if found < FORMAT_VERSION:
            age, fix = "older", "or re-run with the pytest-llmbench version that wrote it"
        else:
            age, fix = "newer", "or upgrade pytest-llmbench"
        raise StoreError(
            f"result store {root} has format {found} ({age}); this pytest-llmbench supports "
            f"format {FORMAT_VERSION}: use another --llmbench-store directory, delete {root} "
            f"to start afresh, {fix}"
        )

    # -- paths and locks ----------------------------------------------------------------

    def result_path(self, key: str) -> Path:
        return Path(self._result_file(key))

    def claim_path(self, key: str) -> Path:
        return Path(self._claim_file(key))

    # The same as plain strings: every item looks both up several times, and building a
    # ``Path`` each time was ~5 % of the pytest process's CPU at zero latency.

    def _result_file(self, key: str) -> str:
        return f"{self._results_s}/{_check_key(key)[:2]}/{key}.json"

    def _claim_file(self, key: str) -> str:
        return f"{self._claims_s}/{_check_key(key)[:2]}/{key}.claim"

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._locks, self._me = os.getpid(), {}, ()

    def _lock(self, shard: str) -> KeptFlock:
        """The shard's file lock (re-entrant in one thread; flock, so dropped on kill -9)."""
        self._after_fork()
        lock = self._locks.get(shard)
        if lock is None:  # two threads may race here: one of the two locks is kept
            lock = self._locks.setdefault(shard, KeptFlock(
                f"{self._lockdir}/{shard}.lock", timeout=LOCK_TIMEOUT, poll=_LOCK_POLL
            ))
        return lock

    def _locked(self, shard: str) -> _Locked:
        if self.readonly:
            raise StoreError(f"result store {self.root} is open read-only")
        return _Locked(self._lock(shard), self._lockdir / f"{shard}.lock")

    def _dir(self, base: Path, shard: str) -> str:
        path = f"{base}/{shard}"
        if path not in self._made:
            try:  # one syscall: the shard directory nearly always exists already
                os.mkdir(path)
            except FileExistsError:
                pass
            except FileNotFoundError:
                os.makedirs(path, exist_ok=True)
            self._made.add(path)
        return path

    def _owners(self, holder: ClaimHolder | None) -> tuple[ClaimHolder, ...]:
        """Whose claims a ``put`` drops: ``holder``'s, or by default this process's and its
        parent's (an item's forked child writes the result for the engine that claimed)."""
        if holder is not None:
            return (holder,)
        self._after_fork()
        if not self._me:
            self._me = tuple(
                ClaimHolder.current(run_id="", deadline=0.0, pid=pid)
                for pid in (os.getpid(), os.getppid())
            )
        return self._me

    # -- results ------------------------------------------------------------------------

    def get(self, key: str) -> ItemResult | None:
        """The stored result of ``key``; ``None`` if there is none or it is unusable."""
        path = self._result_file(key)
        try:
            raw = _read_file(path)[0]
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._corrupt(path, f"unreadable ({exc})")
            return None
        result, why = _parse_result(raw, key)
        if result is None:
            self._corrupt(path, why)
        return result

    def lookup_many(self, keys: Iterable[str]) -> dict[str, ItemResult]:
        """Every stored, valid result among ``keys`` (``error`` ones included: the caller
        decides what runs again). The resume fast path: one listing per shard spares the
        failed opens of missing keys, and the shard index spares parsing JSON."""
        by_shard: dict[str, dict[str, None]] = defaultdict(dict)
        valid = _KEY_RE.match
        for key in keys:
            if type(key) is not str or not valid(key):
                _check_key(key)  # raises with the message
            by_shard[key[:2]][key] = None
        found: dict[str, ItemResult] = {}
        with _gc_paused():
            for shard, wanted in by_shard.items():
                for _, result in self._scan(shard, wanted, self._corrupt):
                    if result is not None:
                        found[result.key] = result
        return found

    def iter_results(
        self, *, on_corrupt: Callable[[Path, str], None] | None = None
    ) -> Iterator[tuple[Path, ItemResult | None]]:
        """Every result in key order, ``(path, None)`` for a corrupt file (reported to
        ``on_corrupt(path, reason)``, by default logged). Never moves or changes a result."""

        def report(path: str, why: str) -> None:
            if on_corrupt is None:
                log.warning("corrupt result file %s: %s", path, why)
            else:
                on_corrupt(Path(path), why)

        if not self._results.is_dir():
            return
        for shard in sorted(os.listdir(self._results)):
            for path, result in self._scan(shard, None, report):
                yield Path(path), result

    def _scan(
        self, shard: str, keys: Iterable[str] | None, on_corrupt: Callable[[str, str], None]
    ) -> Iterator[tuple[str, ItemResult | None]]:
        """``(path, result or None)`` for ``keys`` (default: all) stored in ``shard``.

        A record comes from the index when the file still has the inode, size and mtime the
        entry was made from, else from the file (then the index is rewritten afterwards).
        """
        folder = f"{self._results}/{shard}"
        names, present = self._list_shard(folder, keys)
        if not present:
            return
        index, count, sound = _load_index(f"{folder}/{_INDEX}")
        fresh: list[IndexEntry] = []
        get = index.get  # the loop runs 10^5 times on resume: local names
        for key in present:
            path = f"{folder}/{key}.json"
            entry = get(key)
            result: ItemResult | None | _Gone = _GONE if entry is None else _from_entry(path, entry)
            if isinstance(result, _Gone):
                result = _from_file(path, key, fresh, on_corrupt)
                if isinstance(result, _Gone):
                    continue
            yield path, result
        if not self.readonly and (fresh or not sound or count > 2 * len(names) + 16):
            self._compact_index(shard, folder, fresh)

    def _list_shard(self, folder: str, keys: Iterable[str] | None) -> tuple[list[str], list[str]]:
        """The shard's directory listing, and which of ``keys`` (default: all) have a result
        file there; sweeps dead writers' temp files on the way (unless read-only)."""
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        if not self.readonly:
            _sweep_temp_files(folder, names)
        if keys is None:
            return names, sorted(n[:-5] for n in names if n.endswith(".json") and n[0] != ".")
        nameset = set(names)
        return names, [k for k in keys if f"{k}.json" in nameset]

    def _compact_index(self, shard: str, folder: str, fresh: Iterable[IndexEntry] = ()) -> None:
        """Rewrite the shard's index as one frame: the newest entry of each file present.

        Re-read under the lock, so entries appended meanwhile are kept; of two entries for a
        file the one with the later mtime wins (``fresh`` ones were made from a stat).
        """
        tmp = temp_name(f"{folder}/{_INDEX}")
        try:
            with self._locked(shard):
                names = set(os.listdir(folder))
                keep = {k: e for k, e in _load_index(f"{folder}/{_INDEX}")[0].items()
                        if f"{k}.json" in names}
                for entry in fresh:
                    old = keep.get(entry[0])
                    if old is None or old[3] <= entry[3]:
                        keep[entry[0]] = entry
                strings: dict[str, str] = {}
                entries = [_shared(e, strings) for e in keep.values()]
                write_new(tmp, _index_frame(entries), fsync=False)
                os.replace(tmp, f"{folder}/{_INDEX}")
        except (OSError, ValueError, StoreError) as exc:
            _unlink_quiet(tmp)
            log.debug("could not rewrite the index of %s: %s", folder, exc)

    def _corrupt(self, path: str, why: str) -> None:
        """Warn once: move the bad file aside (under the lock, re-checked, so a good file
        written meanwhile is never moved) unless the store is read-only."""
        if self.readonly:
            log.warning("corrupt result file %s: %s", path, why)
            return
        key = os.path.basename(path)[:-5]
        aside = path + ".corrupt"
        with self._locked(key[:2]):
            try:
                still_bad = _parse_result(_read_file(path)[0], key)[0] is None
            except FileNotFoundError:
                return
            except OSError:
                still_bad = True
            if still_bad:
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
        log.warning(
            "corrupt result file %s: %s; the item will run again (moved to %s)", path, why, aside
        )

    def put(self, result: ItemResult, *, holder: ClaimHolder | None = None) -> Path:
        """Store ``result`` atomically and durably, and drop the claim on its item if it is
        ``holder``'s (default: this process's or its parent's, see ``_owners``). Returns the
        result file's path. The temp file is written and fsynced outside the lock to keep the
        lock short.
        """
        data, record = _encode_result(result)
        key = result.key
        owners = self._owners(holder)
        folder = self._dir(self._results, key[:2])
        final = f"{folder}/{key}.json"
        if self._put_through_claim(result, data, record, owners, folder, final):
            return Path(final)
        tmp = temp_name(f"{folder}/{key}")
        try:
            st = write_new(tmp, data, fsync=self.fsync)
            with self._locked(key[:2]):
                if result.status == ERROR and self._keeps_finished(key, owners):
                    _unlink_quiet(tmp)
                    return Path(final)
                os.replace(tmp, final)
                if record is not None and _append_index(folder, [_index_entry(key, st, record)]):
                    self._compact_index(key[:2], folder)
                self._drop_claim(key, owners)
                self._point_answer(result, final)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        if self.fsync:
            _fsync_dir(folder)
        return Path(final)

    def _put_through_claim(self, result: ItemResult, data: bytes, record: dict[str, Any] | None,
                           owners: tuple[ClaimHolder, ...], folder: str, final: str) -> bool:
        """``put`` when one of ``owners`` holds the item's claim (the usual case): the
        result is written into the claim file itself, fsynced, and the claim renamed over
        the result's name, all under the shard lock. The rename drops the claim and
        publishes the result in one step, and the item costs one new file, not two plus a
        deleted one: on ext4 without a journal every file created after many recent
        deletions scans past them (``recently_deleted``), which cost ~1 ms of kernel CPU per
        file at zero latency. A writer killed mid-write leaves a claim file holding part of a
        result: its holder is dead, so the item is claimed afresh (``_read_claim``)."""
        key = result.key
        claim = self._claim_file(key)
        with self._locked(key[:2]):
            current, _ = self._read_claim(key)
            if current is None or not any(current.same_process(o) for o in owners):
                return False
            try:
                fd = os.open(claim, os.O_WRONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            try:
                os.ftruncate(fd, 0)
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, len(data) - len(view)):]
                if self.fsync:
                    os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(claim, final)
            if record is not None and _append_index(folder, [_index_entry(key, st, record)]):
                self._compact_index(key[:2], folder)
            self._point_answer(result, final)
        if self.fsync:
            _fsync_dir(folder)
        return True

    # -- the ResultStore protocol's fast paths, answers and runs ---------------------------

    def ref(self) -> FileStoreRef:
        """What an item host opens this store again from (``StoreRef``)."""
        return FileStoreRef(root=str(self.root), fsync=self.fsync)

    def has_result(self, key: str) -> bool:
        """Whether a result file exists for ``key`` (one ``stat``; not parsed)."""
        return os.path.exists(self._result_file(key))

    def seen_since(self, key: str, since: float) -> bool:
        """``key`` is claimed right now, or its result was stored at or after ``since``
        (Unix time): two ``stat`` calls. The engine's lookahead asks this for every item.

        A claim older than ``since`` is also read (lock-free) and counts only if its holder
        is ``busy``: after a ``kill -9`` the dead run's claims stay, and counting them kept
        each of those items from running ahead, so a resumed run ran them one at a time, as
        pytest reached them."""
        try:
            st = os.stat(self._claim_file(key))
        except FileNotFoundError:
            pass
        else:
            if st.st_mtime >= since:
                return True
            holder = self._read_claim(key)[0]
            return holder is not None and holder.busy(time.time())
        try:
            return os.stat(self._result_file(key)).st_mtime >= since
        except FileNotFoundError:
            return False

    def answer_for(self, request_key: str) -> ItemResult | None:
        """The newest stored result holding a whole answer (every turn) to the request
        ``request_key`` (``identity["request_key"]``), whatever scorer judged it; ``None``
        if there is none. Lets a changed scorer judge a stored answer without an API call."""
        path = self._answers / _check_key(request_key)[:2] / request_key
        try:
            raw = _read_file(str(path))[0]
        except (OSError, ValueError):
            return None  # no pointer: the answer is bought
        if raw[:1] == b"{":  # a hard link to the result file itself (see ``_point_answer``)
            result = _parse_result(raw, None)[0]
        else:  # the key of the result (where the file system has no hard links)
            try:
                result = self.get(_check_key(raw.decode("ascii").strip()))
            except (UnicodeDecodeError, ValueError):
                return None  # a torn pointer: the answer is bought again
        if result is None or result.answer is None or not result.completions:
            return None
        return result if result.identity.get("request_key") == request_key else None

    def _point_answer(self, result: ItemResult, final: str) -> None:
        """Under the shard lock after a ``put``: make ``answers/<rk>`` the result just stored
        at ``final`` when it holds a whole answer. A hard link to its file: results are
        replaced by rename, never changed in place, so the linked record stays whole; and a
        link allocates no inode (one new file per item cost ~0.7 ms of kernel CPU on a
        journal-less ext4 that had just deleted a run's files). Where links are refused, a
        file holding the result's key. Derived data (a lost pointer costs one API call), so
        there is no fsync."""
        request_key = result.identity.get("request_key")
        if result.answer is None or not result.completions or not isinstance(request_key, str):
            return
        if not _KEY_RE.match(request_key):
            return
        folder = self._dir(self._answers, request_key[:2])
        pointer = f"{folder}/{request_key}"
        tmp = ""
        try:
            try:
                # The first answer to a request (the usual case) is one ``link``; only a
                # pointer that exists already is replaced through a temp name.
                os.link(final, pointer)
                return
            except FileExistsError:
                tmp = temp_name(pointer)
                os.link(final, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                atomic_write(pointer, result.key.encode("ascii"))
                return
            os.replace(tmp, pointer)
        except OSError as exc:
            if tmp:
                _unlink_quiet(tmp)
            log.debug("could not record the answer of %s: %s", result.key[:12], exc)

    def results(
        self, *, on_corrupt: Callable[[str, str], None] | None = None
    ) -> Iterator[ItemResult]:
        """Every valid stored result (``on_corrupt(location, reason)`` hears of bad ones)."""
        for _path, result in self.iter_results(
            on_corrupt=None if on_corrupt is None else (lambda p, why: on_corrupt(str(p), why))
        ):
            if result is not None:
                yield result

    def put_run(self, manifest: RunManifest) -> None:
        """Write (or replace) the run's manifest, ``runs/<run_id>.json``, atomically."""
        if self.readonly:
            raise StoreError(f"result store {self.root} is open read-only")
        folder = str(self._runs)
        os.makedirs(folder, exist_ok=True)
        name = check_run_id(manifest.run_id)
        data = json.dumps(manifest.to_dict(), ensure_ascii=False, separators=(",", ":"),
                          default=_json_default)
        atomic_write(f"{folder}/{name}.json", data.encode("utf-8"), fsync=self.fsync)

    def runs(self) -> list[RunManifest]:
        """Every readable run manifest, oldest first (by start time); bad ones are logged."""
        try:
            names = sorted(n for n in os.listdir(self._runs) if n.endswith(".json") and n[0] != ".")
        except (FileNotFoundError, NotADirectoryError):
            return []
        found = [m for m in (self._read_run(self._runs / n) for n in names) if m is not None]
        return sorted(found, key=lambda m: (m.started_at, m.run_id))

    def get_run(self, run_id: str) -> RunManifest | None:
        """The manifest of ``run_id``, or ``None``."""
        try:
            name = check_run_id(run_id)
        except ValueError:
            return None
        return self._read_run(self._runs / f"{name}.json")

    @staticmethod
    def _read_run(path: Path) -> RunManifest | None:
        try:
            return manifest_from_dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable run manifest %s: %s (skipped)", path, exc)
            return None

    def _keeps_finished(self, key: str, owners: tuple[ClaimHolder, ...]) -> bool:
        """Whether an error result for ``key`` must not replace what is stored (lock held).

        A process whose claim was taken over (it was frozen past its deadline, another run
        reclaimed the item) may still report an error for it later; that error never
        replaces a finished result. The claim's current holder may always write (a fresh run
        that fails overwrites an earlier pass, as ``--llmbench-fresh`` promises).
        """
        current, _ = self._read_claim(key)
        if current is not None and any(current.same_process(o) for o in owners):
            return False
        stored = self.get(key)
        if stored is None or stored.status == ERROR:
            return False
        log.info("kept the finished result of item %s: a late error from a process that no"
                 " longer holds its claim is not stored", key[:12])
        return True

    # -- claims -------------------------------------------------------------------------

    def _read_claim(self, key: str) -> tuple[ClaimHolder | None, str]:
        """``(holder, "")``, ``(None, "")`` when unclaimed, ``(None, reason)`` when corrupt;
        ``(None, "replace")`` when the file holds part of a result whose writer died."""
        path = self._claim_file(key)
        try:
            raw = _read_file(path)[0]
        except FileNotFoundError:
            return None, ""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("key") != key:
                raise ValueError("not a claim of this item")
            return ClaimHolder.from_dict(data), ""
        except ValueError as exc:
            if raw[:200].find(b'"identity"') > 0:
                # Part of a result (``_put_through_claim``): its writer died mid-write.
                log.info("the claim of item %s holds part of a result: its writer died while"
                         " storing it; the item runs again", key[:12])
                return None, "replace"
            return None, f"corrupt claim file {path}: {exc}"

    def _write_claim(self, key: str, holder: ClaimHolder, *, replace: bool) -> bool:
        """Write our claim whole (temp + link/rename); ``False`` if ``replace`` is off and a
        claim appeared meanwhile (only possible where flock is not honoured, e.g. NFS)."""
        folder = self._dir(self._claims, key[:2])
        tmp = temp_name(f"{folder}/{key}")
        body = json.dumps({"key": key, **holder.to_dict()}, separators=(",", ":")).encode()
        write_new(tmp, body, fsync=False)  # claims are ephemeral: no fsync needed
        final = f"{folder}/{key}.claim"
        try:
            if replace:
                os.replace(tmp, final)
                return True
            try:
                os.link(tmp, final)  # O_EXCL semantics, also on NFS
            except FileExistsError:
                return False
            return True
        finally:
            if not replace:
                _unlink_quiet(tmp)

    def _drop_claim(self, key: str, owners: tuple[ClaimHolder, ...]) -> bool:
        current, _ = self._read_claim(key)
        if current is not None and any(current.same_process(o) for o in owners):
            _unlink_quiet(self._claim_file(key))
            return True
        return False

    def claim(
        self,
        key: str,
        *,
        holder: ClaimHolder,
        force: bool = False,
        fresh_run_id: str | None = None,
        run_id: str | None = None,
    ) -> ClaimResult:
        """Try to become the one process that runs item ``key`` (see ``ClaimResult``).

        A stored non-error result wins over everything (``done``); with ``fresh_run_id``
        (``--llmbench-fresh``, re-scoring) only one whose ``identity["run_id"]`` is that run
        counts, so earlier runs' results are run again and overwritten. Any result of the run
        ``run_id``, an error included, is ``done``: a run executes an item at most once (an
        error is run again by the next run, not by another worker of the same one). A claim
        held by the same
        process is re-entrant. A local holder whose process is gone (or whose pid now
        belongs to another process) is stale and taken over. A holder on another host cannot
        be checked: it counts as alive until its deadline, then as stale. ``force`` takes
        the claim from a live holder, after the caller has killed it (``overdue``).
        """
        _check_key(key)
        with self._locked(key[:2]):
            result = self.get(key)
            produced_by = result.identity.get("run_id") if result is not None else None
            if result is not None and (
                (run_id is not None and produced_by == run_id)
                or (result.status != ERROR and (fresh_run_id is None or produced_by == fresh_run_id))
            ):
                return ClaimResult(kind="done", result=result)
            current, why = self._read_claim(key)
            if current is None:
                if why and why != "replace":
                    log.warning("%s; item %s is claimed afresh", why, key)
                if self._write_claim(key, holder, replace=bool(why)):
                    return ClaimResult(kind="claimed")
                # A race the lock should have prevented: flock is not honoured (NFS).
                return ClaimResult(kind="busy", holder=self._read_claim(key)[0])
            if current.same_process(holder):
                self._write_claim(key, holder, replace=True)
                return ClaimResult(kind="claimed")
            if force:
                log.info(
                    "taking over claim of item %s from pid %d on %s (forced)",
                    key, current.pid, current.host,
                )
                self._write_claim(key, holder, replace=True)
                return ClaimResult(kind="claimed", took_over=current)
            if current.busy(time.time()):
                return ClaimResult(kind="busy", holder=current)
            if not current.is_alive():
                log.info("taking over stale claim of item %s from dead pid %d", key, current.pid)
            elif not current.is_local():
                log.info(
                    "taking over overdue claim of item %s from pid %d on host %s",
                    key, current.pid, current.host,
                )
            else:
                return ClaimResult(kind="overdue", holder=current)
            self._write_claim(key, holder, replace=True)
            return ClaimResult(kind="claimed", took_over=current)

    def claim_holder(self, key: str) -> ClaimHolder | None:
        """The current holder of ``key``'s claim, if any (lock-free, for waiting loops)."""
        return self._read_claim(_check_key(key))[0]

    def release(self, key: str, holder: ClaimHolder) -> bool:
        """Remove the claim on ``key`` if ``holder``'s process owns it; whether it did."""
        with self._locked(_check_key(key)[:2]):
            return self._drop_claim(key, (holder,))


class _Locked:
    """Context manager around a shard lock that turns a lock timeout into a StoreError."""

    __slots__ = ("_lock", "_path")

    def __init__(self, lock: KeptFlock, path: Path) -> None:
        self._lock, self._path = lock, path

    def __enter__(self) -> None:
        try:
            self._lock.acquire()
        except LockTimeout:
            raise StoreError(
                f"could not lock {self._path} within {LOCK_TIMEOUT:g} s: a process holding it "
                "is frozen, or the file system does not honour flock (see docs/store.md)"
            ) from None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
