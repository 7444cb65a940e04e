"""Run manifests: what one run was (when, how, with what) and which items it reported.

A result in the store belongs to no run in particular: a later run may report it again from
the store (``cached``) or re-score its answer (``rescored``). The manifest is what ties a run
to its items, so ``report`` shows a run rather than every result ever stored, and
``compare`` pairs the items of two runs. Pure data and JSON here; a store backend keeps
them (``ResultStore.put_run`` / ``runs`` / ``get_run``; the files backend as
``runs/<run_id>.json``).

The format is documented in ``docs/store.md`` ("Runs"); readers other than this module
(the HTML report) should go through :func:`manifest_from_dict`, which checks it.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_llmbench.records import to_jsonable

__all__ = [
    "MANIFEST_VERSION",
    "SOURCES",
    "RunItem",
    "RunManifest",
    "manifest_from_dict",
    "new_run_id",
    "scrub_secrets",
]

MANIFEST_VERSION = 1

#: How a run got an item's result: run now (an API call), read from the store, or an answer
#: from the store judged again by a scorer that changed (no API call).
SOURCES = ("ran", "cached", "rescored")

_RUN_ID_RE = re.compile(r"[0-9A-Za-z_.-]{1,80}\Z")


def new_run_id(now: float | None = None) -> str:
    """A run id that sorts by start time: ``20261201T104512-3fa2c1``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise ValueError(f"invalid run id {run_id!r}: expected 1-80 characters of [0-9A-Za-z_.-]")
    return run_id


@dataclass(frozen=True, kw_only=True)
class RunItem:
    """One item as a run reported it."""

    key: str
    """The result's key in the store (``ResultStore.get(key)`` gives the whole record)."""
    nodeid: str
    outcome: str
    """``passed``, ``failed`` or ``error``, as pytest reported the item."""
    source: str = "ran"
    """One of :data:`SOURCES`."""
    error_class: str | None = None
    suite: str = ""
    suite_path: str = ""
    prompt: str = ""
    instance: str = ""
    model: str = ""
    repeat: int = 0

    def case_id(self) -> tuple[str, str, str, int]:
        """What pairs this item with the same case in another run or for another model."""
        return (self.suite_path or self.suite, self.prompt, self.instance, self.repeat)


@dataclass(frozen=True, kw_only=True)
class RunManifest:
    """One run: written when it starts (``finished_at`` None) and again when it ends."""

    run_id: str
    started_at: float
    """Unix time."""
    finished_at: float | None = None
    """Unix time; ``None`` while the run goes (or when it was killed)."""
    command: tuple[str, ...] = ()
    """The command line (``pytest`` and its arguments), secrets in URLs masked."""
    settings: Mapping[str, Any] = field(default_factory=dict)
    """The effective settings (models, deadlines, store, concurrency...); never a key."""
    plugin_version: str = ""
    models: tuple[str, ...] = ()
    """Model names, in command-line order."""
    exit_status: int | None = None
    items: tuple[RunItem, ...] = ()

    def counts(self) -> dict[str, int]:
        """Items per outcome, and per source (``ran``/``cached``/``rescored``)."""
        out: dict[str, int] = {}
        for item in self.items:
            out[item.outcome] = out.get(item.outcome, 0) + 1
            out[item.source] = out.get(item.source, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        # Field by field: ``dataclasses.asdict`` deep-copies every item, 0.3 ms of CPU per
        # 1000 items of a run (its items are flat records of scalars).
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["command"] = list(self.command)
        data["models"] = list(self.models)
        data["settings"] = to_jsonable(self.settings)
        names = [f.name for f in dataclasses.fields(RunItem)]
        data["items"] = [{n: getattr(item, n) for n in names} for item in self.items]
        return {"v": MANIFEST_VERSION, **data}


def manifest_from_dict(data: Any) -> RunManifest:
    """Decode and check a manifest; ``ValueError`` naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, found {type(data).__name__}")
    data = dict(data)
    version = data.pop("v", None)
    if version != MANIFEST_VERSION:
        raise ValueError(f"manifest version {version!r}, expected {MANIFEST_VERSION}")
    names = {f.name for f in dataclasses.fields(RunManifest)}
    unknown = data.keys() - names
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    items = data.pop("items", [])
    if not isinstance(items, list):
        raise ValueError("items is not a list")
    item_names = {f.name for f in dataclasses.fields(RunItem)}
    decoded = []
    for raw in items:
        if not isinstance(raw, dict) or raw.keys() - item_names:
            raise ValueError(f"bad item {str(raw)[:80]}")
        decoded.append(RunItem(**raw))
    try:
        manifest = RunManifest(**data, items=tuple(decoded))
        check_run_id(manifest.run_id)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return dataclasses.replace(
        manifest, command=tuple(manifest.command), models=tuple(manifest.models)
    )


# --- never a secret in a manifest -----------------------------------------------------------

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:api[-_]?key|key|token|access[-_]?token|secret|password|sig)=)[^&#\s]*")
_SECRET_NAME = re.compile(r"(?i)(key|token|secret|password|passwd|authorization|auth|cookie)")


def scrub_secrets(value: Any, *, name: str = "") -> Any:
    """``value`` with credentials removed: user:password and ``?key=`` parameters in URLs
    masked, and every mapping entry whose name says it holds a secret (``api_key``,
    ``Authorization``...) dropped, except ``*_env`` names (``api_key_env`` names an
    environment variable, it is not a secret)."""
    if isinstance(value, Mapping):
        return {
            str(k): scrub_secrets(v, name=str(k))
            for k, v in value.items()
            if not _SECRET_NAME.search(str(k)) or str(k).endswith("_env")
        }
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v, name=name) for v in value]
    if isinstance(value, str):
        return _QUERY_SECRET.sub(r"\1***", _URL_USERINFO.sub(r"\1***@", value))
    return value


def command_line(args: Sequence[str]) -> tuple[str, ...]:
    """The command as run, for the manifest, with URL credentials masked."""
    return tuple(str(scrub_secrets(str(a))) for a in ("pytest", *args))
