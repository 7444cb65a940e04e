"""Who holds something: a process named for good, the one rule for claims and leases.

A pid alone is not a name: ``pid_max`` can be as low as 32768, and a dead holder's pid is
soon another process's. So a holder is ``(host, pid, start time)``: the start time (clock
ticks after boot, ``/proc/PID/stat`` field 22) differs for a recycled pid. The rule, in one
place (the shape of filelock's ``_identity.py``):

* **unknown start time** is ``None`` (never 0: an old record's 0 is read as ``None``); then
  only the pid is checked;
* **on another host** a holder cannot be checked (liveness and signals are local): it counts
  as alive, and its owner's deadline is what ends its hold;
* **alive** means the process exists, is not a zombie (a leader whose main thread exited
  while other threads run is alive), and started when recorded.
"""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_llmbench.coord import proc


@functools.cache
def boot_id() -> str:
    """This boot's id, read once per process: state files keep monotonic times, which mean
    nothing after a reboot (the rate limits' and the circuit breakers')."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:  # not Linux: callers also bound the times they read
        return ""


def read_start_time(value: Any) -> int | None:
    """A recorded start time: ``None`` for unknown (missing, null, or an old record's 0)."""
    if value is None:
        return None
    number = int(value)
    return number or None


@dataclass(frozen=True, kw_only=True)
class ProcessIdentity:
    """A process on a host, named by pid and start time (see the module docstring)."""

    pid: int
    start_time: int | None
    """Clock ticks after boot; ``None`` when unknown."""
    host: str

    @classmethod
    def of(cls, pid: int | None = None) -> ProcessIdentity:
        """The identity of ``pid`` (default: the caller) on this host."""
        pid = os.getpid() if pid is None else pid
        return ProcessIdentity(pid=pid, start_time=proc.process_start_time(pid),
                               host=socket.gethostname())

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether the process still exists; one on another host counts as alive."""
        if not self.is_local():
            return True
        return proc.pid_alive(self.pid, self.start_time)

    def same_process(self, other: ProcessIdentity) -> bool:
        return (self.host, self.pid, self.start_time) == (other.host, other.pid, other.start_time)

    @staticmethod
    def fields_from(data: Mapping[str, Any]) -> dict[str, Any]:
        """The identity's fields read from a record (raises ``KeyError``/``ValueError``)."""
        return {"pid": int(data["pid"]), "start_time": read_start_time(data.get("start_time")),
                "host": str(data["host"])}
