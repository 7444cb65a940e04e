"""Rate limits per endpoint, shared by every process of a run and by concurrent runs.

Every item runs in its own forked child, so a limit kept in memory would be a limit per
item. An endpoint's state (key: :func:`endpoint_key`, a hash of base URL + model) lives in
``<root>/limits/<key>.json``, read-modify-written under an exclusive ``flock`` on
``<key>.lock``, held for microseconds, never across a sleep or a request. Endpoints share
no lock, so unrelated work never waits. The design and its proofs: ``docs/rate-limits.md``.

* **rpm**: GCRA in reservation form. A request is granted at ``g = max(now, tat - tau,
  blocked_until)`` and moves ``tat`` to ``max(tat, g) + T``; the caller reserves under the
  lock and sleeps until ``g`` outside it (one lock round trip per request, FIFO across
  processes). With burst ``C = max(1, floor(Q/30))`` and ``T = (W + J)/(Q + 1 - C)``,
  ``tau = (C-1) T``, no interval of ``W + J`` seconds holds more than ``Q`` grants: no
  server window of ``W`` (60 s) exceeds the quota even for requests arriving ``J`` (1 s)
  late. Cost: ~4 % of the quota.
* **tpm**: the same with weights: a request costs its estimated tokens (it may overdraw a
  smaller bucket, so it is never starved); ``on_response`` corrects by the tokens used.
* **429 (AIMD)**: ``blocked_until = now + Retry-After`` is obeyed by everyone (a request
  already reserved re-checks it after its sleep); the shared ``scale`` on rpm and tpm
  halves, once per burst of 429s, down to ``max(5 %, 1 request per 10 s)``; each success
  adds 2/3 request per minute (half to full in about a minute). With no rpm configured,
  a 429 only blocks every process for its Retry-After (no rate is guessed).
* **max_connections**: a request holds a ``flock`` on one of ``<key>.conn.<i>`` from
  ``before_request`` to ``on_response``; the kernel frees it if the holder dies.

Times are ``time.monotonic()``: one clock for every process of the machine, immune to
wall-clock steps; state from before a reboot (another boot id) is discarded.

Exceptions::

    LLMBenchError
    └── RateLimitWait      the grant would come after the caller's deadline
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from pytest_llmbench.coord.identity import boot_id
from pytest_llmbench.errors import LLMBenchError
from pytest_llmbench.records import ModelSpec

__all__ = [
    "RateLimitWait",
    "LimitState",
    "SharedLimiter",
    "default_root",
    "endpoint_key",
]

log = logging.getLogger("pytest_llmbench.coord.ratelimit")

WINDOW = 60.0
"""Seconds of the server's quota window that ``rpm``/``tpm`` refer to."""
BURST_FRACTION = 1 / 30
"""Burst allowance as a fraction of the window (2 s of a minute)."""
JITTER_FRACTION = 1 / 60
"""Delay between grant and arrival at the server that the bound tolerates (1 s of 60)."""
DECREASE = 0.5
"""Multiplicative decrease of the shared scale on a 429."""
MIN_SCALE = 0.05
"""The scale never drops below this fraction of the configured rate ..."""
MIN_INTERVAL = 10.0
"""... nor below one request per this many seconds (at a 60 s window)."""
INCREASE = 2 / 3
"""Additive increase per success, in requests per window: from half to full rate in about
one window when the rate is used (half the quota at an average 3/4 of it: 0.5/0.75 = 2/3)."""
RETRY_AFTER_CAP = 60.0
"""A shared block never lasts longer than this (a bogus Retry-After must not stall a run)."""
DEFAULT_BLOCK = 1.0
"""Shared block after a 429 that carried no Retry-After."""

_EPS = 1e-6
_STATE_PAD = 1024  # state files are padded: a kill mid-update never leaves a torn tail
_POLL_MIN, _POLL_MAX = 0.001, 0.02
_FORMAT = 1


class RateLimitWait(LLMBenchError):
    """A grant (rate, tokens, connection slot or shared Retry-After) would come only after
    the caller's deadline; nothing was reserved. The API layer fails the attempt as a timeout.
    """

    def __init__(self, model: str, wait: float, reason: str) -> None:
        self.model, self.wait, self.reason = model, wait, reason
        super().__init__(
            f"rate limit of model {model!r}: the next {reason} grant is {wait:.2f} s away, "
            "past the deadline")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model, self.wait, self.reason))


