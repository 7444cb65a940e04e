"""The installed plugin's version (part of built-in scorers' fingerprints and of manifests)."""

from __future__ import annotations

import functools
from importlib import metadata


@functools.lru_cache(maxsize=1)
def plugin_version() -> str:
    """``pytest-llmbench``'s installed version; ``0+unknown`` when run from an uninstalled
    checkout (no metadata to read)."""
    try:
        return metadata.version("pytest-llmbench")
    except metadata.PackageNotFoundError:
        return "0+unknown"
