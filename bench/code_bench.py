"""Code-execution throughput and false TLEs under ``pytest -n 2``.

    python bench/code_bench.py                      # 500 programs, -n 2, limit 0.5 s
    python bench/code_bench.py --no-lease           # the same without the sandbox lease pool
    python bench/code_bench.py --strict-wall        # the limit on the plain wall clock

A reference solution (a CPU-bound loop) is calibrated to need ``--target`` (40 %) of its
time limit when run alone in the sandbox. Then ``--programs`` copies of it are judged by
``score_code``'s machinery from a generated test file under ``pytest -n WORKERS``, with the
TLE heuristic off (``max_raises = 0``) so every TLE shows. "Needs" is measured as the
sandbox judges it: wall time minus the time spent waiting for a CPU. Each of them is correct and fits
its limit 2.5 times over, so every TLE is a false TLE caused by load.

Prints the calibration, programs per second (over the judging window and including pytest's
start-up), wall-time percentiles as a fraction of the limit, the verdict counts and the
false-TLE count; writes the raw rows to ``bench/results/code_bench.raw`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_llmbench.scoring.codeexec import Limits, probe_isolation, run_program  # noqa: E402
from pytest_llmbench.scoring.codeexec.languages import choose_python  # noqa: E402

REFERENCE = """\
import sys
n = int(sys.stdin.readline())
s = 0
for i in range(n):
    s += i * i % 7
print(s)
"""

TEST_FILE = '''\
import json, os, time
import pytest
from pytest_llmbench.scoring.codeexec import judge
from pytest_llmbench.records import ScoreRequest

CONFIG = json.loads({config!r})

@pytest.mark.parametrize("i", range(CONFIG["programs"]))
def test_program(i):
    started = time.time()
    req = ScoreRequest(
        answer="```python\\n" + CONFIG["source"] + "```", expected=None,
        options={{"time_limit": CONFIG["limit"], "max_raises": 0,
                  "sandbox_slots": CONFIG["slots"], "lease": CONFIG["lease"],
                  "max_wall_factor": CONFIG["wall_factor"]}},
        extra={{"tests": [{{"stdin": CONFIG["stdin"], "stdout": CONFIG["stdout"]}}]}})
    score = judge(req)
    test = score.details["tests"][0]
    row = {{"i": i, "verdict": score.details["verdict"], "wall": test["wall"],
            "cpu_wait": test["cpu_wait"], "cpu": test["cpu"], "start": started, "end": time.time(), "pid": os.getpid()}}
    with open(os.path.join(CONFIG["out"], f"rows-{{os.getpid()}}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\\n")
'''


def expected_output(n: int) -> str:
    return f"{sum(i * i % 7 for i in range(n))}\n"


def alone_wall(n: int, python: str, limit: float, runs: int = 5) -> float:
    walls = []
    for _ in range(runs):
        result, _ = run_program([python, "-u", "main.py"], files={"main.py": REFERENCE.encode()},
                                stdin=f"{n}\n", limits=Limits(time=limit * 4))
        assert result.exit_code == 0, result
        walls.append(result.wall - result.cpu_wait)  # what the limit is judged on
    return statistics.median(walls)


def calibrate(python: str, limit: float, target: float) -> tuple[int, float]:
    """Iterations for which the reference needs ``target * limit`` seconds alone.

    Proportional steps on the loop part (interpreter start-up measured apart), median of 7
    runs each, until within 3 % (the VM's speed drifts, so a few rounds are needed).
    """
    goal = target * limit
    base = alone_wall(1, python, limit, runs=7)  # interpreter start-up
    n, wall = 200_000, 0.0
    for _ in range(8):
        wall = alone_wall(n, python, limit, runs=7)
        if abs(wall - goal) / goal < 0.03:
            break
        n = max(1, int(n * max(goal - base, 1e-3) / max(wall - base, 1e-3)))
    return n, wall


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description="Code-execution benchmark")
    parser.add_argument("--programs", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", type=float, default=0.5, help="Time limit (s)")
    parser.add_argument("--target", type=float, default=0.4,
                        help="Fraction of the limit the reference needs alone")
    parser.add_argument("--slots", type=int, default=os.cpu_count() or 1,
                        help="Sandbox lease slots (default: cores)")
    parser.add_argument("--no-lease", action="store_true", help="Run without the lease pool")
    parser.add_argument("--strict-wall", action="store_true",
                        help="max_wall_factor = 1: CPU wait is not excused (a plain wall limit)")
    args = parser.parse_args()

    iso = probe_isolation()
    python = choose_python("auto", iso)
    if python is None:
        print("no Python interpreter reachable by the sandbox user")
        return 2
    n, wall = calibrate(python, args.limit, args.target)
    print(f"isolation: {iso.to_dict()}  interpreter: {python}")
    print(f"calibration: n={n} -> {wall:.3f} s (wall - cpu wait) alone = {wall / args.limit:.0%} of the "
          f"{args.limit:g} s limit")

    with tempfile.TemporaryDirectory(prefix="llmbench-code-bench-") as tmp:
        out = Path(tmp) / "rows"
        out.mkdir()
        config = {"programs": args.programs, "source": REFERENCE, "stdin": f"{n}\n",
                  "stdout": expected_output(n), "limit": args.limit, "slots": args.slots,
                  "lease": not args.no_lease, "out": str(out),
                  "wall_factor": 1.0 if args.strict_wall else 3.0}
        (Path(tmp) / "test_code_bench.py").write_text(
            TEST_FILE.format(config=json.dumps(config)))
        env = {**os.environ, "LLMBENCH_STATE_DIR": str(Path(tmp) / "state"),
               "PYTHONPATH": str(REPO)}
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-n", str(args.workers), "-q",
             "-p", "no:cacheprovider", "-p", "no:llmbench", "-p", "no:randomly", tmp],
            cwd=tmp, env=env, capture_output=True, text=True)
        total = time.monotonic() - started
        rows = [json.loads(line) for f in out.glob("*.jsonl") for line in f.open()]
    if not rows:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 2
    verdicts: dict[str, int] = {}
    for row in rows:
        verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + 1
    window = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    ratios = [r["wall"] / args.limit for r in rows]
    judged = [(r["wall"] - r["cpu_wait"]) / args.limit for r in rows]
    false_tle = verdicts.get("TLE", 0)
    print(f"programs: {len(rows)} under -n {args.workers}, "
          f"lease pool: {'off' if args.no_lease else f'{args.slots} slots'}, "
          f"{'strict wall limit' if args.strict_wall else 'CPU wait excused (max 3x)'}")
    print(f"throughput: {len(rows) / window:.2f} programs/s while judging ({window:.1f} s); "
          f"{len(rows) / total:.2f} programs/s including pytest start-up ({total:.1f} s)")
    print(f"wall/limit: p50 {percentile(ratios, 0.5):.0%}  p95 {percentile(ratios, 0.95):.0%}  "
          f"max {max(ratios):.0%}")
    print(f"(wall - cpu wait)/limit, what TLE is judged on: p50 {percentile(judged, 0.5):.0%}  "
          f"p95 {percentile(judged, 0.95):.0%}  max {max(judged):.0%}")
    print(f"verdicts: {dict(sorted(verdicts.items()))}")
    print(f"false TLEs: {false_tle}")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "code_bench.raw", "w") as f:
        json.dump({"args": vars(args), "n": n, "alone_wall": wall, "rows": rows}, f)
    if proc.returncode not in (0, 1):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return 2
    return 0 if false_tle == 0 and verdicts.get("OK", 0) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
