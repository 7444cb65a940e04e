"""Running one tool call inside the item process; every failure becomes an error result.

``ToolRunner.call(call)`` never raises for anything the model or the tool did: an unknown
tool name, arguments that are not a JSON object or do not match the tool's schema
(``jsonschema``), a callable that raises, a command that exits non-zero, prints too much or
outlives its timeout all come back as ``ToolResult(ok=False, content="ERROR: ...")``, which
the loop sends to the model as the tool message; the item goes on.

Implementations:

* ``function = "module:function"``: imported in the item process (the suite file's directory
  and the rootdir are put on ``sys.path`` when the module is not importable as it is) and
  called with the arguments as keywords, in a daemon thread so its timeout holds; a callable
  still running at its timeout is abandoned (the item host that ran it is replaced after the
  item, since it left a thread behind). A ``str`` result is sent as it is, anything else as
  JSON.
* ``command = [...]``: a subprocess of the item, in a session of its own (so its group can be
  killed without the item's), carrying the item's token in its environment like every
  process the item starts: the task deadline's kill finds it, and whatever it spawns, even
  after ``setsid``. The arguments are written to its stdin as JSON, its stdout (at most
  ``MAX_OUTPUT`` bytes) is the result. When the call ends, however it ends, everything the
  command left behind is killed: its process group, and every descendant of the item process
  that appeared during the call (the item process becomes a child subreaper, so orphans of a
  tool re-parent to it).

Each call's timeout is ``min(tool.timeout, time left until the task deadline)``. A command
does not get the model's API key in its environment, and the key is masked in every result.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_llmbench.coord import proc
from pytest_llmbench.records import ToolCall, ToolSpec

__all__ = ["MAX_OUTPUT", "ToolResult", "ToolRunner", "check_arguments"]

log = logging.getLogger("pytest_llmbench.agent.tools")

MAX_OUTPUT = 1 << 20
"""Bytes of a command's stdout read at most; more is an error (the command is killed)."""
_STDERR_TAIL = 300
_MIN_TIME = 0.05  # seconds: a call with less task time left than this is not started


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call, as sent to the model and kept in the transcript."""

    ok: bool
    content: str
    """The tool message's content: the result, or ``ERROR: ...``."""
    duration: float = 0.0


def check_arguments(schema: Mapping[str, Any], args: Any) -> str:
    """Why ``args`` does not match ``schema`` ('' when it does), with ``jsonschema``."""
    import jsonschema  # lazy: only agent items pay for it

    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    if error is None:
        return ""
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at {where})" if where else "")


def _import(ref: str, base_dir: str) -> Callable[..., Any]:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing_self = exc.name is not None and (module_name + ".").startswith(exc.name + ".")
        if not missing_self:
            raise
        for directory in (os.getcwd(), base_dir):  # the suite's directory ends up first
            if directory and directory not in sys.path:
                sys.path.insert(0, directory)
        importlib.invalidate_caches()
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{ref} is not callable")
    return obj  # type: ignore[no-any-return]


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


