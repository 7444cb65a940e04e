from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_llmbench.engine.forkserver  # noqa: F401

# In-process pytester runs drop the modules first imported inside them when they end; the
# engine would then pickle jobs with classes that are no longer the modules' own. Import the
# engine's side here, once, so every in-process run shares it (a real run imports it once).
import pytest_llmbench.engine.scheduler  # noqa: F401

# Likewise the openai SDK (a run that forks items from pytest imports it there): two
# generations of its modules in one process disagree (its ``Omit`` marker, its types).
import pytest_llmbench.providers.openai_sdk  # noqa: F401

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shared_sim() -> Iterator[str]:
    """One simulator for the tests that only need answers (not request counts)."""
    from pytest_llmbench.sim.control import SimServer

    server = SimServer.start()
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture
def sim_env(shared_sim: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point pytester runs at the shared simulator (no per-run start-up)."""
    monkeypatch.setenv("LLMBENCH_SIM_URL", shared_sim)
    for var in ("OPENAI_TIMEOUT", "OPENAI_MAX_RETRIES", "TASK_EXECUTION_TIMEOUT",
                "RESOURCE_MAX_OCCUPATION_TIME", "LLMBENCH_CONCURRENCY",
                # when this suite runs under xdist, the runs it starts are not its workers
                "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):
        monkeypatch.delenv(var, raising=False)
    return shared_sim


def own_processes_with(token: str) -> list[int]:
    """Pids whose command line or environment mentions ``token`` (leak checks)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        for name in ("cmdline", "environ"):
            try:
                with open(f"/proc/{entry}/{name}", "rb") as fh:
                    if token.encode() in fh.read():
                        found.append(int(entry))
                        break
            except OSError:
                continue
    return found


@pytest.fixture
def leftovers() -> object:
    """``leftovers(marker)``: pids still alive whose command line or environment has it."""
    return own_processes_with
