"""Model access: one chat call under the deadline layer, behind the provider seam.

What a provider author needs (docs/providers.md): the ``Provider`` protocol and the
``ChatRequest`` it is given, the ``AttemptFailure`` it raises and the ``Completion`` /
``ToolCall`` it returns. Importing this package does not import the ``openai`` SDK.
"""

from pytest_llmbench.errors import AttemptFailure
from pytest_llmbench.providers.base import ChatRequest, Provider
from pytest_llmbench.records import Completion, ToolCall

__all__ = ["AttemptFailure", "ChatRequest", "Completion", "Provider", "ToolCall"]
