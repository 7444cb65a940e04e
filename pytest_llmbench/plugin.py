"""pytest entry point: options, configuration, collection hook and fixtures. Nothing else.

The run's behaviour lives in ``session.LLMBenchSession``, registered in ``pytest_configure``;
heavy modules are imported lazily so ``pytest --help`` and xdist workers start fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.config import DEADLINE_SOURCES, DEFAULT_CONCURRENCY

MODEL_HELP = "Model to evaluate: a name declared in [tool.llmbench.models], 'sim', or NAME@BASE_URL (repeatable)"
STORE_HELP = "Directory of the result store (default: .llmbench in the rootdir)"
CONCURRENCY_HELP = (
    f"Items in flight at once in each pytest process (default {DEFAULT_CONCURRENCY}; under -n W,"
    " 64 per run, which any worker may use while the others do not). An item running 3x longer than the"
    " median stops counting, so a stuck one never blocks the queue (at most K such)"
)
HOST_THREADS_HELP = (
    "Items one item host runs at once, a thread each, when they run only the plugin's own"
    " code (the default provider, no request hooks, no tools, a built-in text scorer); other"
    " items always get a process of their own. 1: every item gets one (default 16)"
)
FRESH_HELP = "Ignore stored results and run every item again"
RESCORE_HELP = "Re-score stored completions with the current scorers, without calling any API"
JSONL_HELP = "Write every item's record as JSON lines to this file"
HTML_HELP = "Write a self-contained HTML report (plots, items, transcripts) to this file"
NO_PREFLIGHT_HELP = (
    "Skip the preflight: the check of every selected model's endpoint (reachable, key"
    " accepted, model id listed) before the first item, for endpoints that do not allow it"
)
PROGRESS_HELP = (
    "Live progress line on a terminal: auto (on a terminal, not with -q), on or off (default auto)"
)
WORKER_FORK_HELP = (
    "xdist workers forked from a process that has imported pytest and its plugins once,"
    " instead of each starting Python from nothing: auto (when the run starts 4 or more"
    " local workers), on or off (default auto)"
)
SYNC_INTERVAL_HELP = (
    "Seconds a stored result may wait to be flushed to disk: the result store is synced"
    " this often, in one call, instead of fsyncing every result (a kill of any process loses"
    " nothing either way; a power cut, at most this much). 0: fsync every result (default 1)"
)
SUITE_FILES_HELP = (
    "Glob patterns of the .toml file names that may be suites (default *.toml); a matching"
    " file with a prompts or suite table is a suite, and one that mentions them but does not"
    " parse is a collection error"
)


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise pytest.UsageError(
            f"--llmbench-concurrency: expected a whole number, got {value!r} (e.g. 16)") from None
    if number < 1:
        raise pytest.UsageError(f"--llmbench-concurrency: must be at least 1, got {value!r} (use 1 or more)")
    return number


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llmbench", "LLM evaluation (pytest-llmbench)")
    group.addoption("--llmbench-model", action="append", default=[], dest="llmbench_models",
                    metavar="MODEL", help=MODEL_HELP)
    parser.addini("llmbench_models", MODEL_HELP, type="linelist", default=[])
    for dest, _env, help_text in DEADLINE_SOURCES.values():
        group.addoption("--" + dest.replace("_", "-"), dest=dest, default=None, metavar="N",
                        help=help_text)
        parser.addini(dest, help_text, default=None)
    group.addoption("--llmbench-store", dest="llmbench_store", default=None, metavar="DIR",
                    help=STORE_HELP)
    parser.addini("llmbench_store", STORE_HELP, default=None)
    group.addoption("--llmbench-concurrency", dest="llmbench_concurrency", default=None,
                    type=_positive_int, metavar="K", help=CONCURRENCY_HELP)
    parser.addini("llmbench_concurrency", CONCURRENCY_HELP, default=None)
    group.addoption("--llmbench-host-threads", dest="llmbench_host_threads", default=None,
                    metavar="T", help=HOST_THREADS_HELP)
    parser.addini("llmbench_host_threads", HOST_THREADS_HELP, default=None)
    group.addoption("--llmbench-fresh", dest="llmbench_fresh", action="store_true", default=None,
                    help=FRESH_HELP)
    parser.addini("llmbench_fresh", FRESH_HELP, type="bool", default=False)
    group.addoption("--llmbench-rescore", dest="llmbench_rescore", action="store_true",
                    default=None, help=RESCORE_HELP)
    parser.addini("llmbench_rescore", RESCORE_HELP, type="bool", default=False)
    group.addoption("--llmbench-jsonl", dest="llmbench_jsonl", default=None, metavar="FILE",
                    help=JSONL_HELP)
    parser.addini("llmbench_jsonl", JSONL_HELP, default=None)
    group.addoption("--llmbench-no-preflight", dest="llmbench_no_preflight",
                    action="store_true", default=None, help=NO_PREFLIGHT_HELP)
    parser.addini("llmbench_no_preflight", NO_PREFLIGHT_HELP, type="bool", default=False)
    group.addoption("--llmbench-html", dest="llmbench_html", default=None, metavar="FILE",
                    help=HTML_HELP)
    parser.addini("llmbench_html", HTML_HELP, default=None)
    group.addoption("--llmbench-progress", dest="llmbench_progress", default=None,
                    choices=("auto", "on", "off"), help=PROGRESS_HELP)
    parser.addini("llmbench_progress", PROGRESS_HELP, default="auto")
    group.addoption("--llmbench-sync-interval", dest="llmbench_sync_interval", default=None,
                    metavar="SECONDS", help=SYNC_INTERVAL_HELP)
    parser.addini("llmbench_sync_interval", SYNC_INTERVAL_HELP, default=None)
    group.addoption("--llmbench-worker-fork", dest="llmbench_worker_fork", default=None,
                    choices=("auto", "on", "off"), help=WORKER_FORK_HELP)
    parser.addini("llmbench_worker_fork", WORKER_FORK_HELP, default="auto")
    parser.addini("llmbench_suite_files", SUITE_FILES_HELP, type="linelist", default=[])


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_llmbench import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "llmbench(api_timeout=, api_retries=, task_timeout=, lease_max=): per-item deadline overrides",
    )
    if config.option.help or getattr(config.option, "version", False):
        return
    from pytest_llmbench.collect.items import SERVICES_KEY
    from pytest_llmbench.config import load_settings
    from pytest_llmbench.errors import ConfigError
    from pytest_llmbench.session.run import SESSION_KEY, LLMBenchSession

    try:
        settings = load_settings(config)
        _ensure_open_files(config, settings.concurrency, default=settings.concurrency_is_default)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    session = LLMBenchSession(config, settings)
    config.stash[SESSION_KEY] = session
    config.stash[SERVICES_KEY] = session
    config.pluginmanager.register(session, "llmbench-session")
    from pytest_llmbench.session.export import EXPORT_KEY, ExportHub

    hub = ExportHub(config, session)
    config.stash[EXPORT_KEY] = hub
    config.pluginmanager.register(hub, "llmbench-export")
    from pytest_llmbench.session import progress
    from pytest_llmbench.workers import controller as workers

    try:
        hub.check()
        progress.install(config, session)
        template = workers.install(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    if template is not None:
        config.add_cleanup(template.close)
    session.start_early()


def _ensure_open_files(config: pytest.Config, concurrency: int, *, default: bool) -> None:
    """Enough open files for the items in flight (engine/fdlimit.py); the xdist controller
    runs no items, but the simulator it starts serves every worker's. (An xdist worker
    with the default concurrency may run the whole run-wide budget: engine/runslots.py.)"""
    from pytest_llmbench.config import DEFAULT_RUN_CONCURRENCY
    from pytest_llmbench.engine.fdlimit import ensure_open_files

    if default and hasattr(config, "workerinput"):
        concurrency = max(concurrency, DEFAULT_RUN_CONCURRENCY)

    try:
        workers = int(getattr(config.option, "numprocesses", 0) or 0)
    except (TypeError, ValueError):
        workers = 0
    controller = workers > 0 and not hasattr(config, "workerinput")
    ensure_open_files(concurrency, strict=not controller, processes=workers if controller else 1)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix != ".toml":
        return None
    from pytest_llmbench.collect.items import SuiteFile, suite_patterns, suite_source
    from pytest_llmbench.session.run import SESSION_KEY

    session = parent.config.stash.get(SESSION_KEY, None)
    source = suite_source(file_path, parent.config.rootpath, suite_patterns(parent.config),
                          likely_suite=session.warm if session is not None else None)
    if source is None:
        return None
    node: SuiteFile = SuiteFile.from_parent(parent, path=file_path)
    node.source = source
    return node


@pytest.fixture
def llm(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A client for the configured model(s), with the API deadline layer and retries.

    ``llm.chat("prompt")`` or ``llm.chat([{"role": "user", "content": ...}], model="name")``
    returns a ``Completion``. The first selected model is the default.
    """
    from pytest_llmbench.errors import ConfigError
    from pytest_llmbench.session.client import LLMClient
    from pytest_llmbench.session.export import CALLS_KEY
    from pytest_llmbench.session.run import SESSION_KEY

    session = request.config.stash[SESSION_KEY]
    marker = request.node.get_closest_marker("llmbench")
    # The calls become the test's record (session/export.py): JUnit properties, summary.
    calls = request.node.stash.setdefault(CALLS_KEY, [])
    try:
        client = LLMClient(session, request.node.nodeid, dict(marker.kwargs) if marker else {},
                           calls=calls)
    except ConfigError as exc:  # a bad marker: the message names it; a traceback would not help
        problem = str(exc)
    else:
        yield client
        return
    pytest.fail(problem, pytrace=False)


@pytest.fixture
def llm_lease(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Acquire a lease on a named resource pool: ``with llm_lease("sandbox"): ...``.

    Held past ``lease_max``, the lease is reclaimed and the test interrupted (``LeaseExpired``);
    the test's report then carries the property ``llmbench_error_class=lease_timeout``."""
    from pytest_llmbench.session.client import lease_factory
    from pytest_llmbench.session.run import SESSION_KEY

    held: list[Any] = []
    yield lease_factory(request.config.stash[SESSION_KEY], held)
    if any(lease.expired is not None for lease in held):
        request.node.user_properties.append(("llmbench_error_class", "lease_timeout"))
    for lease in held:
        lease.release()  # a lease the test forgot: not held into the next test
