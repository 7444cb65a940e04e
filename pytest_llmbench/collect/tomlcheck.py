"""A checked TOML reader: bytes -> data within bounds, and the checks a schema is built of.

Generic: nothing here knows what a suite is (``suite.py`` holds the suite's semantics).
Every problem raises one ``SuiteError`` naming the file, the key path in TOML dotted form
with indices (``prompts[2].instances[0].vars``) and the fix.

Bounds, because a suite file may come from anywhere (a generated data set, a fuzzer): a file
over ``MAX_FILE_BYTES``, a string over ``MAX_STRING_CHARS`` or values nested deeper than
``MAX_DEPTH`` are refused with a message instead of exhausting memory or the stack (a deep
array used to end in a raw ``RecursionError`` traceback from the TOML parser).
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from pytest_llmbench.errors import SuiteError

try:  # compiled wheels: 1.5-2.7x faster than the stdlib's pure-Python copy (pyproject.toml)
    import tomli as tomllib
except ImportError:  # pragma: no cover - a tomli-less environment (not as installed)
    import tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_STRING_CHARS", "Checker", "describe",
           "display_path", "read_toml", "sub"]

MAX_FILE_BYTES = 256 * 1024 * 1024
"""A suite file larger than this is refused (split it)."""
MAX_STRING_CHARS = 16 * 1024 * 1024
"""One string value (a template, a test input) longer than this is refused."""
MAX_DEPTH = 32
"""Tables and arrays nested deeper than this are refused (no schema needs more than ~6)."""

BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def read_toml(path: Path, shown: str, raw: bytes | None = None) -> tuple[str, dict[str, Any]]:
    """The file's text and parsed data, or one ``SuiteError`` saying what is wrong.
    ``raw``: the file's bytes, when the caller has read them already."""
    try:
        size = path.stat().st_size if raw is None else len(raw)
        if size > MAX_FILE_BYTES:
            raise SuiteError(shown, "", f"the file is {size / 2**20:.0f} MiB, over the limit "
                             f"of {MAX_FILE_BYTES // 2**20} MiB", "split it into several suites")
        text = (path.read_bytes() if raw is None else raw).decode("utf-8-sig")
    except OSError as exc:
        raise SuiteError(shown, "", f"cannot read the file: {exc.strerror or exc}",
                         "check the path and its permissions") from exc
    except UnicodeDecodeError as exc:
        raise SuiteError(shown, "", f"not UTF-8 text (bad byte at offset {exc.start})",
                         "save the file as UTF-8") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(shown, "", f"invalid TOML: {exc}",
                         "fix the syntax at that line and column") from exc
    except RecursionError:
        raise SuiteError(shown, "", f"values nested deeper than {MAX_DEPTH} levels",
                         "flatten the nested arrays or tables") from None
    check_bounds(data, shown)
    return text, data


def check_bounds(data: Mapping[str, Any], shown: str) -> None:
    """Depth and string sizes, walked without recursion (the data may be deep)."""
    stack: list[tuple[object, str, int]] = [(data, "", 0)]
    while stack:
        value, key, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SuiteError(shown, key, f"values nested deeper than {MAX_DEPTH} levels",
                             "flatten the nested arrays or tables")
        if isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise SuiteError(shown, key, f"a string of {len(value):,} characters, over the "
                             f"limit of {MAX_STRING_CHARS:,}",
                             "keep large inputs out of the suite (shorten it)")
        if isinstance(value, dict):
            stack.extend((v, sub(key, str(k)), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(value))


def display_path(path: Path, rootdir: Path) -> str:
    """``path`` relative to ``rootdir`` in posix form (``..`` when outside, like pytest)."""
    absolute, root = os.path.abspath(path), os.path.abspath(rootdir)
    try:
        return Path(os.path.relpath(absolute, root)).as_posix()
    except ValueError:  # another drive on Windows: no relative form exists
        return Path(absolute).as_posix()


# --- value descriptions and key paths ----------------------------------------------------

_TYPE_NAMES = (
    (bool, "boolean"), (int, "integer"), (float, "float"), (str, "string"), (list, "array"),
    (dict, "table"), (datetime.datetime, "datetime"), (datetime.date, "date"),
    (datetime.time, "time"),
)  # bool before int, datetime before date: the first match wins


def type_name(value: object) -> str:
    """The TOML name of a parsed value's type."""
    return next((name for kind, name in _TYPE_NAMES if isinstance(value, kind)),
                type(value).__name__)


def describe(value: object) -> str:
    """``string '1o'``, ``integer 3``, ``boolean true``, ``array``... for error messages."""
    kind = type_name(value)
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, (int, float)):
        return f"{kind} {value!r}"
    if isinstance(value, (datetime.date, datetime.time)):
        return f"{kind} {value.isoformat()}"
    return kind


def sub(prefix: str, key: str) -> str:
    """The dotted path of ``key`` inside ``prefix``, quoting keys that are not bare."""
    part = key if BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{prefix}.{part}" if prefix else part


class Checker:
    """The checks a schema is made of; each raises one ``SuiteError`` for file ``shown``."""

    def __init__(self, shown: str, *, hints: Mapping[str, str] | None = None) -> None:
        self.shown = shown
        self.hints = dict(hints or {})
        """Key -> advice added when the key is unknown (e.g. ``models``: where models go)."""

    def fail(self, key: str, problem: str, fix: str = "") -> NoReturn:
        raise SuiteError(self.shown, key, problem, fix)

    def type_error(self, key: str, expected: str, value: object, fix: str) -> NoReturn:
        self.fail(key, f"expected {expected}, got {describe(value)}", fix)

    def known_keys(self, table: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key in allowed:
                continue
            fix = "allowed keys: " + ", ".join(allowed)
            if key in self.hints:
                fix = f"{self.hints[key]}; {fix}"
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            if close:
                fix = f"did you mean '{close[0]}'? {fix}"
            self.fail(sub(prefix, key), f"unknown key {key!r}", fix)

    def table(self, value: object, key: str, fix: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.type_error(key, "a table", value, fix)
        return value

    def string(self, value: object, key: str, fix: str) -> str:
        if not isinstance(value, str):
            self.type_error(key, "a string", value, fix)
        return value

    def count(self, value: object, key: str, *, maximum: int, fix: str) -> int:
        """A whole number in ``1..maximum``."""
        if not isinstance(value, int) or isinstance(value, bool):
            self.type_error(key, "an integer", value, fix)
        if value < 1:
            self.fail(key, f"must be >= 1, got {value}", fix)
        if value > maximum:
            self.fail(key, f"{value:,} is over the limit of {maximum:,}", fix)
        return value

    def plain(self, value: object, key: str) -> None:
        """Reject TOML dates/times anywhere inside ``value``: records must be JSON."""
        stack: list[tuple[object, str]] = [(value, key)]
        while stack:
            item, where = stack.pop()
            if isinstance(item, dict):
                stack.extend((v, sub(where, k)) for k, v in reversed(item.items()))
            elif isinstance(item, list):
                stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(item))))
            elif isinstance(item, (datetime.date, datetime.time)):
                self.fail(where, f"TOML {type_name(item)} values are not supported here",
                          f'quote it as a string: "{item.isoformat()}"')
