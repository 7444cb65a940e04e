"""Which provider reaches a model, and which request hooks edit its requests (pytest side).

``get_provider`` asks the ``firstresult`` hook ``pytest_llmbench_get_provider`` and falls
back to the plugin's own OpenAI-compatible provider, as pytest-xdist does for its
schedulers; ``request_hooks`` collects the ``pytest_llmbench_modify_request``
implementations so that item processes (which have no plugin manager) can call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_llmbench.providers.base import Provider, RequestHook
from pytest_llmbench.records import ModelSpec

if TYPE_CHECKING:
    import pytest

__all__ = ["get_provider", "request_hooks"]


def get_provider(config: pytest.Config, model: ModelSpec) -> Provider:
    """The provider for ``model``: the first plugin's answer, else the OpenAI-compatible one."""
    provider: Provider | None = config.hook.pytest_llmbench_get_provider(model=model)
    if provider is None:
        from pytest_llmbench.providers.openai_compat import OpenAIProvider

        provider = OpenAIProvider()
    return provider


def request_hooks(config: pytest.Config) -> tuple[RequestHook, ...]:
    """The ``pytest_llmbench_modify_request`` implementations, in pluggy's call order."""
    caller = config.hook.pytest_llmbench_modify_request
    impls = caller.get_hookimpls()
    return tuple(RequestHook(impl.function, tuple(impl.argnames)) for impl in reversed(impls))
