"""The result store: atomic writes under kill -9, corrupt files, versions, keys, claims.

Real files, real flocks, real processes (subprocesses are killed with SIGKILL; claim holders
are live or dead processes, never faked pids).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llmbench.coord import proc
from pytest_llmbench.errors import StoreError
from pytest_llmbench.records import ItemResult
from pytest_llmbench.store.filestore import (
    FORMAT_VERSION,
    ClaimHolder,
    Store,
    _parse_result,
    item_key,
)
from pytest_llmbench.store.index import _FRAME, _index_frame, _load_index

REPO = Path(__file__).resolve().parent.parent


def key_of(i: int | str) -> str:
    return item_key(messages=[{"role": "user", "content": f"q{i}"}], model="m",
                    base_url="sim", params={}, scorer={"name": "exact"}, repeat=0)


def make_result(key: str, *, status: str = "passed", answer: str = "42", **kw: object) -> ItemResult:
    fields: dict[str, object] = {
        "identity": {"suite": "s", "prompt": "p", "instance": "0", "model": "m", "repeat": 0,
                     "nodeid": "s.toml::p[0-m]"},
        "messages": [{"role": "user", "content": "q"}],
        "completions": [{"text": answer, "finish_reason": "stop", "latency": 0.1}],
        "answer": answer, "expected": "42", "score": 1.0 if status == "passed" else 0.0,
        "attempts": [{"turn": 0, "number": 1, "outcome": "ok"}], "latency": 0.1,
        "prompt_tokens": 10, "completion_tokens": 2,
    }
    if status == "error":
        fields.update(error_class="api_timeout", score=None, answer=None)
    fields.update(kw)
    return ItemResult(key=key, status=status, **fields)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process other than us, to stand for another claim holder."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p
    p.kill()
    p.wait()


def holder_for(pid: int | None = None, *, deadline_in: float = 60.0, host: str | None = None,
               run_id: str = "r") -> ClaimHolder:
    h = ClaimHolder.current(run_id=run_id, deadline=time.time() + deadline_in, pid=pid)
    if host is not None:
        h = ClaimHolder(pid=h.pid, start_time=h.start_time, host=host, run_id=run_id,
                        claimed_at=h.claimed_at, deadline=h.deadline)
    return h


# --- opening and versions -------------------------------------------------------------------


def test_open_creates_and_reopens(tmp_path: Path) -> None:
    root = tmp_path / "st"
    Store.open(root)
    meta = json.loads((root / "store.json").read_text())
    assert meta["format"] == FORMAT_VERSION and "created" in meta
    Store.open(root, create=False)  # no error
    assert {p.name for p in root.iterdir()} == {"store.json", "results", "claims", "locks"}


def test_missing_store_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no result store at .*nothere"):
        Store.open(tmp_path / "nothere", create=False)
    assert not (tmp_path / "nothere").exists()


def test_refuses_a_directory_that_is_not_a_store(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a pytest-llmbench result store.*notes.txt"):
        Store.open(tmp_path)
    assert not (tmp_path / "store.json").exists()


@pytest.mark.parametrize(("found", "hint"), [(0, "older"), (FORMAT_VERSION + 1, "newer")])
def test_version_mismatch_names_path_versions_and_fix(tmp_path: Path, found: int, hint: str) -> None:
    root = tmp_path / "st"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"format": found}))
    with pytest.raises(StoreError) as info:
        Store.open(root)
    msg = str(info.value)
    assert str(root) in msg and f"format {found}" in msg and hint in msg
    assert f"supports format {FORMAT_VERSION}" in msg
    assert "--llmbench-store" in msg and "delete" in msg


def test_unreadable_metadata(tmp_path: Path) -> None:
    root = tmp_path / "st"
    root.mkdir()
    (root / "store.json").write_text('{"format": ')
    with pytest.raises(StoreError, match="store.json is unreadable"):
        Store.open(root)


# --- keys -----------------------------------------------------------------------------------

BASE = {
    "messages": [[{"role": "system", "content": "S"}, {"role": "user", "content": "2+3?"}]],
    "model": "gpt-4o", "base_url": "http://127.0.0.1:1/v1",
    "params": {"temperature": 0.0, "max_tokens": 64},
    "scorer": {"name": "numeric", "options": {"tolerance": 0.01}, "threshold": 1.0},
    "repeat": 0, "extra": {"expected": "5"},
}


def test_item_key_is_stable_and_canonical() -> None:
    k = item_key(**BASE)  # type: ignore[arg-type]
    assert len(k) == 64 and int(k, 16) >= 0
    assert item_key(**BASE) == k  # type: ignore[arg-type]
    # Dict order and tuples-for-lists (Case.turns is tuples) do not matter.
    same = dict(BASE, params={"max_tokens": 64, "temperature": 0.0},
                messages=tuple(tuple(turn) for turn in BASE["messages"]))  # type: ignore[arg-type]
    assert item_key(**same) == k  # type: ignore[arg-type]
    # ...and in another interpreter with another hash seed.
    code = f"from pytest_llmbench.store.filestore import item_key; print(item_key(**{BASE!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == k


@pytest.mark.parametrize(("field", "value"), [
    ("messages", [[{"role": "system", "content": "S"}, {"role": "user", "content": "2+4?"}]]),
    ("model", "gpt-4o-mini"),
    ("base_url", "http://127.0.0.1:2/v1"),
    ("params", {"temperature": 0.5, "max_tokens": 64}),
    ("scorer", {"name": "numeric", "options": {"tolerance": 0.1}, "threshold": 1.0}),
    ("repeat", 1),
    ("extra", {"expected": "6"}),
])
def test_item_key_changes_with_each_part(field: str, value: object) -> None:
    assert item_key(**{**BASE, field: value}) != item_key(**BASE)  # type: ignore[arg-type]


# --- put / get ------------------------------------------------------------------------------


def test_put_get_roundtrip(store: Store) -> None:
    r = make_result(key_of(1), details={"unicode": "é→✓", "n": [1, 2]})
    path = store.put(r)
    assert path == store.result_path(r.key)
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk["_v"] == FORMAT_VERSION and on_disk["key"] == r.key
    assert store.get(r.key) == r
    assert store.get(key_of(2)) is None
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_put_escapes_lone_surrogates(store: Store) -> None:
    r = make_result(key_of(1), answer="bad \ud800 text")
    store.put(r)
    assert store.get(r.key) == r


def test_invalid_key_is_rejected(store: Store) -> None:
    with pytest.raises(ValueError, match="invalid item key"):
        store.get("../etc/passwd")
    with pytest.raises(ValueError, match="invalid item key"):
        store.put(make_result("a/b"))


CORRUPTIONS = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "unknown field": lambda raw: json.dumps({**json.loads(raw), "colour": "red"}).encode(),
    "wrong key": lambda raw: json.dumps({**json.loads(raw), "key": key_of(99)}).encode(),
    "bad status": lambda raw: json.dumps({**json.loads(raw), "status": "maybe"}).encode(),
    "wrong type": lambda raw: json.dumps({**json.loads(raw), "latency": "fast"}).encode(),
    "no version": lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "_v"}).encode(),
    "missing field": lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "status"}).encode(),
    "not an object": lambda raw: b"[1, 2]",
    "not utf-8": lambda raw: b"\xff\xfe" + raw,
}
REASONS = {
    "truncated": "invalid JSON", "empty": "empty file", "unknown field": "unknown field(s) colour",
    "wrong key": "holds key", "bad status": "bad status 'maybe'", "wrong type": "'latency'",
    "no version": "record version None", "missing field": "missing field(s) status",
    "not an object": "expected a JSON object", "not utf-8": "invalid JSON",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_file_warns_with_path_and_runs_again(store: Store, kind: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    r = make_result(key_of(1))
    path = store.put(r)
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))  # in place, as an editor might
    with caplog.at_level(logging.WARNING, logger="pytest_llmbench.store.filestore"):
        assert store.get(r.key) is None
    [record] = caplog.records
    assert f"corrupt result file {path}" in record.getMessage()
    assert REASONS[kind] in record.getMessage() and "will run again" in record.getMessage()
    assert not path.exists() and Path(f"{path}.corrupt").exists()
    caplog.clear()
    assert store.get(r.key) is None and caplog.records == []  # moved aside: warned once
    store.put(r)  # the re-run's result
    assert store.get(r.key) == r


@pytest.mark.parametrize("kind", ["truncated", "wrong key", "wrong type"])
def test_lookup_many_skips_corrupt_files_even_when_indexed(store: Store, kind: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    results = [make_result(key_of(i)) for i in range(20)]
    for r in results:
        store.put(r)
    victim = store.result_path(results[3].key)
    victim.write_bytes(CORRUPTIONS[kind](victim.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="pytest_llmbench.store.filestore"):
        found = store.lookup_many(r.key for r in results)
    assert set(found) == {r.key for r in results} - {results[3].key}
    assert any(str(victim) in rec.getMessage() for rec in caplog.records)


def test_parse_result_never_raises_on_garbage() -> None:
    rng = random.Random(7)
    good = json.dumps({"_v": 1, **make_result(key_of(1)).to_dict()}).encode()
    for _ in range(300):
        cut = bytearray(good)
        for _ in range(rng.randint(1, 5)):
            cut[rng.randrange(len(cut))] = rng.randrange(256)
        result, why = _parse_result(bytes(cut), key_of(1))
        assert (result is None) == bool(why)


# --- the index (lookup_many fast path) ------------------------------------------------------


def test_lookup_many_matches_get_and_survives_index_damage(store: Store) -> None:
    results = {key_of(i): make_result(key_of(i), answer=str(i)) for i in range(60)}
    for r in results.values():
        store.put(r)
    wanted = [*results, key_of("absent")]
    assert store.lookup_many(wanted) == results
    indexes = list((store.root / "results").glob("*/.index"))
    assert indexes
    for idx in indexes:  # a torn append, then garbage
        idx.write_bytes(idx.read_bytes()[:-7] + b"garbage")
    assert store.lookup_many(wanted) == results
    for idx in indexes:
        idx.unlink()
    assert store.lookup_many(wanted) == results
    assert store.lookup_many(wanted) == results  # rebuilt index


def test_well_formed_frames_with_bad_entries_are_ignored(store: Store) -> None:
    r = make_result(key_of(1))
    path = store.put(r)
    st = path.stat()
    bad_entries = [
        (r.key, st.st_ino, st.st_size, st.st_mtime_ns, ("too", "short")),
        (r.key, st.st_ino, st.st_size, st.st_mtime_ns, None),
    ]
    for entry in [*bad_entries, ("short",), 5]:
        (path.parent / ".index").write_bytes(_index_frame([entry]))  # type: ignore[list-item]
        assert store.lookup_many([r.key]) == {r.key: r}


def test_put_keeps_the_index_compact(store: Store) -> None:
    results = [make_result(f"ab{i:062x}", answer=str(i)) for i in range(200)]  # one shard
    for r in results:
        store.put(r)
    raw = (store.root / "results" / "ab" / ".index").read_bytes()
    frames, pos = 0, 0
    while pos < len(raw):
        pos += _FRAME.size + _FRAME.unpack_from(raw, pos)[1]
        frames += 1
    assert frames < 50, "put() should have compacted per-record frames"
    entries, count, tidy = _load_index(str(store.root / "results" / "ab" / ".index"))
    assert tidy and set(entries) == {r.key for r in results}
    assert store.lookup_many(r.key for r in results) == {r.key: r for r in results}


def test_lookup_many_sees_files_changed_behind_the_index(store: Store) -> None:
    r = make_result(key_of(1), answer="old")
    path = store.put(r)
    assert store.lookup_many([r.key])[r.key].answer == "old"
    newer = make_result(key_of(1), answer="a much longer new answer")
    raw = json.dumps({"_v": 1, **newer.to_dict()}).encode()
    with open(path, "r+b") as fh:  # same inode: only size/mtime betray the change
        fh.write(raw)
        fh.truncate()
    assert store.lookup_many([r.key])[r.key] == newer


def test_readonly_store_reports_but_never_changes(store: Store, tmp_path: Path) -> None:
    good, bad = make_result(key_of(1)), make_result(key_of(2))
    store.put(good)
    bad_path = store.put(bad)
    bad_path.write_bytes(b"{")
    ro = Store.open(store.root, create=False, readonly=True)
    seen: list[tuple[Path, str]] = []
    listed = list(ro.iter_results(on_corrupt=lambda p, why: seen.append((p, why))))
    assert (store.result_path(good.key), good) in listed and (bad_path, None) in listed
    assert seen and seen[0][0] == bad_path
    assert ro.lookup_many([good.key, bad.key]) == {good.key: good}
    assert bad_path.exists()
    with pytest.raises(StoreError, match="read-only"):
        ro.put(good)


# --- crash safety ---------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from pytest_llmbench.records import ItemResult
from pytest_llmbench.store.filestore import Store
store = Store.open(Path(sys.argv[1]))
i = int(sys.argv[2])  # where this writer starts in the keys: each round starts elsewhere
keys = sys.argv[3:]
big = "x" * 400_000  # several write() calls per file: a naive writer would tear
print("ready", flush=True)
while True:
    k = keys[i % len(keys)]
    store.put(ItemResult(key=k, identity={"i": i}, status="passed", answer=big + str(i)))
    i += 1
"""


