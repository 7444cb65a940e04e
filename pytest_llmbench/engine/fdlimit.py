"""Open files for K items in flight: raise the soft limit, or say which limit is too low.

Each item host costs the engine two pipe ends (jobs, results), and up to ``2 K`` hosts run
at once (``K`` items plus as many stragglers, ``inflight.Stragglers``); an item forked by
the pytest process itself costs a pipe end and a pidfd. The default soft limit is often
1024, which ran out at K ~ 250; the hard limit is usually far higher (systemd: 524288),
and any process may raise its soft limit up to it. The simulator, when the plugin starts
it, inherits the raised limit with the rest of the process's state: it holds a socket per
connection, one per item in flight of every worker.
"""

from __future__ import annotations

import logging
import resource

from pytest_llmbench.errors import ConfigError

log = logging.getLogger(__name__)

#: Descriptors the pytest process uses besides its item processes' (pytest's own files,
#: the store's locks, the fork server's socket, the simulator's pipes, sockets of tests).
BASE_FILES = 256


def files_needed(concurrency: int) -> int:
    """Open files a process running ``concurrency`` items at once may need at most."""
    return 4 * concurrency + BASE_FILES


def ensure_open_files(concurrency: int, *, strict: bool = True, processes: int = 1) -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to what ``processes`` x ``concurrency`` items in
    flight need (never lower it); the soft limit now.

    ``strict``: a hard limit below the need of this process's own items is a
    ``ConfigError`` naming the limit and the fix. (The xdist controller runs no items: its
    raise, for a simulator it may start, is best effort.)"""
    need = files_needed(concurrency * max(1, processes))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return int(soft)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            target = soft
        else:
            log.debug("raised the open-file soft limit from %d to %d", soft, target)
    if strict and target < files_needed(concurrency):
        most = max(1, (target - BASE_FILES) // 4)
        raise ConfigError(
            f"--llmbench-concurrency {concurrency} needs up to {files_needed(concurrency)} open"
            f" files per process, and the open-file limit (RLIMIT_NOFILE) is {soft} soft /"
            f" {'unlimited' if hard == resource.RLIM_INFINITY else hard} hard here: lower"
            f" --llmbench-concurrency to {most} or less, or raise the hard limit"
            " (`ulimit -Hn`, /etc/security/limits.conf, or LimitNOFILE= for a systemd unit)"
        )
    return int(target)
