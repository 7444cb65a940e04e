"""How a result is keyed and how it is encoded in, and checked when read from, its file.

Pure functions over ``ItemResult`` and bytes (the store, ``store.py``, does the I/O).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llmbench.records import ERROR, FAILED, PASSED, ItemResult

FORMAT_VERSION = 1
"""Version of the store layout (``store.json``) and of each result record (``"_v"``)."""

KEY_VERSION = 1
"""Mixed into every item key: bump it when the key's composition changes."""

_STATUSES = frozenset({PASSED, FAILED, ERROR})
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{2,128}\Z")


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
