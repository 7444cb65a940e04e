"""How each language is built and started, and how its output is made to flush.

A program killed at its time limit loses whatever sits in its stdio buffer, and the TLE
heuristic would then see too little. So:

* **Python** runs as ``python -u`` with ``PYTHONUNBUFFERED=1``: every write reaches the file.
* **C / C++** are compiled with ``-include llmbench_flush.h``, a header whose constructor
  calls ``setvbuf(stdout, NULL, _IOLBF, 0)`` before ``main``: stdout becomes line-buffered,
  and so does ``std::cout`` as long as it stays synchronised with stdio (the default). A
  program that calls ``std::ios::sync_with_stdio(false)`` gets its own full buffer back and
  loses its unflushed tail when killed: that is the documented limit. (``stdbuf -oL`` does
  the same through ``LD_PRELOAD`` but not for static binaries, hence the header.)

Compilation runs in the sandbox too, with its own limits (``compile_time_limit``); a compile
error is the verdict ``CE``.

HumanEval-style problems run ``HARNESS_SOURCE`` as ``main.py``: the program and the tests are
not in any file the program can read, and the pass needs a nonce it never sees in a file.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_llmbench.scoring.codeexec.sandbox import (
    Isolation,
    Limits,
    RunResult,
    accessible_by_others,
)

FLUSH_HEADER = b"""/* injected by pytest-llmbench: line-buffered stdout, so a killed program keeps its output */
#include <stdio.h>
__attribute__((constructor)) static void llmbench_line_buffered_stdout(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
}
"""

COMPILE_MEMORY_MB = 2048
COMPILE_OUTPUT_KB = 64 * 1024
COMPILE_DISK_MB = 256
SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")

Runner = Callable[..., tuple[RunResult, dict[str, bytes]]]
"""``run_program`` with a lease around it (see ``judge.make_runner``)."""


@dataclass(frozen=True)
class Built:
    """A program ready to run, or the reason it is not."""

    argv: list[str]
    files: dict[str, bytes]
    """Files placed in every run's fresh work directory."""
    interpreter: str = ""
    compile: dict[str, Any] = field(default_factory=dict)
    failure: str = ""
    """Verdict when building failed: ``CE`` (compile error), ``TLE``, ``SANDBOX_ERROR``."""
    message: str = ""


def _python_reachable(path: str) -> bool:
    if path == sys.executable:
        stdlib = sysconfig.get_paths()["stdlib"]
        return accessible_by_others(path) and accessible_by_others(stdlib)
    return accessible_by_others(path)


def choose_python(option: str, isolation: Isolation) -> str | None:
    """The interpreter for Python programs, or None when none can run in the sandbox.

    ``option`` is the ``python`` scorer option: a path, or ``auto`` (this Python when the
    sandbox runs as the caller; when it switches to its own uid, this Python only if that uid
    can reach it and its standard library, else the first reachable system ``python3``).
    """
    if option != "auto":
        return option
    if not isolation.switch_user or _python_reachable(sys.executable):
        return sys.executable
    for candidate in SYSTEM_PYTHONS:
        if _python_reachable(candidate):
            return candidate
    return None