@dataclass(frozen=True, kw_only=True)
class LimitState:
    """A snapshot of one endpoint's shared state, as seen by one caller's ModelSpec."""

    key: str
    scale: float
    """Shared AIMD factor in ``(0, 1]`` applied to the configured (or learned) limits."""
    rpm: float | None
    """Effective requests per window now (``None``: unlimited)."""
    tpm: float | None
    """Effective tokens per window now (``None``: unlimited)."""
    learned_rpm: float | None
    """The rpm learned at a 429 when none is configured."""
    blocked_until: float
    """``time.monotonic()`` before which nobody sends (0 when never blocked)."""
    blocked_by: int | None
    """Pid that reported the Retry-After in force."""
    last_cut: float
    """``time.monotonic()`` of the last multiplicative decrease (0 when none)."""
    recent_grants: float
    """Grants in about the last window (exponentially decayed): what a learned rpm starts
    from."""


def endpoint_key(model: ModelSpec) -> str:
    """The short hash naming an endpoint's state files: base URL + model id."""
    return hashlib.sha256(f"{model.base_url}\0{model.model}".encode()).hexdigest()[:16]


def default_root() -> Path:
    """A per-user directory every run on the machine shares (so concurrent runs share limits)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "pytest-llmbench"


_KEYS = frozenset({"v", "boot", "tat", "ttat", "scale", "learned", "blocked", "bpid", "cut",
                   "cnt", "cnt_t"})


def _well_formed(st: Any) -> TypeGuard[dict[str, Any]]:
    """A state in this module's format (whatever boot wrote it)."""
    return isinstance(st, dict) and st.keys() == _KEYS and st["v"] == _FORMAT


def _fresh_state() -> dict[str, Any]:
    return {"v": _FORMAT, "boot": boot_id(), "tat": 0.0, "ttat": 0.0, "scale": 1.0,
            "learned": None, "blocked": 0.0, "bpid": None, "cut": 0.0, "cnt": 0.0,
            "cnt_t": 0.0}


def _encode(st: dict[str, Any]) -> bytes:
    """JSON of the state, formatted by hand: 3-4x cheaper than ``json.dumps`` on this path."""
    learned = "null" if st["learned"] is None else repr(float(st["learned"]))
    bpid = "null" if st["bpid"] is None else str(int(st["bpid"]))
    return (f'{{"v":{_FORMAT},"boot":{json.dumps(str(st["boot"]))},"tat":{float(st["tat"])!r},'
            f'"ttat":{float(st["ttat"])!r},"scale":{float(st["scale"])!r},"learned":{learned},'
            f'"blocked":{float(st["blocked"])!r},"bpid":{bpid},"cut":{float(st["cut"])!r},'
            f'"cnt":{float(st["cnt"])!r},"cnt_t":{float(st["cnt_t"])!r}}}').encode()


@dataclass
class _Held:
    """What one thread's current request holds between before_request and on_response."""

    key: str
    slot: int | None
    reserved: float
    """When the grant was reserved: a 429 for a request reserved before the last cut was
    sent at the old rate and must not cut again."""
    granted: float
    est_tokens: int


@dataclass
class _Files:
    """One process's open descriptors for one endpoint."""

    lock_fd: int
    state_fd: int
    mutex: threading.Lock = field(default_factory=threading.Lock)
    conn_fds: dict[int, int] = field(default_factory=dict)
    conn_held: set[int] = field(default_factory=set)
    wait_fd: int = -1
    scale_seen: float = 1.0
    """Scale read at the last update: lets a plain success skip the lock entirely."""
    learned_seen: bool = False


