"""The ``tools`` and ``agent`` keys of a suite file: tool declarations and agent limits.

Part of the suite loader (``suite.py`` calls these with its ``fail``), kept apart because
tools have a schema of their own (docs/suites.md, docs/agents.md). A tool is a table::

    [[suite.tools]]
    name = "calculator"
    description = "Evaluate an arithmetic expression"
    parameters = { type = "object", properties = { expression = { type = "string" } },
                   required = ["expression"] }
    function = "agent_tools.calc:calculator"      # or: command = ["{python}", "calc.py"]
    timeout = 5

A prompt's ``tools`` array holds such tables and/or names of the suite's tools; without it a
prompt gets every suite tool. ``parameters`` is checked as a JSON schema here (with
``jsonschema``'s meta-schema), so a bad schema is a collection error, not a failed item.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from pytest_llmbench.errors import ERROR_CLASSES
from pytest_llmbench.records import AgentLimits, ToolSpec

__all__ = ["AGENT_KEYS", "TOOL_KEYS", "agent_table", "merge_agent", "tool_list"]

Fail = Callable[[str, str, str], NoReturn]

TOOL_KEYS = ("name", "description", "parameters", "function", "command", "timeout")
AGENT_KEYS = ("max_turns", "max_tool_calls", "token_budget", "loop_repeats", "result_chars",
              "expect_error")
TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what the OpenAI API accepts
FUNCTION_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_TOOL_EXAMPLE = ('e.g. [[suite.tools]] name = "calculator", parameters = { type = "object", '
                 'properties = { expression = { type = "string" } } }, '
                 'function = "mytools:calculator"')


def _known(table: Mapping[str, Any], key: str, allowed: tuple[str, ...], fail: Fail) -> None:
    for name in table:
        if name not in allowed:
            fail(f"{key}.{name}", f"unknown key {name!r}", "allowed keys: " + ", ".join(allowed))


def _schema_problem(schema: Mapping[str, Any]) -> str:
    """Why ``schema`` is not a usable JSON schema for tool arguments ('' when it is)."""
    if schema.get("type", "object") != "object":
        return f"the arguments schema must have type 'object', not {schema.get('type')!r}"
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - a dependency; the subset validator checks less
        return ""
    try:
        jsonschema.validators.validator_for(schema).check_schema(dict(schema))
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        return f"not a valid JSON schema at {where}: {exc.message}"
    return ""


def _command(value: object, key: str, fail: Fail) -> tuple[str, ...]:
    fix = 'e.g. command = ["{python}", "tools/lookup.py"] or command = "python3 lookup.py"'
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            fail(key, f"cannot split the command: {exc}", fix)
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        fail(key, "expected a string or an array of strings", fix)
    if not argv or not argv[0]:
        fail(key, "the command is empty", fix)
    return tuple(argv)


def _tool(raw: object, key: str, base_dir: str, fail: Fail) -> ToolSpec:
    if not isinstance(raw, dict):
        fail(key, "expected a table (or the name of a suite tool)", _TOOL_EXAMPLE)
    _known(raw, key, TOOL_KEYS, fail)
    name = raw.get("name")
    if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
        fail(f"{key}.name", f"missing or invalid tool name {name!r}",
             "1-64 letters, digits, '_' or '-', e.g. name = \"calculator\"")
    description = raw.get("description", "")
    if not isinstance(description, str):
        fail(f"{key}.description", "expected a string", 'e.g. description = "Adds numbers"')
    parameters = raw.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        fail(f"{key}.parameters", "expected a table (a JSON schema)", _TOOL_EXAMPLE)
    problem = _schema_problem(parameters)
    if problem:
        fail(f"{key}.parameters", problem, "fix the schema (https://json-schema.org)")
    has_function, has_command = "function" in raw, "command" in raw
    if has_function == has_command:
        fail(key, "a tool needs exactly one implementation: 'function' or 'command'"
             + (" (both are set)" if has_function else ""),
             'e.g. function = "mytools:calculator" or command = ["{python}", "calc.py"]')
    function = None
    command: tuple[str, ...] = ()
    if has_function:
        function = raw["function"]
        if not isinstance(function, str) or not FUNCTION_RE.fullmatch(function):
            fail(f"{key}.function", f"expected 'module:function', got {function!r}",
                 "e.g. function = \"agent_tools.calc:calculator\" (looked up beside the "
                 "suite file too)")
    else:
        command = _command(raw["command"], f"{key}.command", fail)
    timeout = raw.get("timeout", 10.0)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not math.isfinite(timeout) or timeout <= 0):
        fail(f"{key}.timeout", f"expected a positive number of seconds, got {timeout!r}",
             "e.g. timeout = 5")
    return ToolSpec(name=name, description=description, parameters=parameters,
                    function=function, command=command, timeout=float(timeout),
                    base_dir=base_dir)


def tool_list(value: object, key: str, base_dir: str, fail: Fail,
              suite_tools: Mapping[str, ToolSpec] | None = None) -> dict[str, ToolSpec]:
    """The tools of one ``tools`` array, by name. ``suite_tools`` (for a prompt's array): the
    suite's tools, which a plain string names."""
    if not isinstance(value, list):
        fail(key, "expected an array of tool tables", _TOOL_EXAMPLE)
    tools: dict[str, ToolSpec] = {}
    for i, raw in enumerate(value):
        sub = f"{key}[{i}]"
        if isinstance(raw, str) and suite_tools is not None:
            if raw not in suite_tools:
                known = ", ".join(suite_tools) or "none"
                fail(sub, f"no suite tool named {raw!r}", f"suite tools: {known}")
            tool = suite_tools[raw]
        else:
            tool = _tool(raw, sub, base_dir, fail)
        if tool.name in tools:
            fail(f"{sub}.name" if isinstance(raw, dict) else sub,
                 f"duplicate tool name {tool.name!r}", "give each tool a unique name")
        tools[tool.name] = tool
    return tools


def _positive_int(value: object, key: str, fail: Fail, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        fail(key, f"expected an integer >= {low}, got {value!r}",
             f"e.g. {key.rsplit('.', 1)[-1]} = 10")
    return value


def agent_table(value: object, key: str, fail: Fail) -> dict[str, Any]:
    """One level's ``agent`` table, checked (merged key by key like ``params``)."""
    if not isinstance(value, dict):
        fail(key, "expected a table", "e.g. agent = { max_turns = 10, loop_repeats = 3 }")
    _known(value, key, AGENT_KEYS, fail)
    out: dict[str, Any] = {}
    for name, raw in value.items():
        sub = f"{key}.{name}"
        if name == "expect_error":
            if raw not in ERROR_CLASSES:
                fail(sub, f"unknown error class {raw!r}",
                     "one of: " + ", ".join(ERROR_CLASSES))
            out[name] = raw
        elif name == "loop_repeats":
            out[name] = _positive_int(raw, sub, fail)
            if out[name] < 2:
                fail(sub, "loop_repeats must be at least 2 (1 would stop at every call)",
                     "e.g. loop_repeats = 3")
        else:
            out[name] = _positive_int(raw, sub, fail)
    return out


def merge_agent(tables: list[dict[str, Any]], has_tools: bool) -> AgentLimits | None:
    """Suite, prompt and instance ``agent`` tables (outer first) -> the item's limits;
    ``None`` when there are neither tools nor any ``agent`` key (a plain item)."""
    merged: dict[str, Any] = {}
    for table in tables:
        merged.update(table)
    if not merged and not has_tools:
        return None
    return AgentLimits(**merged)