def build(language: str, source: str, *, python: str, isolation: Isolation,
          compile_time_limit: float, max_processes: int, runner: Runner,
          wall_cap: float | None = None) -> Built:
    """Prepare ``source`` to run: pick the interpreter, or compile it in the sandbox.

    ``wall_cap``: the most the compilation may take (the time left in the item's task).
    """
    if language == "python":
        interpreter = choose_python(python, isolation)
        if interpreter is None:
            return Built([], {}, failure="SANDBOX_ERROR", message=(
                "no Python interpreter is reachable by the sandbox user; "
                "set the scorer option `python` to one"))
        return Built([interpreter, "-u", "main.py"], {"main.py": source.encode()}, interpreter)
    compiler, std, suffix, libs = (
        ("g++", "-std=c++17", "main.cpp", []) if language == "cpp" else ("gcc", "-std=c17", "main.c", ["-lm"]))
    path = shutil.which(compiler)
    if path is None:
        return Built([], {}, failure="SANDBOX_ERROR", message=f"{compiler} not found")
    argv = [path, "-O2", std, "-pipe", "-include", "llmbench_flush.h", "-o", "prog", suffix, *libs]
    limits = Limits(time=compile_time_limit, memory_mb=COMPILE_MEMORY_MB,
                    output_kb=COMPILE_OUTPUT_KB, processes=max(max_processes, 32),
                    disk_mb=COMPILE_DISK_MB, wall_cap=wall_cap)
    result, kept = runner(argv, limits=limits, files={suffix: source.encode(),
                          "llmbench_flush.h": FLUSH_HEADER}, keep_files=["prog"], label="compile")
    info: dict[str, Any] = {"argv": argv, "wall": result.wall, "cpu": result.cpu,
                            "limit": compile_time_limit, "exit_code": result.exit_code,
                            "stderr_head": result.stderr[:2000]}
    if result.error:
        return Built([], {}, compile=info, failure="SANDBOX_ERROR", message=result.error)
    if result.timed_out:
        took = min(compile_time_limit, limits.max_wall)
        why = "" if took >= compile_time_limit else " (all the task deadline left)"
        return Built([], {}, compile=info, failure="TLE",
                     message=f"compilation exceeded {took:g} s{why}")
    if result.exit_code != 0 or "prog" not in kept:
        first = next((ln for ln in result.stderr.splitlines() if "error" in ln),
                     result.stderr.strip()[:200])
        return Built([], {}, compile=info, failure="CE", message=f"compile error: {first}")
    return Built(["./prog"], {"prog": kept["prog"]}, path, compile=info)


HARNESS_SOURCE = b"""# pytest-llmbench HumanEval harness: nothing secret is in this file.
# The program, the tests and a per-run nonce arrive in a memfd (fd numbers in
# LLMBENCH_HARNESS_FDS), read and closed before the program runs; the result goes to a
# write-only pipe as a line "ok <nonce>" or "wa <nonce>". See docs/code-execution.md for what this does and does
# not stop.
def _llmbench_harness():
    import json, os, sys, traceback
    secret_fd, report_fd = (int(x) for x in os.environ.pop("LLMBENCH_HARNESS_FDS").split(","))
    with os.fdopen(secret_fd, "rb") as f:
        spec = json.loads(f.read())
    nonce = spec.pop("nonce")
    scope = {"__name__": "__main__", "__file__": __file__, "__builtins__": __builtins__}
    exec(compile(spec.pop("program"), "main.py", "exec"), scope)
    exec(compile(spec.pop("test"), "test.py", "exec"), scope)
    try:
        scope["check"](scope[spec["entry_point"]])
    except AssertionError:
        traceback.print_exc()
        os.write(report_fd, ("\\nwa " + nonce + "\\n").encode())
        sys.exit(1)
    os.write(report_fd, ("\\nok " + nonce + "\\n").encode())


_llmbench_harness()
"""


def humaneval_program(program: str, test: str, entry_point: str, prompt: str) -> dict[str, str]:
    """The harness's input without its nonce: the program, the test code, the entry point.

    When the program does not define ``entry_point`` it is taken as a completion of the
    prompt (the function body), so the prompt goes first; otherwise only the prompt's import
    lines go first (a model that rewrote the whole function often drops them).
    """
    if f"def {entry_point}(" in program:
        head = "\n".join(ln for ln in prompt.splitlines()
                         if ln.startswith(("import ", "from ")))
        body = f"{head}\n{program}" if head else program
    else:
        body = prompt + program
    return {"program": body, "test": test, "entry_point": entry_point}


def humaneval_secret(spec: Mapping[str, str], nonce: str) -> bytes:
    """The bytes of the harness's memfd for one run."""
    return json.dumps({**spec, "nonce": nonce}).encode()
