"""Every socket operation of an attempt bounded by the attempt's wall deadline and byte cap.

httpx (under the openai SDK) applies its timeouts per operation: a read timeout of 30 s
allows a server that sends one byte every 29 s to hold an attempt for ever, and nothing
bounds the bytes of an answer. This module wraps the connection pool's network backend so
that every ``connect``, TLS handshake, ``write`` and ``read`` of an attempt gets at most the
time left until the attempt's deadline (so a dribble cannot outlive it), and every read
counts the bytes against the attempt's cap (past it the read fails and the connection is
dropped, so memory stays bounded). No watchdog thread: the limits are checked on the calling
thread, before and after each system call, like the ``_DeadlineReader`` of the transport
this replaced.

The attempt's limits live in a thread-local ``Guard`` set by ``guarding()`` around the SDK
call; outside a guard the wrapper passes everything through. ``install()`` is the one place
that touches a private attribute of httpcore (``ConnectionPool._network_backend``): httpx
exposes no parameter for the network backend, and ``tests/test_api.py`` fails if that ever
changes (the dribble and size tests would hang or pass the cap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore2
import httpx2

#: What a ``Guard`` counts towards ``too_large`` besides the body: status line and headers.
HEADER_ALLOWANCE = 64 * 1024


class Guard:
    """The limits of one attempt: absolute ``time.monotonic()`` deadline, byte cap."""

    __slots__ = ("cap", "deadline", "read", "too_large")

    def __init__(self, deadline: float, cap: int) -> None:
        self.deadline, self.cap = deadline, cap
        self.read = 0
        self.too_large = False


_local = threading.local()


@contextmanager
def guarding(guard: Guard) -> Iterator[Guard]:
    """Apply ``guard`` to every network operation of this thread inside the block."""
    previous = getattr(_local, "guard", None)
    _local.guard = guard
    try:
        yield guard
    finally:
        _local.guard = previous


def _time_left(timeout: float | None, error: type[Exception]) -> float | None:
    guard: Guard | None = getattr(_local, "guard", None)
    if guard is None:
        return timeout
    left = guard.deadline - time.monotonic()
    if left <= 0:
        raise error("attempt deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._inner.read(max_bytes, _time_left(timeout, httpcore2.ReadTimeout))
        guard: Guard | None = getattr(_local, "guard", None)
        if guard is not None:
            guard.read += len(data)
            if guard.read > guard.cap + HEADER_ALLOWANCE:
                guard.too_large = True
                raise httpcore2.ReadError("response too large")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _time_left(timeout, httpcore2.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _Stream(self._inner.start_tls(ssl_context, server_hostname,
                                             _time_left(timeout, httpcore2.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.NetworkBackend):
    def __init__(self, inner: httpcore2.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        # Name resolution inside is bounded by the resolver, not by this deadline (as
        # before); the task layer kills the item process if it hangs.
        return _Stream(self._inner.connect_tcp(
            host, port, _time_left(timeout, httpcore2.ConnectTimeout), local_address,
            socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None,
                            ) -> httpcore2.NetworkStream:
        return _Stream(self._inner.connect_unix_socket(
            path, _time_left(timeout, httpcore2.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def install(transport: httpx2.HTTPTransport) -> httpx2.HTTPTransport:
    """Route ``transport``'s connections (direct, HTTP(S) proxy or SOCKS) through the guard."""
    pool = transport._pool  # noqa: SLF001 - see the module docstring
    backend = pool._network_backend  # noqa: SLF001
    if not isinstance(backend, _Backend):
        pool._network_backend = _Backend(backend)  # noqa: SLF001
    return transport