def test_kill_9_never_leaves_a_torn_result(store: Store, tmp_path: Path) -> None:
    keys = [key_of(i) for i in range(8)]
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1)
    for round_ in range(10):
        # Each round starts 3 keys further on: a loaded machine may kill every writer after
        # 2 or 3 puts, and the rounds still cover the keys between them.
        p = subprocess.Popen([sys.executable, str(script), str(store.root), str(3 * round_),
                              *keys], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.01, 0.25))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        files = list((store.root / "results").glob("*/*.json"))
        for f in files:
            result, why = _parse_result(f.read_bytes(), f.stem)
            assert result is not None, f"{f}: {why}"
    assert len(files) >= 4, "the writer should have stored several results"
    found = store.lookup_many(keys)
    assert all(found[k] == store.get(k) for k in found)
    assert list((store.root / "results").glob("*/*.corrupt")) == []


def test_forked_child_can_put(store: Store) -> None:
    r = make_result(key_of(1))
    store.claim(r.key, holder=holder_for())  # parent's lock cache is warm
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            store.put(r)  # no holder: the parent's claim is dropped all the same
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(r.key) == r
    assert not store.claim_path(r.key).exists()  # the child dropped the parent's claim


# --- claims ---------------------------------------------------------------------------------


def test_claim_then_busy_for_another_live_process(store: Store,
                                                  sleeper: subprocess.Popen[bytes]) -> None:
    k = key_of(1)
    theirs = holder_for(sleeper.pid)
    assert store.claim(k, holder=theirs).kind == "claimed"
    res = store.claim(k, holder=holder_for())
    assert res.kind == "busy" and res.holder == theirs
    assert store.claim_holder(k) == theirs


