"""A circuit breaker per endpoint, shared by every process of a run and by concurrent runs.

When an endpoint is down, every item would otherwise pay its full retries against it (the
user's runner had no breaker: seed ``001_...``). The breaker counts *consecutive* failures
that say "the endpoint is not serving" (connection errors, attempt timeouts, 5xx, and a
Retry-After beyond the configured maximum); after ``threshold`` of them it **opens**: callers
are refused at once (``EndpointDown``) and go to a fallback endpoint or end as
``endpoint_down``. After ``cooldown`` seconds one caller is granted a **probe** (half-open);
its success closes the breaker, its failure opens it for another cool-down. A probe whose
holder never reports (killed item) expires after ``probe_timeout`` and another caller probes.

State lives beside the rate limiter's (``<root>/breakers/<key>.json``, key: a hash of the
base URL), read-modify-written under an exclusive ``flock`` held for microseconds, the same
pattern as :mod:`pytest_llmbench.coord.ratelimit`. Times are ``time.monotonic()`` (one clock
for every process of the machine); state from another boot is discarded.

The usual state, closed with no failure counted, is read without the lock: then ``allow``
grants and a success changes nothing, so neither writes. Every attempt of every item took
the lock twice before, and at 128 items in flight the lock (and the per-process mutex in
front of it) became a queue: a holder descheduled in a burst of answers held up every other
item thread of the machine (a sampling profile of the item hosts found ~9 % of their
threads' time in it). A read that is torn or finds the file empty (never written, or
mid-write) takes the lock, as does any other state.

Log lines (WARNING): ``[CircuitOpen] <url>: <n> consecutive failures (last: ...)``,
``[CircuitClosed] <url>: probe succeeded after <s> s open, <k> calls refused``.

Raises ``errors.EndpointDown`` (error class ``endpoint_down``) when the breaker refuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_llmbench.coord.identity import boot_id
from pytest_llmbench.errors import EndpointDown

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker", "EndpointDown", "breaker_key"]

log = logging.getLogger("pytest_llmbench.coord.breaker")

PROBE_POLL = 0.05
"""Seconds between looks at a half-open breaker while another caller's probe runs."""

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int = 5
    """Consecutive failures that open the breaker."""
    cooldown: float = 30.0
    """Seconds the breaker stays open before one probe is let through."""
    probe_timeout: float = 120.0
    """Seconds after which an unanswered probe (its item killed) is given to another caller."""


@dataclass(frozen=True)
class BreakerState:
    state: str
    failures: int
    opens: int
    refused: int
    last_error: str


def breaker_key(url: str) -> str:
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


def _fresh() -> dict[str, Any]:
    return {"state": CLOSED, "failures": 0, "opened_at": 0.0, "probe_until": 0.0,
            "opens": 0, "refused": 0, "last_error": "", "boot": boot_id()}


_BREAKERS: dict[tuple[str, BreakerPolicy], CircuitBreaker] = {}


def _shared_breaker(root: str, policy: BreakerPolicy) -> CircuitBreaker:
    """The breaker an unpickled job gets: one per process and configuration, so an item host
    keeps its state files open from one item to the next."""
    breaker = _BREAKERS.get((root, policy))
    if breaker is None:
        breaker = _BREAKERS[(root, policy)] = CircuitBreaker(Path(root), policy)
    return breaker


