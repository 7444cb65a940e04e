"""``python -m pytest_llmbench report STORE_DIR``: the summary of a result store, and exports.

Reads the store alone (read-only: nothing is moved or rewritten) and imports neither pytest
nor the OpenAI SDK, so it starts fast and works on a machine that only holds the results.
Results are streamed: exports are written while the statistics accumulate, so 10^5 results
never sit in memory at once.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from pytest_llmbench.errors import StoreError
from pytest_llmbench.records import ItemResult
from pytest_llmbench.report.exporters import record_of
from pytest_llmbench.report.summary import Summarizer, render_table
from pytest_llmbench.store.filestore import Store

CSV_COLUMNS = (
    "nodeid", "suite", "prompt", "instance", "model", "repeat", "status", "error_class",
    "score", "latency", "prompt_tokens", "completion_tokens", "attempts", "deadline_layer",
)


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
    rep = sub.add_parser("report", help="Print the summary table of a result store")
    rep.add_argument("store", type=Path, metavar="STORE_DIR", help="The --llmbench-store directory")
    rep.add_argument("--jsonl", type=Path, metavar="FILE", help="Write every result as one JSON line")
    rep.add_argument("--csv", type=Path, metavar="FILE", help="Write one flat CSV row per result")
    rep.add_argument("--html", type=Path, metavar="FILE",
                     help="Write the self-contained HTML report of these results")
    rep.add_argument("--suite", action="append", metavar="S", help="Only this suite (repeatable)")
    rep.add_argument("--model", action="append", metavar="M", help="Only this model (repeatable)")
    return parser


def report(args: argparse.Namespace) -> int:
    try:
        store = Store.open(args.store, create=False, readonly=True)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suites, models = set(args.suite or ()), set(args.model or ())
    corrupt: list[Path] = []

    def on_corrupt(path: Path, why: str) -> None:
        corrupt.append(path)
        print(f"corrupt result file {path}: {why} (skipped)", file=sys.stderr)

    summary = Summarizer()
    records: list[dict[str, Any]] | None = [] if args.html else None
    jsonl: IO[str] | None = None
    csv_file: IO[str] | None = None
    try:
        if args.jsonl:
            jsonl = args.jsonl.open("w", encoding="utf-8")
        if args.csv:
            csv_file = args.csv.open("w", encoding="utf-8", newline="")
        writer = csv.writer(csv_file) if csv_file else None
        if writer:
            writer.writerow(CSV_COLUMNS)
        for _, result in store.iter_results(on_corrupt=on_corrupt):
            if result is None:
                continue
            if suites and result.identity.get("suite") not in suites:
                continue
            if models and result.identity.get("model") not in models:
                continue
            summary.add(result)
            if records is not None:
                records.append(record_of(result))
            if jsonl:
                jsonl.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
            if writer:
                writer.writerow(_csv_row(result))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for fh in (jsonl, csv_file):
            if fh:
                fh.close()
    if records is not None:
        from pytest_llmbench.report.html import write_html

        try:
            write_html(args.html, records, {"store": str(store.root)},
                       title=f"pytest-llmbench report of {store.root}")
        except OSError as exc:
            print(f"error: --html {args.html}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the HTML report of {len(records)} results to {args.html}", file=sys.stderr)
    groups = summary.groups()
    if groups:
        # Clip to the terminal only: a pipe or file gets the whole table.
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print(render_table(groups, width=width))
    else:
        print(f"no results in {store.root}")
    if corrupt:
        print(f"{len(corrupt)} corrupt result file(s) skipped", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "report":
        return report(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
