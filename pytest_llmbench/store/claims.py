"""Claims: who runs an item right now (``ClaimHolder``), and what ``Store.claim`` answers."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pytest_llmbench.coord.identity import ProcessIdentity
from pytest_llmbench.records import ItemResult


@dataclass(frozen=True, kw_only=True)
class ClaimHolder(ProcessIdentity):
    """Who runs an item: a process (``coord.identity``: pid, start time, host) and the run."""

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
        me = ProcessIdentity.of(pid)
        return cls(
            pid=me.pid,
            start_time=me.start_time,
            host=me.host,
            run_id=run_id,
            claimed_at=time.time(),
            deadline=deadline,
        )

    # Ownership is by process, not by run (``same_process``): a process may re-claim what
    # it holds. A holder on another host counts as alive until its deadline (``Store.claim``).

    def busy(self, now: float) -> bool:
        """The holder may still finish the item: its process is alive (a holder on another
        host always counts as alive) and within its deadline. Anything else is taken over:
        at once if dead or remote, after killing it if it is a local process past its
        deadline (``overdue``)."""
        return now <= self.deadline and self.is_alive()

    def to_dict(self) -> dict[str, Any]:
        # Every field is a scalar: no deep copy (``dataclasses.asdict``) for each claim.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClaimHolder:
        try:
            holder = cls(
                **ProcessIdentity.fields_from(data),
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
