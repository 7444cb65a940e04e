"""Resume lookup of 100,000 stored results, against collecting 100,000 items with pytest.

    python bench/store_lookup.py                 # N = 100,000, 3 runs of each side
    python bench/store_lookup.py -n 20000 --runs 1

Fills a store in a temp dir with N realistic results (system + user message, one
completion, one attempt; ~0.8 kB of JSON each) through ``Store.put``, one by one as a run
does (without fsync, to keep the bench short: the fsync'd ``put`` is timed on a sample and
extrapolated). Times ``item_key`` for N items. Then times the
first ``Store.lookup_many`` over all N keys (the resume case: it may compact indexes) and,
alternating, further lookups and ``python -m pytest --collect-only -q`` of N trivial
parametrized items in a fresh temp project. Prints medians (min-max) and ratios to the
collection time. A lookup without the index (JSON files only) is timed on a tenth of the
keys and extrapolated, to show what the index buys. Target: lookup < 3 s for N = 100,000
on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_llmbench.records import ItemResult  # noqa: E402
from pytest_llmbench.store.filestore import Store, item_key  # noqa: E402

SYSTEM = "You are a calculator. Answer with the number only."


def key_for(i: int) -> str:
    return item_key(
        messages=[[{"role": "system", "content": SYSTEM},
                   {"role": "user", "content": f"What is {i} + {i + 1}?"}]],
        model="gpt-4o", base_url="http://127.0.0.1:8000/v1",
        params={"temperature": 0.0, "max_tokens": 64},
        scorer={"name": "numeric", "options": {}, "threshold": 1.0},
        repeat=0, extra={"expected": str(2 * i + 1)},
    )


def result_for(i: int, key: str) -> ItemResult:
    answer = str(2 * i + 1)
    return ItemResult(
        key=key,
        identity={"suite": "arith", "prompt": "add", "instance": str(i), "model": "gpt-4o",
                  "repeat": 0, "nodeid": f"suites/arith.toml::add[{i}-gpt-4o]"},
        status="passed" if i % 10 else "failed",
        messages=[{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": f"What is {i} + {i + 1}?"}],
        completions=[{"text": answer, "finish_reason": "stop", "prompt_tokens": 25,
                      "completion_tokens": 3, "latency": 0.42, "model": "gpt-4o"}],
        answer=answer, expected=answer, score=1.0 if i % 10 else 0.0, explanation="equal",
        attempts=[{"turn": 0, "number": 1, "started": 0.01, "duration": 0.42, "outcome": "ok",
                   "status": 200, "error": "", "wait": 0.0}],
        started_at=1.7e9 + i, elapsed=0.45, latency=0.42, prompt_tokens=25, completion_tokens=3,
    )


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def collect_project(root: Path, n: int) -> Path:
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "test_many.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.parametrize('i', range({n}))\n"
        "def test_item(i):\n    pass\n"
    )
    return root


def collect_once(project: Path, n: int) -> float:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
           "-p", "no:llmbench"]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=project, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if out.returncode != 0 or f"{n} tests collected" not in out.stdout:
        raise SystemExit(f"collection failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return elapsed


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return ""
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000, help="Number of results/items")
    ap.add_argument("--runs", type=int, default=3, help="Runs of each timed side")
    ap.add_argument("--sample", type=int, default=1000, help="Results for the extrapolated rows")
    args = ap.parse_args()
    n = args.n
    sample = min(args.sample, n)

    with tempfile.TemporaryDirectory(prefix="llmbench-bench-") as tmp:
        tmpdir = Path(tmp)
        t_keys = time.perf_counter()
        keys = [key_for(i) for i in range(n)]
        t_keys = time.perf_counter() - t_keys

        # Extrapolated rows, on their own stores.
        sample_results = [result_for(i, keys[i]) for i in range(sample)]
        durable = Store.open(tmpdir / "fsync")
        t_put_fsync = timed(lambda: [durable.put(r) for r in sample_results]) / sample

        store = Store.open(tmpdir / "store", fsync=False)
        t_put = 0.0
        for i, key in enumerate(keys):
            result = result_for(i, key)
            start = time.perf_counter()
            store.put(result)
            t_put += time.perf_counter() - start

        # Without the index: every file parsed as JSON (a read-only copy, nothing rebuilt).
        tenth = keys[: max(1, n // 10)]
        saved = {p: p.read_bytes() for p in (store.root / "results").glob("*/.index")}
        for path in saved:
            path.unlink()
        ro = Store.open(store.root, readonly=True)
        t_noindex = timed(lambda: ro.lookup_many(tenth)) * n / len(tenth)
        for path, data in saved.items():
            path.write_bytes(data)

        start = time.perf_counter()
        first = len(store.lookup_many(keys))
        t_first = time.perf_counter() - start
        assert first == n, first

        project = collect_project(tmpdir / "proj", n)
        lookups: list[float] = []
        lookups_cpu: list[float] = []
        collects: list[float] = []
        for _ in range(args.runs):
            start, cpu = time.perf_counter(), time.process_time()
            found = store.lookup_many(keys)
            lookups.append(time.perf_counter() - start)
            lookups_cpu.append(time.process_time() - cpu)
            assert len(found) == n, len(found)
            del found  # freeing 10^5 results is not part of the lookup
            collects.append(collect_once(project, n))

    base = statistics.median(collects)
    rows = [
        (f"pytest --collect-only, {n} items", base, spread(collects)),
        (f"lookup_many, {n} results, first after the run", t_first, ""),
        (f"lookup_many, {n} results, again", statistics.median(lookups), spread(lookups)),
        ("  (its CPU time: what other load cannot inflate)", statistics.median(lookups_cpu),
         spread(lookups_cpu)),
        (f"lookup_many without index (from {len(tenth)})", t_noindex, ""),
        (f"item_key x {n}", t_keys, ""),
        (f"put x {n}, no fsync", t_put, ""),
        (f"put x {n}, fsync each (from {sample})", t_put_fsync * n, ""),
    ]
    # Other processes on the machine stretch every wall time here; the ratios hold better.
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.runs} run(s), alternated")
    print(f"{'what':<48} {'seconds':>8} {'min-max':>12} {'vs collect':>10}")
    for what, secs, rng in rows:
        print(f"{what:<48} {secs:>8.2f} {rng:>12} {secs / base:>10.3f}")
    worst = max(t_first, statistics.median(lookups))
    print(f"target lookup_many < 3 s: {'OK' if worst < 3.0 else 'MISSED'} ({worst:.2f} s)")


if __name__ == "__main__":
    main()