def test_claim_is_reentrant_for_the_same_process(store: Store) -> None:
    k = key_of(1)
    assert store.claim(k, holder=holder_for(run_id="a")).kind == "claimed"
    again = store.claim(k, holder=holder_for(run_id="b"))
    assert again.kind == "claimed" and again.took_over is None


def test_done_when_a_final_result_exists_and_error_runs_again(store: Store) -> None:
    k1, k2 = key_of(1), key_of(2)
    store.put(make_result(k1))
    res = store.claim(k1, holder=holder_for())
    assert res.kind == "done" and res.result == make_result(k1)
    store.put(make_result(k2, status="error"))
    assert store.claim(k2, holder=holder_for()).kind == "claimed"


def test_fresh_run_id_ignores_results_of_earlier_runs(store: Store) -> None:
    k = key_of(1)
    old = make_result(k, identity={"suite": "s", "model": "m", "run_id": "old"})
    store.put(old)
    assert store.claim(k, holder=holder_for(), fresh_run_id="new").kind == "claimed"
    new = make_result(k, identity={"suite": "s", "model": "m", "run_id": "new"})
    store.put(new)
    assert store.claim(k, holder=holder_for(), fresh_run_id="new").result == new


@pytest.mark.parametrize("reap", [False, True], ids=["zombie", "reaped"])
def test_stale_claim_of_dead_process_is_taken_over(store: Store, reap: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    k = key_of(1)
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = holder_for(p.pid)
    assert dead.start_time == proc.process_start_time(p.pid) and dead.start_time > 0
    assert store.claim(k, holder=dead).kind == "claimed"
    p.kill()
    if reap:
        p.wait()
    else:
        while proc.pid_alive(p.pid):  # SIGKILL is asynchronous: wait for the zombie
            time.sleep(0.01)
    try:
        with caplog.at_level(logging.INFO, logger="pytest_llmbench.store.filestore"):
            res = store.claim(k, holder=holder_for())
        assert res.kind == "claimed" and res.took_over == dead
        assert f"taking over stale claim of item {k} from dead pid {p.pid}" in caplog.text
        assert store.claim_holder(k) is not None and store.claim_holder(k).pid == os.getpid()  # type: ignore[union-attr]
    finally:
        p.wait()


def test_reused_pid_is_not_the_holder(store: Store, sleeper: subprocess.Popen[bytes]) -> None:
    k = key_of(1)
    live = holder_for(sleeper.pid)
    impostor = ClaimHolder(pid=live.pid, start_time=live.start_time - 1, host=live.host,
                           run_id="r", claimed_at=live.claimed_at, deadline=live.deadline)
    store.claim(k, holder=impostor)
    res = store.claim(k, holder=holder_for())
    assert res.kind == "claimed" and res.took_over == impostor


def test_overdue_live_holder_then_forced(store: Store, sleeper: subprocess.Popen[bytes]) -> None:
    k = key_of(1)
    late = holder_for(sleeper.pid, deadline_in=-1)
    store.claim(k, holder=late)
    res = store.claim(k, holder=holder_for())
    assert res.kind == "overdue" and res.holder == late
    forced = store.claim(k, holder=holder_for(), force=True)
    assert forced.kind == "claimed" and forced.took_over == late


def test_claims_from_another_host_count_until_their_deadline(store: Store) -> None:
    k1, k2 = key_of(1), key_of(2)
    remote = holder_for(1, host="elsewhere.invalid")
    store.claim(k1, holder=remote)
    assert store.claim(k1, holder=holder_for()).kind == "busy"
    remote_late = holder_for(1, host="elsewhere.invalid", deadline_in=-1)
    store.claim(k2, holder=remote_late)
    res = store.claim(k2, holder=holder_for())
    assert res.kind == "claimed" and res.took_over == remote_late


def test_corrupt_claim_file_is_claimed_afresh(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    k = key_of(1)
    path = store.claim_path(k)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="pytest_llmbench.store.filestore"):
        assert store.claim(k, holder=holder_for()).kind == "claimed"
    assert "corrupt claim file" in caplog.text and str(path) in caplog.text


def test_release_only_by_owner(store: Store, sleeper: subprocess.Popen[bytes]) -> None:
    k = key_of(1)
    mine = holder_for()
    store.claim(k, holder=mine)
    assert store.release(k, holder_for(sleeper.pid)) is False
    assert store.claim_path(k).exists()
    assert store.release(k, mine) is True
    assert not store.claim_path(k).exists()
    assert store.release(k, mine) is False


def test_put_drops_only_its_own_claim(store: Store, sleeper: subprocess.Popen[bytes]) -> None:
    k1, k2 = key_of(1), key_of(2)
    store.claim(k1, holder=holder_for())
    store.put(make_result(k1))
    assert not store.claim_path(k1).exists()
    theirs = holder_for(sleeper.pid)
    store.claim(k2, holder=theirs)
    store.put(make_result(k2, status="error"))  # e.g. a killed holder's leftover
    assert store.claim_holder(k2) == theirs
    store.put(make_result(k2), holder=theirs)
    assert not store.claim_path(k2).exists()


RACER = """
import json, sys, time
from pathlib import Path
from pytest_llmbench.store.filestore import ClaimHolder, Store
store = Store.open(Path(sys.argv[1]))
keys = json.loads(sys.argv[2])
holder = ClaimHolder.current(run_id=sys.argv[3], deadline=time.time() + 300)
print("ready", flush=True)
sys.stdin.readline()  # start together
mine = [k for k in keys if store.claim(k, holder=holder).kind == "claimed"]
print(json.dumps(mine), flush=True)
sys.stdin.read()  # stay alive (claims of a dead process would be stale) until told
"""


def test_two_processes_racing_claim_disjoint_covering_sets(store: Store, tmp_path: Path) -> None:
    keys = [key_of(i) for i in range(200)]
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(store.root), json.dumps(order), name],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for name, order in (("a", keys), ("b", keys[::-1]))
    ]
    try:
        for p in procs:  # both past their start-up before either begins
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        sets = []
        for p in procs:
            assert p.stdout is not None
            sets.append(set(json.loads(p.stdout.readline())))
    finally:
        for p in procs:
            p.communicate(timeout=30)
    a, b = sets
    assert a.isdisjoint(b)
    assert a | b == set(keys)
    assert a and b, "both processes should win some claims (they claim in opposite orders)"


