"""Per-program cost of each sandbox isolation mode, measured side by side.

    python bench/sandbox_overhead.py               # 200 rounds of /usr/bin/true and python3 -c pass
    python bench/sandbox_overhead.py --rounds 50

Each round runs the same program once in every mode, in turn (so machine load hits all modes
alike), through ``run_program`` with the modes' ``Isolation`` forced:

* ``full``: what ``probe_isolation`` picks here (root: own root in a mount namespace, network
  namespace, memory/pids cgroups, prlimit(1) for RLIMIT_AS);
* ``netns``: the previous default (network namespace, host temp dir, rlimits only);
* ``none``: no namespace, no cgroup (the fallback on a kernel that refuses namespaces).

``nomem`` variants set ``memory_mb = 0``, which drops the prlimit(1) exec: the difference is
that exec's cost. Prints the median and the 90th percentile of the wall time per run (as the
caller sees it: set-up, fork, exec, wait, sweep, clean-up) and the ratio to ``none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_llmbench.scoring.codeexec.sandbox import (  # noqa: E402
    _CLONE_NEWNET,
    Isolation,
    Limits,
    probe_isolation,
    run_program,
)


def modes() -> dict[str, Isolation]:
    full = probe_isolation()
    cap = full.process_cap
    return {
        "full": full,
        "netns": Isolation(process_cap=cap, network="netns", unshare_flags=_CLONE_NEWNET),
        "none": Isolation(process_cap=cap, network="shared"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    programs = {"true": ["/usr/bin/true"], "python": ["/usr/bin/python3", "-c", "pass"]}
    limits = Limits(time=10)
    variants = [(m, iso, lim) for m, iso in modes().items()
                for lim in (limits, dataclasses.replace(limits, memory_mb=0))]
    print(f"isolation here: {probe_isolation().to_dict()}")  # noqa: T201 - a bench report
    for name, argv in programs.items():
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for mode, iso, lim in variants:
                label = mode + ("" if lim.memory_mb else " nomem")
                t0 = time.perf_counter()
                result, _ = run_program(argv, limits=lim, isolation=iso)
                times.setdefault(label, []).append(time.perf_counter() - t0)
                assert result.error == "" and result.exit_code == 0, (label, result)
        base = statistics.median(times["none"])
        print(f"\n{name} ({args.rounds} rounds)")  # noqa: T201
        print(f"{'mode':<12} {'median ms':>10} {'p90 ms':>8} {'x none':>7}")  # noqa: T201
        for label, values in times.items():
            med = statistics.median(values)
            p90 = statistics.quantiles(values, n=10)[-1]
            print(f"{label:<12} {med * 1000:>10.1f} {p90 * 1000:>8.1f} {med / base:>7.2f}")  # noqa: T201


if __name__ == "__main__":
    main()