class ToolRunner:
    """The tools of one item, and how to run a call of one of them."""

    def __init__(self, tools: Sequence[ToolSpec], *, task_deadline: float,
                 result_chars: int = 4000, secrets: Mapping[str, str] | None = None) -> None:
        """``secrets``: environment variable -> value (the model's API key) that a tool
        command must not see, and that is masked in every result."""
        self.tools = {t.name: t for t in tools}
        self.task_deadline = task_deadline
        self.result_chars = result_chars
        self.secrets = {k: v for k, v in (secrets or {}).items() if v}
        self._functions: dict[str, Callable[..., Any]] = {}
        self._subreaper = False

    def call(self, call: ToolCall) -> ToolResult:
        start = time.monotonic()
        try:
            content = self._run(call)
            ok = True
        except _ToolFailure as exc:
            content, ok = f"ERROR: {exc}", False
        for value in self.secrets.values():  # a tool that echoes the key does not leak it
            content = content.replace(value, "***")
        return ToolResult(ok, self._cut(content), time.monotonic() - start)

    def _cut(self, text: str) -> str:
        if len(text) <= self.result_chars:
            return text
        return text[:self.result_chars] + f" ... [cut: {len(text)} chars]"

    def _run(self, call: ToolCall) -> str:
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            raise _ToolFailure(f"unknown tool {call.name!r}; available tools: {known}")
        try:
            args = json.loads(call.arguments or "{}")
        except ValueError as exc:
            raise _ToolFailure(f"the arguments of {tool.name} are not valid JSON: {exc}") from None
        if not isinstance(args, dict):
            raise _ToolFailure(f"the arguments of {tool.name} must be a JSON object")
        problem = check_arguments(tool.parameters, args) if tool.parameters else ""
        if problem:
            raise _ToolFailure(f"the arguments of {tool.name} do not match its schema: {problem}")
        timeout = min(tool.timeout, self.task_deadline - time.monotonic())
        if timeout < _MIN_TIME:
            raise _ToolFailure(f"no task time left to run {tool.name}")
        if tool.function is not None:
            return self._call_function(tool, args, timeout)
        return self._run_command(tool, args, timeout)

    # -- module:function ---------------------------------------------------------------------

    def _call_function(self, tool: ToolSpec, args: dict[str, Any], timeout: float) -> str:
        assert tool.function is not None
        try:
            function = self._functions.get(tool.name) or _import(tool.function, tool.base_dir)
        except Exception as exc:  # noqa: BLE001 - any import failure is the tool's error
            raise _ToolFailure(f"cannot load {tool.function}: {type(exc).__name__}: {exc}") from None
        self._functions[tool.name] = function
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = function(**args)
            except BaseException as exc:  # noqa: BLE001 - reported to the model
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise _ToolFailure(f"{tool.name} timed out after {timeout:.2f} s")
        if "error" in box:
            error = box["error"]
            raise _ToolFailure(f"{tool.name} raised {type(error).__name__}: {error}")
        return _as_text(box.get("value"))

    # -- command -----------------------------------------------------------------------------

    def _argv(self, tool: ToolSpec) -> list[str]:
        return [a.replace("{python}", sys.executable).replace("{suite_dir}", tool.base_dir)
                for a in tool.command]

    def _run_command(self, tool: ToolSpec, args: dict[str, Any], timeout: float) -> str:
        if not self._subreaper:  # orphans of a tool re-parent to us: found and killed
            self._subreaper = proc.set_child_subreaper()
        before = set(proc.descendants(os.getpid()))  # ours before the call: never touched
        try:
            env = {k: v for k, v in os.environ.items()
                   if k not in self.secrets and v not in self.secrets.values()}
            child = subprocess.Popen(
                self._argv(tool), cwd=tool.base_dir or None, env=env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise _ToolFailure(f"cannot start {tool.name}: {exc.strerror or exc}") from None
        started = proc.process_start_time(child.pid)  # so a recycled pid is never signalled
        try:
            out, err, problem = _communicate(child, json.dumps(args).encode(), timeout)
        finally:
            _clean_up(child, started, before)
        if problem == "timeout":
            raise _ToolFailure(f"{tool.name} timed out after {timeout:.2f} s")
        if problem == "flood":
            raise _ToolFailure(f"{tool.name} printed more than {MAX_OUTPUT} bytes")
        text = out.decode("utf-8", "replace")
        if child.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
            raise _ToolFailure(f"{tool.name} exited with status {child.returncode}"
                               + (f": {tail}" if tail else ""))
        return text.strip()


class _ToolFailure(Exception):
    """A tool call that returns an error result to the model (internal)."""


def _communicate(child: subprocess.Popen[bytes], data: bytes,
                 timeout: float) -> tuple[bytes, bytes, str]:
    """Write ``data`` to stdin, read stdout/stderr until EOF, the deadline or the output
    cap; returns ``(stdout, stderr, problem)`` with problem ``''``, ``timeout`` or ``flood``."""
    deadline = time.monotonic() + timeout
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    with contextlib.suppress(BrokenPipeError):  # a tool that does not read its stdin
        if len(data) <= 65536:  # fits the pipe buffer: never blocks
            child.stdin.write(data)
        else:
            threading.Thread(target=child.stdin.write, args=(data,), daemon=True).start()
    with contextlib.suppress(OSError):
        child.stdin.close()
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(child.stdout, selectors.EVENT_READ, out)
        sel.register(child.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), bytes(err), "timeout"
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf: bytearray = key.data
                buf += chunk if buf is out else chunk[: max(0, 65536 - len(err))]
                if len(out) > MAX_OUTPUT:
                    return bytes(out), bytes(err), "flood"
    try:
        child.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # closed its pipes but runs on
        return bytes(out), bytes(err), "timeout"
    return bytes(out), bytes(err), ""


def _clean_up(child: subprocess.Popen[bytes], started: int | None, before: set[int]) -> None:
    """Kill what the command left: its group, its descendants, and every descendant of
    the item process that appeared during the call (orphans of the tool that re-parented to
    us after a ``setsid`` and double fork); processes that were there before are left alone."""
    group = child.pid if proc.group_exists(child.pid) else None  # empty: never signalled
    targets = [proc.KillSpec(child.pid, pgid=group, start_time=started)]
    targets += [proc.KillSpec(pid, start_time=proc.process_start_time(pid))
                for pid in proc.descendants(os.getpid())
                if pid != child.pid and pid not in before]
    if child.poll() is None or group is not None or len(targets) > 1:
        proc.kill_trees(targets, grace=0.2)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(1.0)
    for stream in (child.stdout, child.stderr, child.stdin):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    for target in targets[1:]:  # reap orphans that re-parented to us (we are their subreaper)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(target.pid, os.WNOHANG)
