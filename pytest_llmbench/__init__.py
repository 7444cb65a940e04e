"""pytest-llmbench: evaluate LLMs with pytest.

This module only re-exports what a scorer, provider, store or exporter author needs; the
plugin itself is ``pytest_llmbench.plugin`` (the ``pytest11`` entry point). The records and
errors are imported at once (they are small and every process has them loaded anyway); the
protocols are loaded on first use, so ``pytest --help`` and xdist workers stay fast.

PYTEST_DONT_REWRITE: the package has no assertion a test relies on, and xdist workers forked
from the worker template (``workers/``) inherit it already imported; with this marker pytest
does not warn that it cannot rewrite it there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_llmbench.errors import (
    APIError,
    APITimeoutError,
    AttemptFailure,
    ConfigError,
    EndpointDown,
    LLMBenchError,
    ScorerError,
    StoreError,
    SuiteError,
)
from pytest_llmbench.records import (
    Completion,
    ItemResult,
    Message,
    ModelSpec,
    Score,
    ScoreRequest,
    ToolCall,
)

if TYPE_CHECKING:
    from pytest_llmbench.providers.base import ChatRequest, Provider
    from pytest_llmbench.report.exporters import Exporter, RunEnd, RunInfo
    from pytest_llmbench.store.protocol import ResultStore

__all__ = [
    "APIError",
    "APITimeoutError",
    "AttemptFailure",
    "ChatRequest",
    "Completion",
    "ConfigError",
    "EndpointDown",
    "Exporter",
    "ItemResult",
    "LLMBenchError",
    "Message",
    "ModelSpec",
    "Provider",
    "ResultStore",
    "RunEnd",
    "RunInfo",
    "Score",
    "ScoreRequest",
    "ScorerError",
    "StoreError",
    "SuiteError",
    "ToolCall",
]

_LAZY = {
    "ChatRequest": "pytest_llmbench.providers.base",
    "Provider": "pytest_llmbench.providers.base",
    "Exporter": "pytest_llmbench.report.exporters",
    "RunEnd": "pytest_llmbench.report.exporters",
    "RunInfo": "pytest_llmbench.report.exporters",
    "ResultStore": "pytest_llmbench.store.protocol",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pytest_llmbench' has no attribute {name!r}")
