"""Which item host a job goes to: the engine's live hosts and the placement policy over them.

A host (``inflight.Host``, ``child.host_main``) runs one item at a time, or up to
``host_threads`` ``shareable`` ones at once (``child._Shared``). The engine starts hosts
through the fork server and reads their pipes; this module only decides where a job runs
and keeps the hosts filed by what they can take next:

- *idle*: nothing in flight; any job may go there (the most recently idle first: its pages
  are warm);
- *open*: shareable items in flight and room for one more; only a shareable job sent with
  the same environment may join them;
- neither: busy with an item that has the host to itself, full, retired (its job pipe
  closed: ``HOST_MAX_ITEMS`` served, or it said ``leave``), or doomed (an item of it passed
  its deadline: killed once the others are done).

Shareable items first spread over as many hosts as the process may use CPUs (its affinity,
not the machine's count), then go to the least busy open host: a host runs Python on one
core at a time (its GIL), and 16 items at zero latency in one host took 6.2 s against
4.7-5.5 s in two.
"""

from __future__ import annotations

import contextlib
import os

from pytest_llmbench.engine.child import HOST_MAX_ITEMS
from pytest_llmbench.engine.inflight import Child, Host
from pytest_llmbench.engine.runner import Job

__all__ = ["HostPool", "usable_cpus"]


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a container's limit), not the
    machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class HostPool:
    """The engine's live item hosts, by request sequence number, filed idle or open."""

    def __init__(self, host_threads: int) -> None:
        self.hosts: dict[int, Host] = {}
        self.host_threads = max(1, host_threads)
        """How many ``shareable`` items one host runs at once (``child._Shared``)."""
        self.min_hosts = usable_cpus()
        """Shareable items spread over at least this many hosts before they share one."""
        self._idle: dict[int, Host] = {}
        """Hosts waiting for a job (a lookup per item start, not a scan of every host)."""
        self._open: dict[int, Host] = {}
        """Hosts running shareable items that have room for another."""

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    def add(self, host: Host) -> None:
        """A host just requested from the fork server (it takes a job at once)."""
        self.hosts[host.seq] = host

    def pick(self, job: Job, env: dict[str, str], *, can_start: bool) -> Host | None:
        """A live host for ``job``: an open one with the same environment (for a shareable
        job), else an idle one; None when a new one should be started (``can_start``: the
        fork server is up) or none can be had."""
        spread = len(self.hosts) < self.min_hosts and (self._idle or can_start)
        if job.shareable and self.host_threads > 1 and not spread:
            fits = [h for h in self._open.values() if h.env is env or h.env == env]
            if fits:
                return min(fits, key=lambda h: len(h.children))
        if self._idle:
            return self._idle.popitem()[1]
        return None

    def sent(self, host: Host, child: Child) -> None:
        """``child``'s job went to ``host``: count it, retire the host at ``HOST_MAX_ITEMS``
        and file it for the next job."""
        host.children[child.token] = child
        host.shared = child.job.shareable and self.host_threads > 1
        host.served += 1
        if host.served >= HOST_MAX_ITEMS:
            self.retire(host)  # it leaves after this job, once its items are done
        self.place(host)

    def place(self, host: Host) -> None:
        """File ``host`` where the next job looks for one: idle (nothing in flight), open
        (shareable items in flight, room for more), or neither."""
        self._idle.pop(host.seq, None)
        self._open.pop(host.seq, None)
        if host.jobs_fd < 0 or host.leaving or host.doomed or host.seq not in self.hosts:
            return
        if not host.children:
            self._idle[host.seq] = host
        elif host.shared and len(host.children) < self.host_threads:
            self._open[host.seq] = host

    @staticmethod
    def retire(host: Host) -> None:
        """No more jobs for ``host``: it leaves at the end of its job pipe, once the items
        it runs are done (their results still arrive on its own pipe)."""
        if host.jobs_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(host.jobs_fd)
            host.jobs_fd = -1

    def forget(self, host: Host) -> bool:
        """Take ``host`` out of the pool (dead, killed or leaving); whether it was in."""
        self._idle.pop(host.seq, None)
        self._open.pop(host.seq, None)
        return self.hosts.pop(host.seq, None) is not None