class _Proc:
    """Per-process resources. ``flock`` belongs to the open file description, which a fork
    shares, so a child must never lock through its parent's descriptors: everything here is
    rebuilt when the pid changes."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.mutex = threading.Lock()
        self.files: dict[str, _Files] = {}
        self.held: dict[int, _Held] = {}


@dataclass
class _Txn:
    state: dict[str, Any]
    dirty: bool = False


_LIMITERS: dict[tuple[str, float], SharedLimiter] = {}


def _shared_limiter(root: str, window: float) -> SharedLimiter:
    """The limiter an unpickled job gets: one per process and configuration, so an item host
    keeps its open state files from one item to the next (opening them for every item cost
    two ``open`` calls per request). A forked process reopens its own (``_proc``)."""
    limiter = _LIMITERS.get((root, window))
    if limiter is None:
        limiter = _LIMITERS[(root, window)] = SharedLimiter(Path(root), window=window)
    return limiter


class SharedLimiter:
    """Implements ``api.RateLimiter`` for every process that shares ``root``.

    One request at a time per thread: ``before_request`` reserves (and holds a connection
    slot), the matching ``on_response`` from the same thread reports and releases. A thread
    that calls ``before_request`` again without reporting first releases its stale slot.
    ``window`` is the quota window in seconds (60: rpm and tpm are per minute); tests shrink
    it to exercise minute-long behaviour in seconds.
    """

    def __init__(self, root: Path, *, window: float = WINDOW) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.root = Path(root)
        self.dir = self.root / "limits"
        self.window = window
        self.burst = window * BURST_FRACTION
        self.jitter = window * JITTER_FRACTION
        self._prefix = os.path.join(str(self.dir), "")
        self._keys: dict[tuple[str, str], str] = {}
        self._state_fds: dict[str, int] = {}
        self._proc_state = _Proc()
        self._create_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SharedLimiter(root={str(self.root)!r}, window={self.window:g})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Sent to the fork server with a job: only the configuration travels; every process
        # opens its own state files (flocks belong to open file descriptions).
        return (_shared_limiter, (str(self.root), self.window))

    # --- the RateLimiter protocol ---------------------------------------------------------

    def before_request(self, model: ModelSpec, est_tokens: int, *,
                       deadline: float | None = None) -> None:
        """Block until ``model``'s endpoint may be sent one more request.

        ``deadline`` is an absolute ``time.monotonic()``: when the grant would come later,
        raise :class:`RateLimitWait` at once (nothing reserved, nothing held).
        """
        self.release()  # a previous request of this thread that was never reported
        proc, me = self._proc(), threading.get_ident()
        key = self._key(proc, model)
        files = self._files(proc, key)
        if not (model.rpm or model.tpm or model.max_connections):
            # No limit configured: only a shared Retry-After can hold the request back, and
            # that is a read, not a reservation. The locked read-modify-write of the state
            # cost an item ~0.1 ms of CPU per request, with every item host of every run on
            # the machine taking turns on one flock. A torn read (a concurrent write) is
            # unreadable and takes the locked path below; one that missed a Retry-After
            # written just now lets one request through, as a request sent an instant
            # before the 429 arrived would have gone.
            st = self._peek(files.state_fd)
            if st is not None and st["learned"] is None and float(st["blocked"]) <= (
                    now := time.monotonic()):
                files.scale_seen = float(st["scale"])
                files.learned_seen = False
                proc.held[me] = _Held(key, None, now, now, max(0, est_tokens))
                return
        slot = None
        if model.max_connections:
            slot = self._acquire_conn(files, key, model, deadline)
        try:
            reserved, granted = self._reserve(files, model, max(0, est_tokens), deadline)
        except BaseException:
            if slot is not None:
                self._release_conn(files, slot)
            raise
        proc.held[me] = _Held(key, slot, reserved, granted, max(0, est_tokens))

    def on_response(self, model: ModelSpec, status: int, retry_after: float | None,
                    tokens: int) -> None:
        """Report the attempt begun by this thread's last ``before_request``; release its slot.

        ``status`` 0 means no HTTP response (timeout, connection error): nothing is learned.
        """
        proc = self._proc()
        held = proc.held.pop(threading.get_ident(), None)
        key = self._key(proc, model)
        files = self._files(proc, key)
        if held is not None:
            self._release(proc, held)
        if status == 429 or (status == 503 and retry_after is not None):
            self._on_throttled(files, model, status, retry_after,
                               None if held is None else held.reserved)
        elif 200 <= status < 300:
            correction = (tokens - held.est_tokens) if (held and model.tpm and tokens) else 0
            if files.scale_seen < 1.0 or files.learned_seen or correction:
                self._on_success(files, model, correction)

    # --- other public API -----------------------------------------------------------------

    def release(self) -> None:
        """Release the calling thread's connection slot without reporting (idempotent)."""
        proc = self._proc()
        held = proc.held.pop(threading.get_ident(), None)
        if held is not None:
            self._release(proc, held)

    def grant_time(self) -> float | None:
        """``time.monotonic()`` at which the calling thread's current request was granted
        (between ``before_request`` and ``on_response``; else None). For logs and tests."""
        held = self._proc().held.get(threading.get_ident())
        return None if held is None else held.granted

    @contextlib.contextmanager
    def slot(self, model: ModelSpec, est_tokens: int = 0, *,
             deadline: float | None = None) -> Iterator[None]:
        """``before_request`` on entry; on exit the slot is released on every path. Call
        ``on_response`` inside the block to report the outcome (it releases early)."""
        self.before_request(model, est_tokens, deadline=deadline)
        try:
            yield
        finally:
            self.release()

    def state(self, model: ModelSpec) -> LimitState:
        """The endpoint's shared state as it applies to ``model``'s configured limits."""
        key = endpoint_key(model)
        with self._locked(self._files(self._proc(), key)) as txn:
            st = txn.state
        quota = self._quota(model, st)
        scale = float(st["scale"])
        return LimitState(
            key=key, scale=scale,
            rpm=None if quota is None else quota * scale,
            tpm=None if not model.tpm else model.tpm * scale,
            learned_rpm=st["learned"], blocked_until=float(st["blocked"]),
            blocked_by=st["bpid"], last_cut=float(st["cut"]),
            recent_grants=float(st["cnt"]) * math.exp(
                -max(0.0, time.monotonic() - float(st["cnt_t"])) / self.window))

    # --- reservation ------------------------------------------------------------------------

    def _reserve(self, files: _Files, model: ModelSpec, cost: int,
                 deadline: float | None) -> tuple[float, float]:
        """Reserve a grant time under the lock, sleep until it outside.

        Returns (when reserved, grant time), both ``time.monotonic()``.
        """
        while True:
            now = time.monotonic()
            with self._locked(files) as txn:
                st = txn.state
                blocked = float(st["blocked"])
                grant, reason = now, "request"
                if blocked > grant:
                    grant, reason = blocked, "retry-after"
                req = self._req_params(model, st)
                if req is not None:
                    interval, tau = req
                    if st["tat"] - tau > grant:
                        grant, reason = st["tat"] - tau, "request"
                tok = self._tok_params(model, st)
                if tok is not None:
                    per_token, tau_t = tok
                    if st["ttat"] - tau_t > grant:
                        grant, reason = st["ttat"] - tau_t, "token"
                if deadline is not None and grant > deadline:
                    raise RateLimitWait(model.name, grant - now, reason)
                if req is not None:
                    st["tat"] = max(float(st["tat"]), grant) + interval
                if tok is not None:
                    st["ttat"] = max(float(st["ttat"]), grant) + cost * per_token
                decay = math.exp(-max(0.0, grant - float(st["cnt_t"])) / self.window)
                st["cnt"] = float(st["cnt"]) * decay + 1.0
                st["cnt_t"] = grant
                txn.dirty = True
                own = st["bpid"] == os.getpid()
                files.scale_seen = float(st["scale"])
                files.learned_seen = st["learned"] is not None
            wait = grant - now
            if wait <= 0:
                return now, grant
            if reason == "retry-after":
                log.info("[RateLimit] model=%s waiting %.1f s (Retry-After%s)", model.name,
                         wait, "" if own else " from another process")
            elif wait > 1.0:
                log.debug("[RateLimit] model=%s waiting %.2f s for a %s grant", model.name,
                          wait, reason)
            time.sleep(wait)
            # A 429 may have arrived while we slept: its Retry-After binds us too.
            with self._locked(files) as txn:
                blocked = float(txn.state["blocked"])
            if blocked <= time.monotonic():
                return now, grant

    def _quota(self, model: ModelSpec, st: dict[str, Any]) -> float | None:
        if model.rpm:
            return float(model.rpm)
        learned = st["learned"]
        return None if learned is None else float(learned)

    def _req_interval(self, quota: float) -> tuple[float, float]:
        burst = max(1, math.floor(quota * self.burst / self.window))
        interval = (self.window + self.jitter) / max(quota + 1 - burst - _EPS, _EPS)
        return interval, (burst - 1) * interval

    def _req_params(self, model: ModelSpec, st: dict[str, Any]) -> tuple[float, float] | None:
        """(T, tau) for the current scale, never looser than at full scale (the bound)."""
        quota = self._quota(model, st)
        if quota is None:
            return None
        full_t, full_tau = self._req_interval(quota)
        scale = float(st["scale"])
        if scale >= 1.0:
            return full_t, full_tau
        interval, tau = self._req_interval(quota * scale)
        return max(interval, full_t), min(tau, full_tau)

    def _tok_params(self, model: ModelSpec, st: dict[str, Any]) -> tuple[float, float] | None:
        """(seconds per token, tau) for tokens per window."""
        if not model.tpm:
            return None
        tpm = float(model.tpm) * min(1.0, float(st["scale"]))
        share = 1.0 - self.burst / self.window
        per_token = (self.window + self.jitter) / (tpm * share)
        return per_token, tpm * self.burst / self.window * per_token

    # --- feedback ---------------------------------------------------------------------------

    def _floor(self, quota: float) -> float:
        return min(1.0, max(MIN_SCALE, self.window / MIN_INTERVAL / quota))

    def _on_throttled(self, files: _Files, model: ModelSpec, status: int,
                      retry_after: float | None, reserved: float | None) -> None:
        now = time.monotonic()
        wait = DEFAULT_BLOCK if retry_after is None else min(max(0.0, retry_after),
                                                             RETRY_AFTER_CAP)
        cut: tuple[float | None, float] | None = None
        with self._locked(files) as txn:
            st = txn.state
            txn.dirty = True
            if now + wait > float(st["blocked"]):
                st["blocked"], st["bpid"] = now + wait, os.getpid()
            quota = self._quota(model, st)
            # Without a configured rpm/tpm only the shared Retry-After applies: a rate learned
            # from a few early grants halted whole runs after a single 429 (measured on the
            # example suites), so no rate is guessed.
            if (status == 429 and quota is not None
                    and (reserved is None or reserved >= float(st["cut"]))):
                before = quota * float(st["scale"])
                st["scale"] = max(self._floor(quota), float(st["scale"]) * DECREASE)
                st["cut"] = now
                cut = (before, quota * float(st["scale"]))
            files.scale_seen = float(st["scale"])
            files.learned_seen = st["learned"] is not None
        if cut is not None:
            log.info("[RateLimit] model=%s 429: rate %s -> %.4g rpm", model.name,
                     "unlimited" if cut[0] is None else f"{cut[0]:.4g}", cut[1])

    def _on_success(self, files: _Files, model: ModelSpec, correction: int) -> None:
        recovered: float | None = None
        with self._locked(files) as txn:
            st = txn.state
            if correction:
                tok = self._tok_params(model, st)
                if tok is not None:
                    st["ttat"] = float(st["ttat"]) + correction * tok[0]
                    txn.dirty = True
            quota = self._quota(model, st)
            scale = float(st["scale"])
            if scale < 1.0 and quota:
                scale = min(1.0, scale + INCREASE / quota)
                st["scale"] = scale
                txn.dirty = True
                if scale >= 1.0:
                    recovered = quota
                    if not model.rpm:
                        st["learned"] = None
            elif scale >= 1.0 and st["learned"] is not None and not model.rpm:
                st["learned"] = None
                txn.dirty = True
            files.scale_seen = scale
            files.learned_seen = st["learned"] is not None
        if recovered is not None:
            log.debug("[RateLimit] model=%s recovered to %s", model.name,
                      f"{recovered:.4g} rpm" if model.rpm else "unlimited (learned limit lifted)")

    # --- connection slots ---------------------------------------------------------------------

    def _acquire_conn(self, files: _Files, key: str, model: ModelSpec,
                      deadline: float | None) -> int:
        """Hold a slot lock. Waiters hold a shared flock on ``<key>.connwait``; a newcomer
        that sees them joins them, so quick re-acquirers cannot starve the pollers."""
        n = int(model.max_connections or 0)
        wait_path = f"{self._prefix}{key}.connwait"
        with files.mutex:
            if files.wait_fd < 0:
                files.wait_fd = os.open(wait_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(files.wait_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiters = True
            else:
                fcntl.flock(files.wait_fd, fcntl.LOCK_UN)
                waiters = False
        if not waiters:
            slot = self._try_conn(files, key, n)
            if slot is not None:
                return slot
        # Our own descriptor: threads of this process wait (and are seen) independently.
        marker = os.open(wait_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(marker, fcntl.LOCK_SH)
            pause, began = _POLL_MIN, time.monotonic()
            while True:
                now = time.monotonic()
                if deadline is not None and now + pause / 2 > deadline:
                    raise RateLimitWait(model.name, now - began, "connection")
                time.sleep(random.uniform(pause / 2, pause))
                slot = self._try_conn(files, key, n)
                if slot is not None:
                    return slot
                pause = min(pause * 2, _POLL_MAX)
        finally:
            os.close(marker)  # drops the shared lock

    def _try_conn(self, files: _Files, key: str, n: int) -> int | None:
        start = random.randrange(n)
        with files.mutex:
            for j in range(n):
                i = (start + j) % n
                if i in files.conn_held:  # our own fd: flock would not exclude a thread
                    continue
                fd = files.conn_fds.get(i)
                if fd is None:
                    fd = files.conn_fds[i] = os.open(f"{self._prefix}{key}.conn.{i}",
                                                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                                     0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                files.conn_held.add(i)
                return i
        return None

    def _release_conn(self, files: _Files, slot: int) -> None:
        with files.mutex:
            if slot in files.conn_held:
                fcntl.flock(files.conn_fds[slot], fcntl.LOCK_UN)
                files.conn_held.discard(slot)

    def _release(self, proc: _Proc, held: _Held) -> None:
        if held.slot is not None:
            self._release_conn(proc.files[held.key], held.slot)

    # --- files and the state lock -----------------------------------------------------------

    def _proc(self) -> _Proc:
        proc = self._proc_state
        if proc.pid != os.getpid():
            with self._create_lock:
                proc = self._proc_state
                if proc.pid != os.getpid():
                    # Forked: the parent's descriptors share its locks. Leave them open (the
                    # parent still uses them) and open our own.
                    proc = self._proc_state = _Proc()
        return proc

    def _key(self, proc: _Proc, model: ModelSpec) -> str:
        ident = (model.base_url, model.model)
        key = self._keys.get(ident)  # pure data: a forked child keeps using it
        if key is None:
            key = self._keys[ident] = endpoint_key(model)
        return key

    def _files(self, proc: _Proc, key: str) -> _Files:
        files = proc.files.get(key)
        if files is None:
            with proc.mutex:
                files = proc.files.get(key)
                if files is None:
                    # A forked child inherits the parent's state descriptor: pread/pwrite
                    # carry no lock, only the lock file needs a descriptor of its own.
                    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                    state_fd = self._state_fds.get(key)
                    if state_fd is None:
                        self.dir.mkdir(parents=True, exist_ok=True)
                        state_fd = os.open(f"{self._prefix}{key}.json", flags, 0o666)
                        self._state_fds[key] = state_fd
                    files = _Files(os.open(f"{self._prefix}{key}.lock", flags, 0o666),
                                   state_fd)
                    proc.files[key] = files
        return files

    @contextlib.contextmanager
    def _locked(self, files: _Files) -> Iterator[_Txn]:
        """The endpoint's state under its flock (and the mutex: threads share the fd)."""
        with files.mutex:
            fcntl.flock(files.lock_fd, fcntl.LOCK_EX)
            try:
                txn = _Txn(self._read(files.state_fd))
                yield txn
                if txn.dirty:
                    self._write(files.state_fd, txn.state)
            finally:
                fcntl.flock(files.lock_fd, fcntl.LOCK_UN)

    def _read(self, fd: int) -> dict[str, Any]:
        raw = os.pread(fd, _STATE_PAD + 1, 0)
        if len(raw) > _STATE_PAD:  # not written by us: start over (we hold the lock)
            log.warning("[RateLimit] oversized limit state: starting afresh")
            os.ftruncate(fd, 0)
            return _fresh_state()
        raw = raw.rstrip()
        if not raw:
            return _fresh_state()
        try:
            st = json.loads(raw.decode())
            if not _well_formed(st):
                raise ValueError("unknown format")
        except ValueError as exc:
            log.warning("[RateLimit] unreadable limit state (%s): starting afresh", exc)
            return _fresh_state()
        return st if self._current(st) else _fresh_state()

    def _peek(self, fd: int) -> dict[str, Any] | None:
        """The state read without the lock; ``None`` when it is not a whole state of ours
        (absent, torn by a concurrent write, another format or boot)."""
        try:
            raw = os.pread(fd, _STATE_PAD + 1, 0).rstrip()
            st = json.loads(raw) if raw and len(raw) <= _STATE_PAD else None
        except (OSError, ValueError):
            return None
        return st if _well_formed(st) and self._current(st) else None

    def _current(self, st: dict[str, Any]) -> bool:
        """Written during this boot: its monotonic times mean something now. Times far in
        the future come from another boot (when no boot id is available)."""
        if st["boot"] != boot_id():
            return False
        horizon = time.monotonic() + 86400.0
        return all(isinstance(st[k], (int, float)) and st[k] < horizon
                   for k in ("tat", "ttat", "blocked", "cut", "cnt_t"))

    def _write(self, fd: int, st: dict[str, Any]) -> None:
        data = _encode(st)
        if len(data) < _STATE_PAD:
            # One small pwrite over a padded file: no truncate, so no torn state on a kill.
            os.pwrite(fd, data.ljust(_STATE_PAD), 0)
        else:  # pragma: no cover - states are ~250 bytes
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
