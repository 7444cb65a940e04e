"""``python -m pytest_llmbench.sim``: run the simulator until SIGTERM/SIGINT.

Prints exactly one line, ``listening on http://HOST:PORT/v1``, on stdout once it accepts
connections (``--port 0`` picks a free port), so a parent can read the URL and go.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from pytest_llmbench.sim.control import KEY_ENV
from pytest_llmbench.sim.server import SimOptions, serve


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = float(text)  # "600.0" from a TOML float is fine
    if not (value.is_integer() and value >= 1):
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> SimOptions:
    parser = argparse.ArgumentParser(
        prog="python -m pytest_llmbench.sim",
        description="OpenAI-compatible LLM simulator with fault injection (docs/simulator.md)")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=int, default=0, help="Port; 0 picks a free one")
    parser.add_argument("--latency", type=_seconds, default=0.0,
                        help="Seconds before each answer")
    parser.add_argument("--jitter", type=_seconds, default=0.0,
                        help="Up to this many seconds more, uniformly drawn per request")
    parser.add_argument("--error-rate", type=_rate, default=0.0,
                        help="Fraction of distinct prompts answered wrongly (by hash and seed)")
    parser.add_argument("--hang-rate", type=_rate, default=0.0,
                        help="Fraction of distinct prompts never answered (by hash and seed)")
    parser.add_argument("--fail-rate", type=_rate, default=0.0,
                        help="Probability of a 500 for each request")
    parser.add_argument("--rpm", type=_positive_int, default=None,
                        help="Requests per sliding minute; beyond it 429 with Retry-After")
    parser.add_argument("--require-key", default=None, metavar="KEY",
                        help=f"Require 'Authorization: Bearer KEY' (or set {KEY_ENV}, "
                             "which keeps the key out of the process list)")
    parser.add_argument("--request-log", default=None, metavar="FILE",
                        help="Append one JSON line per chat request, written on arrival")
    parser.add_argument("--seed", type=int, default=0, help="Seed of every random choice")
    parser.add_argument("--models", default=None, metavar="ID,ID",
                        help="Serve only these model ids (comma separated): /v1/models lists "
                             "them, any other id gets a 404; default: any id is served")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="Exit when this process is no longer the parent")
    parser.add_argument("--verbose", action="store_true", help="Log each request on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="sim %(levelname)s %(message)s", stream=sys.stderr)
    return SimOptions(
        host=args.host, port=args.port, latency=args.latency, jitter=args.jitter,
        error_rate=args.error_rate, hang_rate=args.hang_rate, fail_rate=args.fail_rate,
        rpm=args.rpm, require_key=args.require_key or os.environ.get(KEY_ENV) or None,
        request_log=args.request_log, seed=args.seed, parent_pid=args.parent_pid,
        models=_model_ids(args.models))


def _model_ids(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ids:
        raise SystemExit("--models: expected one or more model ids, comma separated")
    return ids


def _ready(url: str) -> None:
    print(f"listening on {url}", flush=True)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        asyncio.run(serve(options, _ready))
    except OSError as exc:
        print(f"cannot listen on {options.host}:{options.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
