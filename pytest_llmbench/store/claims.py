"""Claims: who runs an item right now (``ClaimHolder``), and what ``Store.claim`` answers."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pytest_llmbench.coord import proc
from pytest_llmbench.records import ItemResult


@dataclass(frozen=True, kw_only=True)
class ClaimHolder:
    """Who runs an item: a process named by pid *and* start time, so pid reuse is detected."""

    pid: int
    start_time: int
    """Clock ticks since boot (``/proc/PID/stat`` field 22); 0 when unknown."""
    host: str
    run_id: str
    claimed_at: float
    """Unix time of the claim."""
    deadline: float
    """Unix time after which a live holder is overdue (task deadline + grace)."""
    token: str = ""
    """The item process's ``LLMBENCH_ITEM_TOKEN``: lets an overdue claim's item be killed
    without touching the pytest process that holds it."""

    @classmethod
    def current(cls, *, run_id: str, deadline: float, pid: int | None = None) -> ClaimHolder:
        """A holder for this process (or ``pid`` on this host), claimed now."""
        pid = os.getpid() if pid is None else pid
        return cls(
            pid=pid,
            start_time=proc.process_start_time(pid) or 0,
            host=socket.gethostname(),
            run_id=run_id,
            claimed_at=time.time(),
            deadline=deadline,
        )

    def same_process(self, other: ClaimHolder) -> bool:
        """Ownership is by process, not by run: a process may re-claim what it holds."""
        return (self.host, self.pid, self.start_time) == (other.host, other.pid, other.start_time)

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether the holding process still exists; a holder on another host cannot be
        checked and counts as alive (until its deadline, see ``Store.claim``)."""
        if not self.is_local():
            return True
        # Zombies count as dead; a differing start time means the pid was reused.
        return proc.pid_alive(self.pid, self.start_time or None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClaimHolder:
        try:
            holder = cls(
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                host=str(data["host"]),
                run_id=str(data["run_id"]),
                claimed_at=float(data["claimed_at"]),
                deadline=float(data["deadline"]),
                token=str(data.get("token", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"bad claim record: {exc!r}") from None
        return holder


ClaimKind = Literal["claimed", "busy", "done", "overdue"]


@dataclass(frozen=True, kw_only=True)
class ClaimResult:
    """The answer of ``Store.claim``.

    - ``claimed``: the caller now holds the item and must run it (``took_over`` names the
      stale or forced holder it replaced, if any);
    - ``busy``: ``holder`` is alive and within its deadline: wait for its result;
    - ``overdue``: ``holder`` is alive but past its deadline: kill it, then claim with force;
    - ``done``: a final (non-error) ``result`` is stored: report it, run nothing.
    """

    kind: ClaimKind
    result: ItemResult | None = None
    holder: ClaimHolder | None = None
    took_over: ClaimHolder | None = None
