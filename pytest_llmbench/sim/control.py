"""Start and stop the simulator as a subprocess.

A subprocess, not a thread: the plugin forks a child per item, and forking a process that
runs threads is unsafe. The server is told our pid (``--parent-pid``) and exits by itself
when we die, so a ``kill -9`` of the test run leaves no server behind. The API key goes
through the environment, never argv, so it does not show in ``ps``.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from pytest_llmbench.errors import LLMBenchError

__all__ = ["KEY_ENV", "SimServer", "SimStartError"]

log = logging.getLogger("pytest_llmbench.sim.control")

KEY_ENV = "LLMBENCH_SIM_REQUIRE_KEY"
_READY_PREFIX = b"listening on "


class SimStartError(LLMBenchError):
    """The simulator did not report that it listens within the start-up timeout."""


class SimServer:
    """A running simulator subprocess. Use ``SimServer.start(...)``, then ``stop()`` (or a
    ``with`` block)."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str,
                 request_log: Path | None) -> None:
        self.process = process
        self.base_url = base_url
        """``http://127.0.0.1:PORT/v1``"""
        self.request_log = request_log

    @classmethod
    def start(
        cls,
        *,
        latency: float = 0.0,
        jitter: float = 0.0,
        error_rate: float = 0.0,
        hang_rate: float = 0.0,
        fail_rate: float = 0.0,
        rpm: int | None = None,
        require_key: str | None = None,
        request_log: str | os.PathLike[str] | None = None,
        seed: int = 0,
        models: list[str] | tuple[str, ...] | None = None,
        startup_timeout: float = 10.0,
        host: str = "127.0.0.1",
        port: int = 0,
        exit_with_parent: bool = True,
        stderr: int | IO[Any] | None = None,
    ) -> SimServer:
        """Start ``python -m pytest_llmbench.sim`` and wait until it listens.

        ``stderr`` is passed to ``Popen`` (default: inherited). Raises ``SimStartError`` if
        the server exits or stays silent for ``startup_timeout`` seconds.
        """
        argv = [sys.executable, "-m", "pytest_llmbench.sim", "--host", host,
                "--port", str(port), "--latency", repr(latency), "--jitter", repr(jitter),
                "--error-rate", repr(error_rate), "--hang-rate", repr(hang_rate),
                "--fail-rate", repr(fail_rate), "--seed", str(seed)]
        if rpm is not None:
            argv += ["--rpm", str(rpm)]
        if models is not None:
            argv += ["--models", ",".join(models)]
        log_path = Path(request_log) if request_log is not None else None
        if log_path is not None:
            argv += ["--request-log", str(log_path)]
        if exit_with_parent:
            argv += ["--parent-pid", str(os.getpid())]
        env = dict(os.environ)
        env.pop(KEY_ENV, None)
        if require_key is not None:
            env[KEY_ENV] = require_key
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=stderr, env=env, start_new_session=True)
        try:
            url = _read_ready(process, startup_timeout)
        except BaseException:
            _terminate(process, 2.0)
            if process.stdout is not None:
                process.stdout.close()
            raise
        log.debug("simulator pid %d listening on %s", process.pid, url)
        return cls(process, url, log_path)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; reap. Returns the exit status."""
        code = _terminate(self.process, timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code

    def requests(self) -> list[dict[str, Any]]:
        """The request log's entries so far (a line still being written is skipped)."""
        if self.request_log is None:
            raise ValueError("the simulator was started without request_log")
        try:
            data = self.request_log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        entries = []
        for line in data.splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                entries.append(json.loads(line))
        return entries

    @property
    def url(self) -> str:
        """The server root (``base_url`` without ``/v1``), e.g. for ``/health``."""
        return self.base_url[: -len("/v1")]

    def __enter__(self) -> SimServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SimServer(pid={self.process.pid}, base_url={self.base_url!r})"


def _read_ready(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The URL from the server's one stdout line, waiting at most ``timeout`` seconds."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimStartError(f"the simulator did not start within {timeout:g} s")
            if not selector.select(left):
                continue
            data = os.read(fd, 4096)
            if not data:
                code = process.wait()
                raise SimStartError(f"the simulator exited with status {code} before "
                                    "listening (see its stderr)")
            buf += data
    line = buf.split(b"\n", 1)[0].strip()
    if not line.startswith(_READY_PREFIX):
        raise SimStartError(f"unexpected first line from the simulator: {line[:200]!r}")
    return line[len(_READY_PREFIX):].decode()


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("simulator pid %d ignored SIGTERM: killing it", process.pid)
            process.kill()
    return process.wait()
