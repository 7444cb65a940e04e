"""The agent loop of an item: tool calls executed, results sent back, limits and loops."""

from pytest_llmbench.agent.guards import Guards, call_key
from pytest_llmbench.agent.loop import Conversation
from pytest_llmbench.agent.tools import ToolResult, ToolRunner

__all__ = ["Conversation", "Guards", "ToolResult", "ToolRunner", "call_key"]
