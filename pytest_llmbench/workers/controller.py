"""The xdist controller's side: whether to fork workers, the template's life, the specs.

``--llmbench-worker-fork`` (ini ``llmbench_worker_fork``): ``auto`` (the default) forks
workers when the run starts at least ``AUTO_MIN_WORKERS`` local ones, where the template
(one more interpreter's start-up) pays for itself; ``on`` whenever there is one; ``off``
never. Only plain local ``popen`` specs are rewritten (not ``ssh``, ``socket``, ``via``,
``chdir`` or one with its own ``python``), only on Linux.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

from pytest_llmbench.errors import ConfigError

log = logging.getLogger("pytest_llmbench.workers")

MODES = ("auto", "on", "off")
AUTO_MIN_WORKERS = 4
HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "template.py"
LAUNCHER = HERE / "launch.py"
_RUN_TEMPLATE = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')")


def mode(config: pytest.Config) -> str:
    value = config.getoption("llmbench_worker_fork", None) or config.getini("llmbench_worker_fork") or "auto"
    if value not in MODES:
        raise ConfigError(f"llmbench_worker_fork: expected one of auto, on, off; got {value!r}")
    return str(value)


def forkable(spec: str) -> bool:
    """A local ``popen`` spec a forked worker can stand in for."""
    import execnet

    try:
        parsed = execnet.XSpec(spec)
    except Exception:  # noqa: BLE001 - xdist reports a bad spec itself, better than we could
        return False
    return bool(parsed.popen) and not any(
        getattr(parsed, key, None) for key in ("python", "via", "chdir", "ssh", "socket", "vagrant_ssh"))


def _expand(tx: list[str]) -> list[str]:
    """``--tx 3*popen`` is three specs (xdist's own reading)."""
    specs: list[str] = []
    for entry in tx:
        count, star, spec = entry.partition("*")
        if star and count.isdigit():
            specs.extend([spec] * int(count))
        else:
            specs.append(entry)
    return specs


def _installed_modules() -> list[str]:
    """The modules this process has imported from the interpreter's library or installed
    packages: a worker imports the same ones at start-up. (The rootdir's and conftests'
    modules are left out: they may change before a worker imports them.)"""
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    prefixes = tuple(os.path.join(os.path.realpath(r), "") for r in roots if r)
    names: list[str] = []
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        file = getattr(module, "__file__", None)
        if file is None:
            if name in sys.builtin_module_names:
                names.append(name)
            continue
        if os.path.realpath(file).startswith(prefixes):
            names.append(name)
    return names


#: Modules of ours a worker imports and the controller may not have: the worker's engine
#: runs items ahead (``Engine.prefetch``) and its suites are parsed there. A name missing
#: here is only imported by each worker itself, as before.
WORKER_MODULES = (
    "pytest_llmbench.collect.suite", "pytest_llmbench.collect.template",
    "pytest_llmbench.collect.tomlcheck", "pytest_llmbench.collect.tools",
    "pytest_llmbench.coord.lease", "pytest_llmbench.engine.child",
    "pytest_llmbench.engine.hostpool", "pytest_llmbench.engine.inflight",
    "pytest_llmbench.engine.scheduler", "pytest_llmbench.engine.supervise",
    "pytest_llmbench.providers.registry", "pytest_llmbench.scoring.builtin",
    "pytest_llmbench.scoring.resolve", "pytest_llmbench.store.filestore",
)


def _own_modules() -> list[str]:
    """This package's modules the controller has, and those a worker will want: wherever
    the package lives (a source checkout too), it is the code running here."""
    package = __name__.partition(".")[0]
    have = {name for name in sys.modules if name == package or name.startswith(package + ".")}
    return sorted(have | set(WORKER_MODULES))


class WorkerTemplate:
    """The running template process, and the ``python=`` value that reaches it."""

    def __init__(self, modules: list[str] | None = None) -> None:
        """``modules``: what to import ahead (default: this process's, ``_installed_modules``)."""
        self.dir = tempfile.mkdtemp(prefix="llmbench-workers-")
        self.path = os.path.join(self.dir, "template.sock")
        env = dict(os.environ)
        env.pop("PYTHONSTARTUP", None)
        # Listening before the template starts, so a launcher that comes before the
        # template's interpreter is up waits in the backlog instead of starting a fresh
        # interpreter (on a loaded machine: the first workers). Our copy is closed once the
        # template has it: if the template dies, launchers are refused and fall back.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(1024)
            self.process = subprocess.Popen(
                [sys.executable, "-c", _RUN_TEMPLATE, str(TEMPLATE), str(listener.fileno())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
                pass_fds=(listener.fileno(),))
        finally:
            listener.close()
        assert self.process.stdin is not None
        if modules is None:
            modules = _installed_modules()
            known = set(modules)
            modules += [name for name in _own_modules() if name not in known]
        self.process.stdin.write((json.dumps(modules) + "\n").encode())
        self.process.stdin.flush()

    @property
    def python(self) -> str:
        return shlex.join([sys.executable, "-S", "-I", str(LAUNCHER), self.path])

    def close(self) -> None:
        """No more workers: the template exits once the last one has (they end with the
        session, before this is called)."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("the worker template (pid %d) did not exit: killed", self.process.pid)
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def install(config: pytest.Config) -> WorkerTemplate | None:
    """In the xdist controller, before xdist starts its workers: start the template and
    point the forkable ``--tx`` specs at it. None where it does not apply."""
    want = mode(config)  # a bad value is an error on every run, not only under xdist
    if hasattr(config, "workerinput") or not sys.platform.startswith("linux"):
        return None
    if not config.pluginmanager.hasplugin("xdist"):
        return None
    tx = getattr(config.option, "tx", None) or []
    if getattr(config.option, "dist", "no") == "no" or not tx:
        return None
    specs = _expand(list(tx))
    forked = [forkable(spec) for spec in specs]
    count = sum(forked)
    if want == "off" or count == 0 or (want == "auto" and count < AUTO_MIN_WORKERS):
        return None
    try:
        template = WorkerTemplate()
    except OSError as exc:
        log.warning("could not start the worker template (%s): workers start as usual", exc)
        return None
    config.option.tx = [f"{spec}//python={template.python}" if fork else spec
                        for spec, fork in zip(specs, forked, strict=True)]
    log.debug("%d of %d xdist workers will fork from the template (pid %d)", count, len(specs),
              template.process.pid)
    return template
