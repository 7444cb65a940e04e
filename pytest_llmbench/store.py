"""The crash-safe per-item result store, and the claims that make execution exactly-once.

Layout under the store root (see ``docs/store.md``)::

    store.json                     {"format": 1, "created": "..."}: written once, checked on open
    results/<key[:2]>/<key>.json   one ItemResult per item, with "_v": 1
    results/<key[:2]>/.index       a cache of the shard's records for fast resume (derived)
    claims/<key[:2]>/<key>.claim   who is running the item right now (a ClaimHolder)
    locks/<key[:2]>.lock           one filelock.FileLock (flock) per shard

Why it is shaped this way:

- A result is written to a temp file in its final directory, fsynced, then ``os.replace``-d
  over the final name: a ``kill -9`` at any instant leaves the final file absent or whole,
  so readers never need the lock.
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
import dataclasses
import gc
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock
from filelock import Timeout as LockTimeout

from . import proc
from .errors import StoreError
from .records import ERROR, FAILED, PASSED, ItemResult
from .store_index import (
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

log = logging.getLogger("pytest_llmbench.store")

FORMAT_VERSION = 1
"""Version of the store layout (``store.json``) and of each result record (``"_v"``)."""

KEY_VERSION = 1
"""Mixed into every item key: bump it when the key's composition changes."""

LOCK_TIMEOUT = 120.0
"""Seconds to wait for a shard lock; the lock is held for microseconds, so this only fires
when a holder is frozen (SIGSTOP) or the file system does not honour flock."""

_LOCK_POLL = 0.002
_STATUSES = frozenset({PASSED, FAILED, ERROR})
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{2,128}\Z")
_OWN_NAMES = frozenset({"store.json", "results", "claims", "locks"})


# --- item keys ------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Make the few non-JSON types found in records serialisable, deterministically."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, Path):
        return value.as_posix()
    return repr(value)


