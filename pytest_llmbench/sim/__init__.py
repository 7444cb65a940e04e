"""OpenAI-compatible simulator with fault injection (see docs/simulator.md).

``SimServer`` runs it as a subprocess; ``python -m pytest_llmbench.sim`` runs it directly.
"""

from __future__ import annotations

from pytest_llmbench.sim.control import KEY_ENV, SimServer, SimStartError

__all__ = ["KEY_ENV", "SimServer", "SimStartError"]