def test_holder_roundtrip() -> None:
    h = holder_for()
    assert ClaimHolder.from_dict(h.to_dict()) == h
    with pytest.raises(ValueError, match="bad claim record"):
        ClaimHolder.from_dict({"pid": "x"})


def test_docs_describe_the_layout() -> None:
    doc = (REPO / "docs" / "store.md").read_text()
    for part in ("store.json", "results/<key[:2]>/<key>.json", "claims/<key[:2]>/<key>.claim",
                 "locks/<key[:2]>.lock", "NFS", f'"format": {FORMAT_VERSION}'):
        assert part in doc, part


def test_temp_files_of_dead_writers_are_swept_live_ones_kept(store: Store) -> None:
    k = key_of(7)
    store.put(make_result(k))
    folder = store.result_path(k).parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = folder / f".{k}.{dead.pid}.0badf00d.tmp"  # kill -9 between write and rename
    live = folder / f".{k}.{os.getpid()}.0cafe000.tmp"  # a write in progress
    left.write_text("{")
    live.write_text("{")
    assert store.lookup_many([k])[k].status == "passed"
    assert not left.exists() and live.exists()
    ro = Store.open(store.root, readonly=True)
    left.write_text("{")
    ro.lookup_many([k])
    assert left.exists()  # a read-only store (the report CLI) never deletes