def item_key(
    *,
    messages: Any,
    model: str,
    base_url: str,
    params: Mapping[str, Any],
    scorer: Mapping[str, Any],
    repeat: int,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The content hash of everything that determines an item's result (sha256 hex).

    ``messages`` is the rendered conversation (any JSON-able nesting, e.g. ``Case.turns``),
    ``scorer`` the scorer's name, options and threshold, ``extra`` anything else that changes
    the result (expected answer, code tests...). The identity (node id) is deliberately not
    part of it: renaming an instance must not cost an API call. Canonical JSON (sorted keys,
    no spaces) keeps the key stable across processes and Python versions; about 10 us each.
    """
    doc = {
        "v": KEY_VERSION,
        "messages": messages,
        "model": model,
        "base_url": base_url,
        "params": params,
        "scorer": scorer,
        "repeat": repeat,
        "extra": extra or {},
    }
    text = json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"invalid item key {key!r}: expected 2-128 characters of [0-9A-Za-z_-]")
    return key


# --- result validation ----------------------------------------------------------------------

_TYPE_NAMES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "float": (int, float),
    "int": (int,),
    "bool": (bool,),
    "None": (type(None),),
    "list": (list,),
    "dict": (dict,),
}


def _field_types() -> dict[str, tuple[type, ...]]:
    """JSON types each ``ItemResult`` field may hold, read from its (string) annotations."""
    out: dict[str, tuple[type, ...]] = {}
    for f in dataclasses.fields(ItemResult):
        allowed: tuple[type, ...] = ()
        for part in str(f.type).split("|"):
            base = part.strip().split("[", 1)[0]
            if base not in _TYPE_NAMES:
                break  # Any or something unusual: do not check this field
            allowed += _TYPE_NAMES[base]
        else:
            out[f.name] = allowed
    return out


_FIELD_TYPES = _field_types()
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(ItemResult)) - {"cached"}
_REQUIRED = frozenset(
    f.name
    for f in dataclasses.fields(ItemResult)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


def _parse_result(raw: bytes, key: str | None) -> tuple[ItemResult | None, str]:
    """Decode one stored record; on bad data return ``(None, reason)`` rather than raise."""
    if not raw.strip():
        return None, "empty file"
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return None, f"invalid JSON, probably truncated ({exc})"
    if not isinstance(data, dict):
        return None, f"expected a JSON object, found {type(data).__name__}"
    version = data.pop("_v", None)
    if version != FORMAT_VERSION:
        return None, f"record version {version!r}, expected {FORMAT_VERSION}"
    unknown = data.keys() - _FIELD_NAMES
    if unknown:
        return None, f"unknown field(s) {', '.join(sorted(unknown))}"
    missing = _REQUIRED - data.keys()
    if missing:
        return None, f"missing field(s) {', '.join(sorted(missing))}"
    for name, value in data.items():
        allowed = _FIELD_TYPES.get(name)
        if allowed is not None and not isinstance(value, allowed):
            return None, f"field {name!r} holds a {type(value).__name__}"
    if key is not None and data["key"] != key:
        return None, f"holds key {data['key']!r}, not the {key!r} of its file name"
    if data["status"] not in _STATUSES:
        return None, f"bad status {data['status']!r}"
    try:
        return ItemResult(**data), ""  # fields already checked: from_dict would redo it
    except (TypeError, ValueError) as exc:
        return None, str(exc)


# --- claims ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClaimHolder:
    """Who runs an item: a process named by pid *and* start time, so pid reuse is detected."""

    pid: int
    start_time: int
    """Clock ticks since boot (``/proc/PID/stat`` field 22); 0 when unknown."""
    host: str
    run_id: str
    claimed_at: float
    """Unix time of the claim."""
    deadline: float
    """Unix time after which a live holder is overdue (task deadline + grace)."""
    token: str = ""
    """The item process's ``LLMBENCH_ITEM_TOKEN``: lets an overdue claim's item be killed
    without touching the pytest process that holds it."""

    @classmethod
    def current(cls, *, run_id: str, deadline: float, pid: int | None = None) -> ClaimHolder:
        """A holder for this process (or ``pid`` on this host), claimed now."""
        pid = os.getpid() if pid is None else pid
        return cls(
            pid=pid,
            start_time=proc.process_start_time(pid) or 0,
            host=socket.gethostname(),
            run_id=run_id,
            claimed_at=time.time(),
            deadline=deadline,
        )

    def same_process(self, other: ClaimHolder) -> bool:
        """Ownership is by process, not by run: a process may re-claim what it holds."""
        return (self.host, self.pid, self.start_time) == (other.host, other.pid, other.start_time)

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether the holding process still exists; a holder on another host cannot be
        checked and counts as alive (until its deadline, see ``Store.claim``)."""
        if not self.is_local():
            return True
        # Zombies count as dead; a differing start time means the pid was reused.
        return proc.pid_alive(self.pid, self.start_time or None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClaimHolder:
        try:
            holder = cls(
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                host=str(data["host"]),
                run_id=str(data["run_id"]),
                claimed_at=float(data["claimed_at"]),
                deadline=float(data["deadline"]),
                token=str(data.get("token", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad claim record: {exc!r}") from None
        return holder


ClaimKind = Literal["claimed", "busy", "done", "overdue"]


@dataclass(frozen=True, kw_only=True)
class ClaimResult:
    """The answer of ``Store.claim``.

    - ``claimed``: the caller now holds the item and must run it (``took_over`` names the
      stale or forced holder it replaced, if any);
    - ``busy``: ``holder`` is alive and within its deadline: wait for its result;
    - ``overdue``: ``holder`` is alive but past its deadline: kill it, then claim with force;
    - ``done``: a final (non-error) ``result`` is stored: report it, run nothing.
    """

    kind: ClaimKind
    result: ItemResult | None = None
    holder: ClaimHolder | None = None
    took_over: ClaimHolder | None = None


# --- file helpers and the per-shard index ---------------------------------------------------


def _write_new(path: str, data: bytes, *, fsync: bool) -> os.stat_result:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
        return os.fstat(fd)  # a rename keeps inode, size and mtime: the index entry's check
    finally:
        os.close(fd)


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


def _encode_result(result: ItemResult) -> tuple[bytes, dict[str, Any] | None]:
    """The result file's bytes, and the record for the index (``None`` when the JSON had to
    convert a value, so the record would not equal what a reader of the file gets)."""
    _check_key(result.key)
    if result.status not in _STATUSES:
        raise ValueError(f"item {result.key}: bad status {result.status!r}")
    record = result.to_dict()
    converted = False

    def default(value: Any) -> Any:
        nonlocal converted
        converted = True
        return _json_default(value)

    doc = {"_v": FORMAT_VERSION, **record}
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"), default=default)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates in a model's answer: escape them
        data = json.dumps(doc, separators=(",", ":"), default=default).encode("ascii")
    return data, None if converted else record


# --- the store ------------------------------------------------------------------------------


class Store:
    """A result store rooted at one directory; open it with ``Store.open``.

    One instance per process is enough (it caches lock objects and created directories;
    both are reset after a fork). Reads take no lock; writes and claims lock one shard.
    """

    def __init__(self, root: Path, *, readonly: bool = False, fsync: bool = True) -> None:
        self.root = root
        self.readonly = readonly
        self.fsync = fsync
        self._results = root / "results"
        self._claims = root / "claims"
        self._lockdir = root / "locks"
        self._pid = os.getpid()
        self._locks: dict[str, FileLock] = {}
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
            raise StoreError(f"cannot use {root} as a result store: it is not a directory")
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
            _write_new(str(tmp), body.encode(), fsync=True)
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
        return self._results / _check_key(key)[:2] / f"{key}.json"

    def claim_path(self, key: str) -> Path:
        return self._claims / _check_key(key)[:2] / f"{key}.claim"

    def _after_fork(self) -> None:
        if self._pid != os.getpid():
            self._pid, self._locks, self._me = os.getpid(), {}, ()

    def _lock(self, shard: str) -> FileLock:
        """The shard's file lock (re-entrant in one thread; flock, so dropped on kill -9)."""
        self._after_fork()
        lock = self._locks.get(shard)
        if lock is None:
            lock = self._locks[shard] = FileLock(
                self._lockdir / f"{shard}.lock", timeout=LOCK_TIMEOUT
            )
        return lock

    def _locked(self, shard: str) -> _Locked:
        if self.readonly:
            raise StoreError(f"result store {self.root} is open read-only")
        return _Locked(self._lock(shard), self._lockdir / f"{shard}.lock")

    def _dir(self, base: Path, shard: str) -> str:
        path = str(base / shard)
        if path not in self._made:
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
        path = str(self.result_path(_check_key(key)))
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
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        if not self.readonly:
            _sweep_temp_files(folder, names)
        if keys is None:
            present = sorted(n[:-5] for n in names if n.endswith(".json") and n[0] != ".")
        else:
            nameset = set(names)
            present = [k for k in keys if f"{k}.json" in nameset]
        if not present:
            return
        index, count, sound = _load_index(f"{folder}/{_INDEX}")
        fresh: list[IndexEntry] = []
        # The loop below runs 10^5 times on resume: local names.
        stat, fields, plain, new = os.stat, _RECORD_FIELDS, _PLAIN_RESULT, object.__new__
        for key in present:
            path = f"{folder}/{key}.json"
            result = None
            entry = index.get(key)
            if entry is not None:
                try:
                    st = stat(path)
                except FileNotFoundError:
                    continue
                if (
                    st.st_ino == entry[1]
                    and st.st_mtime_ns == entry[3]
                    and st.st_size == entry[2]
                ):
                    values = entry[4]
                    if plain and type(values) is tuple and len(values) == len(fields):
                        result = new(ItemResult)
                        attrs = result.__dict__
                        attrs.update(zip(fields, values, strict=True))
                        attrs["cached"] = False
                    else:
                        try:  # noqa: SIM105 - suppress() costs ~1 us a call, 10^5 times here
                            result = ItemResult(**dict(zip(fields, values, strict=True)))
                        except (TypeError, ValueError):
                            pass  # a malformed entry: read the file
            if result is None:
                try:
                    raw, st = _read_file(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    on_corrupt(path, f"unreadable ({exc})")
                    yield path, None
                    continue
                result, why = _parse_result(raw, key)
                if result is None:
                    on_corrupt(path, why)
                    yield path, None
                    continue
                values = tuple(getattr(result, f) for f in fields)  # JSON types already
                fresh.append((key, st.st_ino, st.st_size, st.st_mtime_ns, values))
            yield path, result
        if not self.readonly and (fresh or not sound or count > 2 * len(names) + 16):
            self._compact_index(shard, folder, fresh)

    def _compact_index(self, shard: str, folder: str, fresh: Iterable[IndexEntry] = ()) -> None:
        """Rewrite the shard's index as one frame: the newest entry of each file present.

        Re-read under the lock, so entries appended meanwhile are kept; of two entries for a
        file the one with the later mtime wins (``fresh`` ones were made from a stat).
        """
        tmp = f"{folder}/.{_INDEX}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
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
                _write_new(tmp, _index_frame(entries), fsync=False)
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
        tmp = f"{folder}/.{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            st = _write_new(tmp, data, fsync=self.fsync)
            with self._locked(key[:2]):
                if result.status == ERROR and self._keeps_finished(key, owners):
                    _unlink_quiet(tmp)
                    return Path(final)
                os.replace(tmp, final)
                if record is not None and _append_index(folder, [_index_entry(key, st, record)]):
                    self._compact_index(key[:2], folder)
                self._drop_claim(key, owners)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        if self.fsync:
            _fsync_dir(folder)
        return Path(final)

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
        """``(holder, "")``, ``(None, "")`` when unclaimed, ``(None, reason)`` when corrupt."""
        path = str(self.claim_path(key))
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
            return None, f"corrupt claim file {path}: {exc}"

    def _write_claim(self, key: str, holder: ClaimHolder, *, replace: bool) -> bool:
        """Write our claim whole (temp + link/rename); ``False`` if ``replace`` is off and a
        claim appeared meanwhile (only possible where flock is not honoured, e.g. NFS)."""
        folder = self._dir(self._claims, key[:2])
        tmp = f"{folder}/.{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        body = json.dumps({"key": key, **holder.to_dict()}, separators=(",", ":")).encode()
        _write_new(tmp, body, fsync=False)  # claims are ephemeral: no fsync needed
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
            _unlink_quiet(str(self.claim_path(key)))
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
                if why:
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
            past_deadline = time.time() > current.deadline
            if not current.is_alive():
                log.info("taking over stale claim of item %s from dead pid %d", key, current.pid)
            elif not current.is_local() and past_deadline:
                log.info(
                    "taking over overdue claim of item %s from pid %d on host %s",
                    key, current.pid, current.host,
                )
            elif past_deadline:
                return ClaimResult(kind="overdue", holder=current)
            else:
                return ClaimResult(kind="busy", holder=current)
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

    def __init__(self, lock: FileLock, path: Path) -> None:
        self._lock, self._path = lock, path

    def __enter__(self) -> None:
        try:
            self._lock.acquire(poll_interval=_LOCK_POLL)
        except LockTimeout:
            raise StoreError(
                f"could not lock {self._path} within {LOCK_TIMEOUT:g} s: a process holding it "
                "is frozen, or the file system does not honour flock (see docs/store.md)"
            ) from None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
