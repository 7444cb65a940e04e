"""The live progress line: what a run has done, is doing and has left, as one line of text.

Plain state and formatting, no pytest and no terminal: ``session/progress.py`` feeds it and
draws the line. Under xdist the controller holds one ``Progress`` for the whole run; each
worker's items in flight arrive with its reports (``set_in_flight(worker, ...)``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pytest_llmbench.records import ERROR, PASSED, ItemResult

__all__ = ["SLOW_FACTOR", "Progress"]

#: An item running this many times longer than the usual item is named on the line.
SLOW_FACTOR = 3.0
#: Finished items needed before "usual" means something.
MIN_SAMPLES = 5
#: Slow items named at most (the longest-running first).
MAX_NAMED = 3


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _count(n: float) -> str:
    if n < 1000:
        return f"{n:.0f}"
    return f"{n / 1000:.1f}k" if n < 1_000_000 else f"{n / 1_000_000:.1f}M"


@dataclass
class Progress:
    """Counts for the progress line; ``line(now)`` renders it."""

    started: float
    """Unix time the run started."""
    prices: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """Model name -> (USD per 1M prompt tokens, per 1M completion tokens)."""
    total: int = 0
    done: int = 0
    judged: int = 0
    passed: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    durations: list[float] = field(default_factory=list)
    """Elapsed seconds of the items run now (not cached): the usual item time."""
    first_done: float | None = None
    """Unix time the first item finished: the ETA's clock (start-up is not throughput)."""
    reported: set[str] = field(default_factory=set)
    in_flight: dict[str, dict[str, float]] = field(default_factory=dict)
    """Source (worker id, or ``local``) -> nodeid -> unix start time."""

    def finished(self, nodeid: str) -> None:
        """A pytest item finished (any item: suite item or plain test)."""
        self.done += 1
        self.reported.add(nodeid)
        if self.first_done is None:
            self.first_done = time.time()

    def add(self, result: ItemResult) -> None:
        """A result was reported: pass rate, tokens, cost, the usual item time."""
        self.judged += 1
        self.passed += result.status == PASSED
        self.errors += result.status == ERROR
        if result.cached:
            return  # bought in an earlier run: neither this run's tokens nor its timing
        self.tokens_in += result.prompt_tokens
        self.tokens_out += result.completion_tokens
        price = self.prices.get(str(result.identity.get("model", "")))
        if price is not None:
            self.cost += (result.prompt_tokens * price[0] + result.completion_tokens * price[1]) / 1e6
        if result.status != ERROR and result.elapsed > 0:
            self.durations.append(result.elapsed)
            if len(self.durations) > 512:
                del self.durations[:256]

    def set_in_flight(self, source: str, items: Iterable[tuple[str, float]]) -> None:
        self.in_flight[source] = dict(items)

    def running(self) -> dict[str, float]:
        """Every item in flight now, less those already reported (a snapshot from a worker
        is as old as its last report)."""
        merged: dict[str, float] = {}
        for items in self.in_flight.values():
            for nodeid, start in items.items():
                if nodeid not in self.reported:
                    merged[nodeid] = min(start, merged.get(nodeid, start))
        return merged

    def usual(self) -> float | None:
        """The median time of the items finished so far (None until ``MIN_SAMPLES``)."""
        if len(self.durations) < MIN_SAMPLES:
            return None
        return statistics.median(self.durations)

    def slow(self, now: float) -> list[tuple[str, float]]:
        """Items running past ``SLOW_FACTOR`` x the usual time: (nodeid, elapsed), longest
        first."""
        usual = self.usual()
        if usual is None:
            return []
        limit = max(SLOW_FACTOR * usual, 1.0)
        late = [(n, now - s) for n, s in self.running().items() if now - s > limit]
        return sorted(late, key=lambda x: -x[1])

    def eta(self, now: float) -> float | None:
        """Seconds left at the rate items have finished since the first one (None until
        ``MIN_SAMPLES`` have)."""
        if self.first_done is None or self.done < MIN_SAMPLES or self.done >= self.total:
            return None
        span = now - self.first_done
        if span <= 0:
            return None
        return (self.total - self.done) * span / (self.done - 1)

    def line(self, now: float, width: int = 200) -> str:
        running = len(self.running())
        queued = max(0, self.total - self.done - running)
        parts = [f"llmbench {self.done}/{self.total} done", f"{running} in flight",
                 f"{queued} queued"]
        if self.judged:
            rate = f"pass {100 * self.passed / self.judged:.1f}%"
            if self.errors:
                rate += f" ({self.errors} err)"
            parts.append(rate)
        eta = self.eta(now)
        if eta is not None:
            parts.append("ETA " + _duration(eta))
        slow = self.slow(now)
        if slow:
            named = ", ".join(f"{n.rsplit('::', 1)[-1]} {_duration(e)}" for n, e in slow[:MAX_NAMED])
            more = f" +{len(slow) - MAX_NAMED}" if len(slow) > MAX_NAMED else ""
            parts.append(f"slow: {named}{more}")
        if self.tokens_in or self.tokens_out:
            parts.append(f"tokens {_count(self.tokens_in)}/{_count(self.tokens_out)}")
        if self.prices:
            parts.append(f"${self.cost:.4f}" if self.cost < 1 else f"${self.cost:.2f}")
        text = " | ".join(parts)
        return text if len(text) < width else text[: max(0, width - 4)] + "..."
