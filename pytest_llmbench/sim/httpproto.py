"""A minimal HTTP/1.1 server connection on ``asyncio.Protocol``.

Why hand-written: the simulator must carry several hundred concurrent connections on two
cores next to the benchmark that loads it, with the standard library only. A bare
``asyncio.Protocol`` costs far less per request than ``asyncio.StreamReader``/``Writer`` or
``http.server`` threads, and it gives direct control of the transport, which the fault
injection needs (abortive close with a TCP reset, writing nothing until the client leaves,
stalling a response half-way).

Supported: keep-alive, requests one at a time per connection (pipelined requests wait in
the buffer), ``Content-Length`` bodies, ``Expect: 100-continue``, fixed-length and
chunked responses. Not supported: chunked request bodies (answered 501).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from http import HTTPStatus

log = logging.getLogger("pytest_llmbench.sim.http")

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 32 * 1024 * 1024


class Request:
    """One parsed request. Header names are lower-case; the last occurrence wins."""

    __slots__ = ("method", "path", "query", "version", "headers", "body")

    def __init__(self, method: str, target: str, version: str,
                 headers: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path, _, self.query = target.partition("?")
        self.version = version
        self.headers = headers
        self.body = body

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


Handler = Callable[[Request, "Connection"], Awaitable[None]]


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Status"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


class Connection(asyncio.Protocol):
    """One client connection: parses requests and runs ``handler`` for each, in order.

    The handler answers through ``respond`` (fixed length) or ``start_chunked`` /
    ``send_chunk`` / ``end_chunked``; it may also ``reset`` the connection or wait in
    ``wait_gone`` for the client to leave. The connection is closed after the handler when
    the request or the handler asked for it (``close_after``).
    """

    def __init__(self, handler: Handler, registry: set[Connection]) -> None:
        self._handler = handler
        self._registry = registry
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._gone: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._continue_sent = False
        self._eof = False
        self.close_after = False
        self.sent_anything = False

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._gone = asyncio.get_running_loop().create_future()
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._task is None:
            self._dispatch()
        elif len(self._buf) > MAX_HEADER_BYTES + MAX_BODY_BYTES:
            self.abort()

    def eof_received(self) -> bool:
        # The client half-closed: it cannot send another request. Finish the one in
        # progress (keep the transport open for writing), otherwise close.
        self._eof = True
        self._mark_gone()
        if self._task is None:
            self._dispatch()
        return self._task is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        self._mark_gone()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- request parsing -------------------------------------------------------------------

    def _dispatch(self) -> None:
        request = self._parse()
        if request is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(request))
        elif self._eof and self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _parse(self) -> Request | None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEADER_BYTES:
                self._fail(431, "request headers too large")
            return None
        try:
            head = self._buf[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, target, version = lines[0].split(" ")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        except ValueError:
            self._fail(400, "malformed request head")
            return None
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(501, "chunked request bodies are not supported; send Content-Length")
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY_BYTES:
            self._fail(400 if length < 0 else 413, "bad Content-Length")
            return None
        start = end + 4
        if len(self._buf) < start + length:
            if (not self._continue_sent and self._transport is not None
                    and headers.get("expect", "").lower() == "100-continue"):
                self._continue_sent = True
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            return None
        body = bytes(self._buf[start:start + length])
        del self._buf[:start + length]
        self._continue_sent = False
        return Request(method, target, version, headers, body)

    def _fail(self, status: int, message: str) -> None:
        error = {"message": message, "type": "invalid_request_error", "code": None}
        body = json.dumps({"error": error}).encode()
        self.close_after = True
        self.respond(status, body, content_type="application/json")
        self.close()

    async def _run(self, request: Request) -> None:
        self.sent_anything = False
        self.close_after = self.close_after or not request.keep_alive or self._eof
        try:
            await self._handler(request, self)
        except asyncio.CancelledError:
            return  # connection lost: nothing left to do
        except Exception:
            log.exception("handler failed for %s %s", request.method, request.path)
            if not self.sent_anything:
                self.close_after = True
                self.respond(500, b'{"error": {"message": "simulator bug", '
                                  b'"type": "server_error", "code": null}}',
                             content_type="application/json")
            self.close()
            return
        finally:
            self._task = None
        if self.close_after or self._eof:
            self.close()
        elif self._buf:
            self._dispatch()

    # -- writing ---------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
            self.sent_anything = True

    def _head(self, headers: dict[str, str] | None, extra: str) -> str:
        lines = [f"{name}: {value}\r\n" for name, value in (headers or {}).items()]
        lines.append(extra)
        lines.append("Connection: close\r\n" if self.close_after
                     else "Connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines)

    def respond(self, status: int, body: bytes, *, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> None:
        """Send a complete response with a ``Content-Length`` body."""
        extra = f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self._write(_status_line(status) + self._head(headers, extra).encode() + body)

    def start_chunked(self, status: int, *, content_type: str,
                      headers: dict[str, str] | None = None, first: bytes = b"") -> None:
        """Send the head of a chunked response, and optionally a first chunk with it."""
        extra = f"Content-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n"
        data = _status_line(status) + self._head(headers, extra).encode()
        self._write(data + (chunk(first) if first else b""))

    def send_chunks(self, parts: list[bytes], *, last: bool = False) -> None:
        """Send ``parts`` as chunks in one write; ``last`` also terminates the body."""
        data = b"".join(chunk(p) for p in parts if p)
        self._write(data + b"0\r\n\r\n" if last else data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._writable is not None and not self._writable.done():
            await self._writable

    async def wait_gone(self) -> None:
        """Return when the client closed (or half-closed) its side of the connection."""
        if self._gone is not None:
            await asyncio.shield(self._gone)

    def _mark_gone(self) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    def reset(self) -> None:
        """Close abruptly: SO_LINGER 0 makes the kernel send a TCP RST, not a FIN."""
        if self._transport is None:
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed by the peer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()

    def close(self) -> None:
        """Close gracefully once buffered data is written."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of ``data`` (which must not be empty)."""
    return b"%x\r\n%s\r\n" % (len(data), data)
