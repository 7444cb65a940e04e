"""``python -m pytest_llmbench``: ``report``, ``runs`` and ``compare`` over a result store.

Reads the store alone (read-only: nothing is moved or rewritten) and imports neither pytest
nor the OpenAI SDK, so it starts fast and works on a machine that only holds the results.

- ``report [STORE_DIR] [--run ID] [--all] [--list]``: the summary table of one run (the
  latest by default: a run's manifest names its items, so results of earlier versions of an
  edited prompt are not counted), or of every stored result with ``--all``; ``--list``
  lists the runs instead. Exports (``--jsonl``, ``--csv``) hold the same results.
- ``runs [STORE_DIR]``: one line per run.
- ``compare A B``: two runs, or two models of one run, per suite (``report/compare.py``);
  ``--fail-on-regression`` exits 1 when a suite regressed significantly.

A run is named by its id, a unique prefix of it, ``latest`` or ``latest~N`` (N runs
before the latest); ``RUN:MODEL`` keeps one model of the run. Exit status: 0; 1 for a
significant regression with ``--fail-on-regression``; 2 with one ``error: ...`` line for a
missing store, an unknown run or model, or a file that cannot be written.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from pytest_llmbench.errors import StoreError
from pytest_llmbench.records import ItemResult
from pytest_llmbench.report.exporters import record_of
from pytest_llmbench.report.summary import Summarizer, render_table
from pytest_llmbench.store.filestore import Store
from pytest_llmbench.store.runs import RunItem, RunManifest

__all__ = ["main"]

DEFAULT_STORE = Path(".llmbench")

CSV_COLUMNS = (
    "nodeid", "suite", "prompt", "instance", "model", "repeat", "status", "error_class",
    "score", "latency", "prompt_tokens", "completion_tokens", "attempts", "deadline_layer",
)


class CLIError(Exception):
    """A one-line ``error: ...`` and exit status 2."""


def _csv_row(r: ItemResult) -> list[Any]:
    ident = r.identity
    return [
        ident.get("nodeid", ""), ident.get("suite", ""), ident.get("prompt", ""),
        ident.get("instance", ""), ident.get("model", ""), ident.get("repeat", ""),
        r.status, r.error_class or "", "" if r.score is None else r.score, r.latency,
        r.prompt_tokens, r.completion_tokens, len(r.attempts), r.deadline_layer or "",
    ]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_llmbench", description="Tools for pytest-llmbench result stores"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="Print the summary table of a run (default: the latest)")
    rep.add_argument("store", type=Path, nargs="?", default=DEFAULT_STORE, metavar="STORE_DIR",
                     help="The --llmbench-store directory (default: .llmbench)")
    rep.add_argument("--run", metavar="ID", help="This run (an id, a prefix, latest, latest~N)")
    rep.add_argument("--all", action="store_true", help="Every stored result, of any run")
    rep.add_argument("--list", action="store_true", help="List the runs instead (as 'runs')")
    rep.add_argument("--jsonl", type=Path, metavar="FILE", help="Write every result as one JSON line")
    rep.add_argument("--csv", type=Path, metavar="FILE", help="Write one flat CSV row per result")
    rep.add_argument("--html", type=Path, metavar="FILE",
                     help="Write the self-contained HTML report of these results")
    rep.add_argument("--suite", action="append", metavar="S", help="Only this suite (repeatable)")
    rep.add_argument("--model", action="append", metavar="M", help="Only this model (repeatable)")
    runs = sub.add_parser("runs", help="List the runs of a result store, oldest first")
    runs.add_argument("store", type=Path, nargs="?", default=DEFAULT_STORE, metavar="STORE_DIR")
    cmp = sub.add_parser("compare", help="Compare two runs, or two models of one run, per suite")
    cmp.add_argument("a", metavar="A", help="RUN, RUN:MODEL, or a MODEL of --run (default latest)")
    cmp.add_argument("b", metavar="B", help="The same, for the other side")
    cmp.add_argument("--store", type=Path, default=DEFAULT_STORE, metavar="STORE_DIR",
                     help="The --llmbench-store directory (default: .llmbench)")
    cmp.add_argument("--run", metavar="ID", default="latest",
                     help="The run whose models A and B name when they are not runs (default latest)")
    cmp.add_argument("--fail-on-regression", action="store_true",
                     help="Exit 1 when a suite of B regressed significantly against A")
    cmp.add_argument("--alpha", type=_alpha, default=0.05, metavar="P",
                     help="Significance level of the paired test (default 0.05)")
    cmp.add_argument("--suite", action="append", metavar="S", help="Only this suite (repeatable)")
    cmp.add_argument("--html", type=Path, metavar="FILE",
                     help="Also write the comparison as a self-contained HTML page")
    return parser


def _alpha(value: str) -> float:
    try:
        alpha = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}")
    return alpha


def _open(root: Path) -> Store:
    try:
        return Store.open(root, create=False, readonly=True)
    except StoreError as exc:
        raise CLIError(str(exc)) from None


# --- naming runs ----------------------------------------------------------------------------


def find_run(runs: Sequence[RunManifest], ref: str) -> RunManifest:
    """The run ``ref`` names: an id, a unique id prefix, ``latest`` or ``latest~N``."""
    if not runs:
        raise CLIError("the store holds no run manifests (runs are recorded from this version on)")
    if ref == "latest" or ref.startswith("latest~"):
        back = ref.partition("~")[2]
        if back and not back.isdigit():
            raise CLIError(f"bad run reference {ref!r}: use latest~N with a whole number N")
        n = int(back or 0)
        if n >= len(runs):
            raise CLIError(f"{ref}: the store holds only {len(runs)} run(s)")
        return runs[-1 - n]
    exact = [m for m in runs if m.run_id == ref]
    matches = exact or [m for m in runs if m.run_id.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CLIError(f"no run {ref!r} in the store; 'python -m pytest_llmbench runs' lists them")
    raise CLIError(f"run {ref!r} is ambiguous: {', '.join(m.run_id for m in matches[:5])}")


def _side(runs: Sequence[RunManifest], ref: str, default_run: str) -> tuple[str, list[RunItem]]:
    """``RUN``, ``RUN:MODEL`` or a ``MODEL`` of ``default_run``: a label and its items."""
    run_ref, sep, model = ref.partition(":")
    try:
        run = find_run(runs, run_ref)
    except CLIError as not_a_run:
        if sep:
            raise
        run = find_run(runs, default_run)
        if ref not in run.models:
            raise CLIError(f"{ref!r} is neither a run nor a model of run {run.run_id} "
                           f"(models: {', '.join(run.models) or 'none'})") from not_a_run
        model = ref
    items = list(run.items)
    if model:
        items = [i for i in items if i.model == model]
        if not items:
            raise CLIError(f"run {run.run_id} has no items of model {model!r} "
                           f"(models: {', '.join(run.models) or 'none'})")
    return (f"run {run.run_id}" + (f" model {model}" if model else "")), items


# --- commands -------------------------------------------------------------------------------


def _selected(store: Store, args: argparse.Namespace) -> tuple[str, Iterator[ItemResult]]:
    """What ``report`` summarises: a title, and the results (streamed for ``--all``)."""
    def on_corrupt(location: str, why: str) -> None:
        print(f"corrupt result file {location}: {why} (skipped)", file=sys.stderr)

    runs = store.runs()
    if args.all or (not runs and args.run is None):
        if not runs:
            print("no run manifests in the store: showing every stored result", file=sys.stderr)
        return f"every result in {store.root}", store.results(on_corrupt=on_corrupt)
    run = find_run(runs, args.run or "latest")
    found = store.lookup_many([i.key for i in run.items])
    missing = sum(1 for i in run.items if i.key not in found)
    if missing:
        print(f"{missing} result(s) of run {run.run_id} are no longer in the store",
              file=sys.stderr)

    def results() -> Iterator[ItemResult]:
        for item in run.items:
            result = found.get(item.key)
            if result is not None:
                result.cached = item.source == "cached"
                yield result

    return _run_title(run), results()


def _run_title(run: RunManifest) -> str:
    counts = run.counts()
    how = ", ".join(f"{counts[s]} {s}" for s in ("ran", "cached", "rescored") if counts.get(s))
    return (f"run {run.run_id} ({_when(run.started_at)}, {len(run.items)} items: {how or 'none'};"
            f" exit status {run.exit_status})")


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))


def report(args: argparse.Namespace) -> int:
    store = _open(args.store)
    if args.list:
        return list_runs(store)
    title, results = _selected(store, args)
    suites, models = set(args.suite or ()), set(args.model or ())
    summary = Summarizer()
    records: list[dict[str, Any]] | None = [] if args.html else None
    with _Exports(args.jsonl, args.csv) as exports:
        for result in results:
            if suites and result.identity.get("suite") not in suites:
                continue
            if models and result.identity.get("model") not in models:
                continue
            summary.add(result)
            exports.write(result)
            if records is not None:
                records.append(record_of(result))
    if records is not None:
        from pytest_llmbench.report.html import write_html

        try:
            write_html(args.html, records, {"store": str(store.root), "title": title},
                       title=f"pytest-llmbench: {title}")
        except OSError as exc:
            raise CLIError(f"--html {args.html}: {exc}") from None
        print(f"wrote the HTML report of {len(records)} results to {args.html}", file=sys.stderr)
    groups = summary.groups()
    print(title)
    if groups:
        # Clip to the terminal only: a pipe or file gets the whole table.
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print(render_table(groups, width=width))
    else:
        print(f"no results in {store.root}")
    return 0


class _Exports:
    """The ``--jsonl`` and ``--csv`` files of ``report``, written while results stream by."""

    def __init__(self, jsonl: Path | None, csv_path: Path | None) -> None:
        self.paths = (jsonl, csv_path)
        self.jsonl: IO[str] | None = None
        self.csv_file: IO[str] | None = None
        self.writer: Any = None

    def __enter__(self) -> _Exports:
        jsonl, csv_path = self.paths
        try:
            if jsonl:
                self.jsonl = jsonl.open("w", encoding="utf-8")
            if csv_path:
                self.csv_file = csv_path.open("w", encoding="utf-8", newline="")
                self.writer = csv.writer(self.csv_file)
                self.writer.writerow(CSV_COLUMNS)
        except OSError as exc:
            self.__exit__()
            raise CLIError(str(exc)) from None
        return self

    def write(self, result: ItemResult) -> None:
        try:
            if self.jsonl:
                self.jsonl.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
            if self.writer:
                self.writer.writerow(_csv_row(result))
        except OSError as exc:
            raise CLIError(str(exc)) from None

    def __exit__(self, *exc: object) -> None:
        for fh in (self.jsonl, self.csv_file):
            if fh:
                fh.close()


def list_runs(store: Store) -> int:
    runs = store.runs()
    if not runs:
        print(f"no runs recorded in {store.root}")
        return 0
    rows: list[tuple[str, ...]] = [("run", "started", "time", "items", "passed", "failed", "error",
             "ran", "cached", "rescored", "models", "exit")]
    for run in runs:
        counts = run.counts()
        took = "-" if run.finished_at is None else f"{run.finished_at - run.started_at:.1f}s"
        rows.append((run.run_id, _when(run.started_at), took, str(len(run.items)),
                     *(str(counts.get(k, 0)) for k in ("passed", "failed", "error", "ran",
                                                        "cached", "rescored")),
                     ",".join(run.models), str(run.exit_status)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def compare(args: argparse.Namespace) -> int:
    from pytest_llmbench.report.compare import compare_items, render_comparison

    store = _open(args.store)
    runs = store.runs()
    label_a, items_a = _side(runs, args.a, args.run)
    label_b, items_b = _side(runs, args.b, args.run)
    if args.suite:
        wanted = set(args.suite)
        items_a = [i for i in items_a if i.suite in wanted]
        items_b = [i for i in items_b if i.suite in wanted]
    # Two runs of the same models pair item for item; two models pair by case.
    with_model = {i.model for i in items_a} == {i.model for i in items_b}
    rows = compare_items(items_a, items_b, with_model=with_model)
    print(render_comparison(rows, label_a=label_a, label_b=label_b, alpha=args.alpha))
    if args.html:
        from pytest_llmbench.report.html import comparison_data, write_html

        try:
            write_html(args.html, [], {"store": str(args.store)},
                       title=f"pytest-llmbench: {label_a} vs {label_b}",
                       comparison=comparison_data(rows, label_a, label_b, alpha=args.alpha))
        except OSError as exc:
            raise CLIError(f"--html {args.html}: {exc}") from None
        print(f"wrote the comparison to {args.html}", file=sys.stderr)
    regressed = [r.suite for r in rows if r.significant_regression(args.alpha)]
    if regressed:
        print(f"significant regression (p < {args.alpha:g}) in: {', '.join(regressed)}")
        if args.fail_on_regression:
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "runs":
            return list_runs(_open(args.store))
        return compare(args) if args.command == "compare" else report(args)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