# --- the shard lock (coord/flock.py) -------------------------------------------------------


_HOLD = """
import sys, time
from pytest_llmbench.coord.flock import KeptFlock
lock = KeptFlock(sys.argv[1], timeout=30)
with lock:
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_shard_lock_excludes_processes_and_threads_and_is_reentrant(tmp_path: Path) -> None:
    """Another process holds the lock: we wait (a timeout names nothing held); its kill -9
    frees it. Threads of one process exclude each other though they share the descriptor;
    one thread may take it twice (an index compaction inside a put)."""
    import threading

    from pytest_llmbench.coord.flock import KeptFlock, LockTimeout

    path = str(tmp_path / "locks" / "ab.lock")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, path, "60"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        lock = KeptFlock(path, timeout=0.3)
        with pytest.raises(LockTimeout):
            lock.acquire()
        holder.kill()
        holder.wait()
        lock.timeout = 10
        with lock, lock:  # re-entrant
            seen: list[str] = []
            t = threading.Thread(target=lambda: (lock.acquire(), seen.append("got"), lock.release()))
            t.start()
            t.join(0.3)
            assert seen == []  # the other thread waits while this one holds it
        t.join(5)
        assert seen == ["got"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # type: ignore[union-attr]


def test_the_shard_lock_of_a_forked_child_is_its_own_and_a_removed_file_is_reopened(
    tmp_path: Path,
) -> None:
    from pytest_llmbench.coord.flock import KeptFlock

    path = str(tmp_path / "ab.lock")
    lock = KeptFlock(path, timeout=5)
    with lock:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            child = KeptFlock(path, timeout=0.2)
            code = 0
            try:
                lock.timeout = 0.2
                try:
                    lock.acquire()  # the parent's lock object, in the child: must not pass
                except TimeoutError:
                    code += 1
                try:
                    child.acquire()
                except TimeoutError:
                    code += 2
            finally:
                os.write(w, bytes([code]))
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == bytes([3])  # both waited: the parent holds the lock
        os.waitpid(pid, 0)
        os.close(r)
    os.unlink(path)  # cleared while the descriptor stays open
    other = KeptFlock(path, timeout=0.2)
    with lock, pytest.raises(TimeoutError):
        other.acquire()  # both lock the new file, not one each


def test_a_claimed_item_s_result_is_written_into_its_claim_file(store: Store) -> None:
    """The holder's put turns the claim file into the result (one new file per item, no
    deletion): the claim is gone, the result is whole and is the claim's inode."""
    k = key_of(1)
    me = holder_for()
    assert store.claim(k, holder=me).kind == "claimed"
    inode = os.stat(store.claim_path(k)).st_ino
    store.put(make_result(k), holder=me)
    assert not store.claim_path(k).exists()
    assert os.stat(store.result_path(k)).st_ino == inode
    assert store.get(k) == make_result(k)
    assert store.lookup_many([k]) == {k: make_result(k)}  # the index saw it too
    # Not the holder: the result is stored the usual way and the claim stays.
    k2 = key_of(2)
    assert store.claim(k2, holder=me).kind == "claimed"
    store.put(make_result(k2), holder=holder_for(os.getppid()))
    assert store.claim_holder(k2) == me and store.get(k2) == make_result(k2)