class CircuitBreaker:
    """Shared breakers under ``root``; picklable (item hosts get it with their job)."""

    def __init__(self, root: Path, policy: BreakerPolicy | None = None) -> None:
        self.root = Path(root)
        self.policy = policy or BreakerPolicy()
        self._fds: dict[str, int] = {}
        self._fds_pid = os.getpid()
        self._mutex = threading.RLock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_shared_breaker, (str(self.root), self.policy))

    def __repr__(self) -> str:
        return f"CircuitBreaker({str(self.root)!r}, {self.policy!r})"

    # -- the two calls around an attempt -----------------------------------------------

    def allow(self, url: str) -> bool:
        """May a request go to ``url`` now? Raises ``EndpointDown`` when it may not.

        Returns True when this caller holds the probe of a half-open breaker (its outcome
        decides), False for an ordinary grant."""
        if self._calm(url):
            return False
        now = time.monotonic()
        with self._locked(url) as st:
            if st["state"] == CLOSED:
                return False
            probing = st["state"] == HALF_OPEN and now < st["probe_until"]
            if now - st["opened_at"] < self.policy.cooldown or probing:
                st["refused"] += 1
                exc = EndpointDown(url, f"{st['failures']} consecutive failures, "
                                   f"last: {st['last_error']}")
                exc.probing = probing
                raise exc
            st["state"] = HALF_OPEN
            st["probe_until"] = now + self.policy.probe_timeout
            return True

    def wait_allow(self, url: str, deadline: float | None) -> bool:
        """``allow``, but while another caller's probe decides, wait for its outcome (polling
        every ``PROBE_POLL`` s, until ``deadline``, absolute monotonic) rather than fail:
        the endpoint may well be back."""
        while True:
            try:
                return self.allow(url)
            except EndpointDown as exc:
                left = None if deadline is None else deadline - time.monotonic()
                if not exc.probing or (left is not None and left < PROBE_POLL):
                    raise
                time.sleep(PROBE_POLL)

    def record(self, url: str, *, ok: bool, error: str = "") -> None:
        """The outcome of an attempt to ``url`` that ``allow`` let through.

        ``ok=False`` only for failures that say the endpoint is not serving (the caller
        decides: connection errors, timeouts, 5xx, Retry-After past the maximum)."""
        if ok and self._calm(url):
            return  # closed, nothing counted: a success changes nothing
        now = time.monotonic()
        with self._locked(url) as st:
            if ok:
                if st["state"] != CLOSED:
                    log.warning("[CircuitClosed] %s: probe succeeded after %.1f s open, %d "
                                "call(s) refused", url, now - st["opened_at"], st["refused"])
                st.update(state=CLOSED, failures=0, refused=0, probe_until=0.0)
                return
            st["failures"] += 1
            st["last_error"] = error[:200]
            reopen = st["state"] == HALF_OPEN
            if reopen or (st["state"] == CLOSED and st["failures"] >= self.policy.threshold):
                if st["state"] == CLOSED:
                    st["opens"] += 1
                    log.warning("[CircuitOpen] %s: %d consecutive failures (last: %s); "
                                "requests refused for %g s", url, st["failures"],
                                st["last_error"], self.policy.cooldown)
                st.update(state=OPEN, opened_at=now, probe_until=0.0)

    def release_probe(self, url: str) -> None:
        """The probe holder ended without an outcome (e.g. a 4xx): let another caller probe."""
        with self._locked(url) as st:
            if st["state"] == HALF_OPEN:
                st["probe_until"] = 0.0

    def state(self, url: str) -> BreakerState:
        with self._locked(url) as st:
            return BreakerState(st["state"], st["failures"], st["opens"], st["refused"],
                                st["last_error"])

    # -- shared state -------------------------------------------------------------------

    def _calm(self, url: str) -> bool:
        """The breaker of ``url`` is closed with no failure counted, read without the lock
        (a read that races a writer sees the state before or after the write, or a torn or
        empty file: not calm, so the caller takes the lock)."""
        fd = self._fds.get(url) if self._fds_pid == os.getpid() else None
        if fd is None:
            return False  # opened (and written once) under the lock first
        try:
            st = json.loads(os.pread(fd, 65536, 0))
        except (OSError, ValueError):
            return False
        return (isinstance(st, dict) and st.get("state") == CLOSED and st.get("failures") == 0
                and st.get("boot") == boot_id())

    def _fd(self, url: str) -> int:
        """This process's descriptor of ``url``'s state file, kept open: every attempt
        takes the lock twice. A flock belongs to an open file description, which a forked
        child shares with its parent, so a child opens its own; a file removed meanwhile
        (the cache cleared) is opened again."""
        pid = os.getpid()
        if self._fds_pid != pid:
            self._fds, self._fds_pid = {}, pid  # the parent's stay open: it uses them
        fd = self._fds.get(url)
        if fd is not None:
            try:
                if os.fstat(fd).st_nlink > 0:
                    return fd
            except OSError:
                pass
            with contextlib.suppress(OSError):
                os.close(fd)
        directory = self.root / "breakers"
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / f"{breaker_key(url)}.json", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)
        self._fds[url] = fd
        return fd

    @contextlib.contextmanager
    def _locked(self, url: str) -> Iterator[dict[str, Any]]:
        with self._mutex:  # threads of one process share the descriptor, hence its flock
            fd = self._fd(url)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                st, valid = self._read(fd)
                before = dict(st) if valid else None  # a fresh state is written once
                try:
                    yield st
                finally:  # a refusal raises inside the block and still counts
                    if st != before:
                        data = json.dumps(st).encode()
                        os.ftruncate(fd, 0)
                        os.pwrite(fd, data, 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _read(fd: int) -> tuple[dict[str, Any], bool]:
        """The state, and whether the file held it (else a fresh state, to be written)."""
        raw = b""
        while chunk := os.pread(fd, 65536, len(raw)):
            raw += chunk
        try:
            st = json.loads(raw) if raw else None
        except ValueError:  # a torn file from a crash mid-write: start over
            st = None
        fresh = _fresh()
        if not isinstance(st, dict) or st.get("boot") != fresh["boot"] or set(st) != set(fresh):
            return fresh, False
        return st, True