def test_a_claim_file_left_holding_part_of_a_result_is_claimed_afresh(
    store: Store, caplog: pytest.LogCaptureFixture,
) -> None:
    """A writer killed while writing its result into the claim file leaves part of a
    result there: the item is claimed again, with an info line, not a corrupt-file warning."""
    k = key_of(1)
    assert store.claim(k, holder=holder_for()).kind == "claimed"
    whole = json.dumps({"_v": FORMAT_VERSION, **make_result(k).to_dict()}).encode()
    store.claim_path(k).write_bytes(whole[: len(whole) // 2])
    assert store.claim_holder(k) is None
    again = holder_for(run_id="again")
    with caplog.at_level(logging.INFO, logger="pytest_llmbench"):
        assert store.claim(k, holder=again).kind == "claimed"
    assert "holds part of a result" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert store.claim_holder(k) == again


def test_the_answer_pointer_names_the_latest_answer_to_a_request(store: Store) -> None:
    """The first answer to a request is linked in one step; a later one (another scorer's
    verdict on the same request) replaces the pointer whole, leaving no temp file."""
    request = key_of("request")
    first, second = key_of("verdict-1"), key_of("verdict-2")
    identity = {"suite": "s", "prompt": "p", "instance": "0", "model": "m", "repeat": 0,
                "nodeid": "s.toml::p[0-m]", "request_key": request}
    store.put(make_result(first, answer="41", identity=identity))
    found = store.answer_for(request)
    assert found is not None and found.key == first and found.answer == "41"
    store.put(make_result(second, answer="42", identity=identity))
    found = store.answer_for(request)
    assert found is not None and found.key == second and found.answer == "42"
    assert not [p for p in (store.root / "answers").rglob(".*")], "a temp file was left behind"
