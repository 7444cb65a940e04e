"""The run's state and behaviour, registered as a plugin object at configure time."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_llmbench.config import Settings, check_hierarchy, deadline_overrides
from pytest_llmbench.errors import ConfigError, ScorerError
from pytest_llmbench.records import ERROR, Case, ItemResult, ModelSpec, ScorerSpec, to_jsonable
from pytest_llmbench.report import text as report
from pytest_llmbench.store.runs import new_run_id

if TYPE_CHECKING:
    from pytest_llmbench.collect.items import LLMItem
    from pytest_llmbench.collect.suite import Suite
    from pytest_llmbench.coord.breaker import CircuitBreaker
    from pytest_llmbench.coord.lease import LeaseManager
    from pytest_llmbench.coord.ratelimit import SharedLimiter
    from pytest_llmbench.engine.forkserver import ForkServer, PreflightAnswer, SharedForkServer
    from pytest_llmbench.engine.runner import Job, Scorer
    from pytest_llmbench.engine.runslots import RunSlots
    from pytest_llmbench.engine.scheduler import Engine
    from pytest_llmbench.providers.base import Provider, RequestHook
    from pytest_llmbench.session.runlog import RunLog
    from pytest_llmbench.session.storeplace import StorePlaces
    from pytest_llmbench.sim.control import SimServer
    from pytest_llmbench.store.durable import Syncer
    from pytest_llmbench.store.protocol import ResultStore

log = logging.getLogger("pytest_llmbench")

SESSION_KEY = pytest.StashKey["LLMBenchSession"]()


class LLMBenchSession:
    """Owns settings, the store, the engine and the simulator for one pytest process."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        workerinput: dict[str, Any] | None = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        self.run_id: str = (
            workerinput["llmbench_run_id"]
            if workerinput and "llmbench_run_id" in workerinput
            else new_run_id()
        )
        self.sim_url: str | None = (workerinput or {}).get("llmbench_sim_url") or os.environ.get(
            "LLMBENCH_SIM_URL"
        )
        self._sim: SimServer | None = None
        self._fork_server: SharedForkServer | None = None
        self._fork_server_failed = False
        self._early_server: ForkServer | None = None
        """A plain run's fork server, started from ``pytest_configure`` to run the preflight;
        the engine adopts it when it is created (closed here if it never is)."""
        self._preflight_pending: tuple[ForkServer, list[ModelSpec], float] | None = None
        self._preflight_started = False
        self._run_slots_path: Path | None = None
        """xdist controller: the run-wide in-flight count file (engine/runslots.py)."""
        self._store: ResultStore | None = None
        self._syncer: Syncer | None = None
        """Flushes the default file store to disk (``store/durable.py``); None when every
        result is fsynced as it is stored, or the store is a third party's."""
        self._fingerprints: dict[str, str] = {}
        self._runlog: RunLog | None = None
        self._engine: Engine | None = None
        self._ending: ForkServer | None = None
        """The engine's fork server, told to end at session finish, waited for at
        unconfigure (not the engine: it holds the run's records until it goes)."""
        self._leases: LeaseManager | None = None
        self._limiter: SharedLimiter | None = None
        self._breaker: CircuitBreaker | None = None
        self._moved: str | None = None
        """The header's warning about a moved store, computed before the store is created."""
        self._scorers: dict[str, Scorer] = {}
        self._providers: dict[str, Provider] = {}
        self._request_hooks: tuple[RequestHook, ...] | None = None
        self._markers: set[str] = set()
        self.suite_errors = 0
        self.other_collect_errors = 0
        self.hierarchy_problems: dict[str, str] = {}
        """suite path -> why its deadlines break the hierarchy for its max_turns."""
        self.reported: dict[str, str] = {}
        """llmbench key -> source (``ran``/``cached``/``rescored``), from every item report
        this process saw."""

    # --- shared pieces, created on first use ---------------------------------------------

    @property
    def store(self) -> ResultStore:
        """The run's result store: the ``pytest_llmbench_get_store`` hook's answer (by default
        ``pytest_llmbench_get_store`` below: the file store)."""
        if self._store is None:
            self._store = self.config.hook.pytest_llmbench_get_store(config=self.config)
            if self._store is None:  # pragma: no cover - our own trylast implementation answers
                raise pytest.UsageError("pytest_llmbench_get_store returned no store")
        return self._store

    @pytest.hookimpl(trylast=True)
    def pytest_llmbench_get_store(self, config: pytest.Config) -> ResultStore:
        """The default store: files under ``--llmbench-store`` (``store/filestore.py``)."""
        from pytest_llmbench.store import durable
        from pytest_llmbench.store.filestore import Store

        interval = self.settings.sync_interval
        batched = interval > 0 and durable.available()
        store = Store.open(self.settings.store_dir, fsync=not batched)
        if batched:
            self._syncer = durable.Syncer(self.settings.store_dir, interval)
            self._syncer.start()
        return store

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from pytest_llmbench.engine.scheduler import Engine

            run_slots = self._run_slots()
            self._engine = Engine(
                store=self.store,
                coord_dir=self.settings.store_dir,
                run_id=self.run_id,
                concurrency=run_slots.budget if run_slots else self.settings.concurrency,
                make_job=self.make_job,
                key_of=lambda item: getattr(item, "key", None) if _is_llm_item(item) else None,
                fresh=self.settings.fresh,
                rescore=self.settings.rescore,
                tick=self.leases.monitor_tick,  # every mode: the judge's pool is there too
                fork_server=(getattr(self.config, "workerinput", None) or {}).get(
                    "llmbench_fork_server"),
                tls=self.uses_tls(),
                run_slots=run_slots,
                host_threads=self.settings.host_threads,
                server=self._early_server,
            )
            self._early_server = None
        return self._engine

    def _run_slots(self) -> RunSlots | None:
        """xdist worker with the default concurrency: the run-wide budget's shared count."""
        workerinput = getattr(self.config, "workerinput", None) or {}
        path = workerinput.get("llmbench_run_slots")
        if not path or not self.settings.concurrency_is_default:
            return None
        from pytest_llmbench.config import DEFAULT_RUN_CONCURRENCY
        from pytest_llmbench.engine.runslots import RunSlots

        try:
            return RunSlots(Path(path), _worker_index(workerinput.get("workerid")),
                            DEFAULT_RUN_CONCURRENCY)
        except (OSError, ValueError) as exc:
            log.warning("could not open the run-wide concurrency count %s (%s): %d items"
                        " in flight in this worker", path, exc, self.settings.concurrency)
            return None

    @property
    def leases(self) -> LeaseManager:
        """Resource pools of ``[tool.llmbench.resources]``, shared through file locks."""
        if self._leases is None:
            from pytest_llmbench.coord.lease import LeaseManager

            self._leases = LeaseManager(
                self.settings.store_dir, dict(self.settings.resources),
                self.settings.deadlines.lease_max,
            )
        return self._leases

    @property
    def limiter(self) -> SharedLimiter:
        """Rate limits and shared Retry-After per endpoint, for every process on the machine."""
        if self._limiter is None:
            from pytest_llmbench.coord.ratelimit import SharedLimiter, default_root

            self._limiter = SharedLimiter(default_root())
        return self._limiter

    def ensure_sim(self) -> str:
        """URL of the simulator, starting one (a subprocess) the first time it is needed."""
        if self.sim_url is None:
            from pytest_llmbench.sim.control import SimServer

            self._sim = SimServer.start(**dict(self.settings.sim_options))
            self.sim_url = self._sim.base_url
            log.info("started the simulator at %s", self.sim_url)
        return self.sim_url

    def uses_tls(self) -> bool:
        return any(m.base_url.lower().startswith("https:") for m in self.settings.models)

    def uses_sim(self) -> bool:
        return any(m.simulated for m in self.settings.models)

    # --- collection ----------------------------------------------------------------------

    def check_scorer(self, spec: ScorerSpec) -> None:
        from pytest_llmbench.scoring.resolve import validate_options

        self._resolve_scorer(spec)
        validate_options(spec, hook=self.config.pluginmanager.hook, rootdir=self.config.rootpath)

    def check_expected(self, spec: ScorerSpec, expected: Any) -> None:
        from pytest_llmbench.scoring.resolve import validate_options

        validate_options(
            spec, expected, hook=self.config.pluginmanager.hook, rootdir=self.config.rootpath
        )

    def scorer_fingerprint(self, spec: ScorerSpec) -> str:
        """What the scorer's verdicts are valid for (``scoring.resolve.scorer_fingerprint``);
        ``unresolved`` when the name does not resolve (its items error anyway)."""
        fingerprint = self._fingerprints.get(spec.name)
        if fingerprint is None:
            from pytest_llmbench.scoring.resolve import NamedScorer, scorer_fingerprint

            try:
                scorer = self._resolve_scorer(spec)
            except ScorerError:
                fingerprint = "unresolved"
            else:
                fingerprint = (scorer_fingerprint(scorer) if isinstance(scorer, NamedScorer)
                               else "unknown")
            self._fingerprints[spec.name] = fingerprint
        return fingerprint

    def _resolve_scorer(self, spec: ScorerSpec) -> Scorer:
        cache_key = spec.name
        scorer = self._scorers.get(cache_key)
        if scorer is None:
            from pytest_llmbench.scoring.resolve import resolve_scorer

            scorer = resolve_scorer(spec, self.config.pluginmanager, rootdir=self.config.rootpath)
            self._scorers[cache_key] = scorer
        return scorer

    def check_suite_hierarchy(self, suite: Suite) -> None:
        """The start-up hierarchy check with each suite's own deadlines and ``max_turns``
        (an agent item makes up to ``max_turns`` calls, each with its retries)."""
        for case in suite.cases:
            if case.agent is None or suite.path in self.hierarchy_problems:
                continue
            overrides = dict(case.deadlines)
            if "api_retries" in overrides:
                overrides["api_retries"] = int(overrides["api_retries"])
            problem = check_hierarchy(self.settings.deadlines.replace(**overrides),
                                      case.agent.max_turns)
            if problem:
                self.hierarchy_problems[suite.path] = f"{case.prompt_id}: {problem}"
                log.warning("deadline hierarchy violated in %s: %s", suite.path, problem)
                workeroutput = getattr(self.config, "workeroutput", None)
                if workeroutput is not None:  # for the controller's summary (testnodedown)
                    workeroutput["llmbench_hierarchy"] = dict(self.hierarchy_problems)

    def register_marker(self, tag: str) -> None:
        if tag not in self._markers:
            self._markers.add(tag)
            self.config.addinivalue_line("markers", f"{tag}: suite tag (pytest-llmbench)")

    def key_for(self, item: LLMItem) -> str:
        from pytest_llmbench.store.filestore import item_key

        case, model = item.case, item.model
        return item_key(
            messages=[list(turn) for turn in case.turns],
            model=model.model,
            base_url=model.base_url,
            params={**model.params, **case.params},
            # A verdict is valid only for the scorer as it is now (docs/store.md, "Keys").
            scorer={"name": case.scorer.name, "options": dict(case.scorer.options),
                    "threshold": case.scorer.threshold,
                    "fingerprint": self.scorer_fingerprint(case.scorer)},
            repeat=item.repeat,
            extra={"expected": case.expected, "extra": dict(case.extra), **_agent_key(case)},
        )

    def request_key_for(self, item: LLMItem) -> str:
        """Hash of what determines the *completions* (not the verdict): rescoring with an
        edited scorer or expected answer finds the stored answers through it."""
        from pytest_llmbench.store.filestore import item_key

        case, model = item.case, item.model
        return item_key(
            messages=[list(turn) for turn in case.turns], model=model.model,
            base_url=model.base_url, params={**model.params, **case.params},
            scorer={}, repeat=item.repeat, extra=_agent_key(case),
        )

    def stored_completions(self, item: LLMItem) -> ItemResult | None:
        """--llmbench-rescore: the newest stored result with completions for this request."""
        return self.store.answer_for(self.request_key_for(item))

    # --- running -------------------------------------------------------------------------

    def deadlines_for(self, item: LLMItem) -> Any:
        overrides: dict[str, float] = dict(item.case.deadlines)
        marker = item.get_closest_marker("llmbench")
        if marker is not None:
            try:
                overrides.update(deadline_overrides(marker.kwargs, f"{item.nodeid}: llmbench marker"))
            except ConfigError as exc:
                raise pytest.UsageError(str(exc)) from None
        if "api_retries" in overrides:
            overrides["api_retries"] = int(overrides["api_retries"])
        return self.settings.deadlines.replace(**overrides)

    def provider_for(self, model: ModelSpec) -> Provider:
        """The model's provider (``pytest_llmbench_get_provider``), asked once per model."""
        if model.name not in self._providers:
            from pytest_llmbench.providers.registry import get_provider

            self._providers[model.name] = get_provider(self.config, model)
        return self._providers[model.name]

    @property
    def request_hooks(self) -> tuple[RequestHook, ...]:
        if self._request_hooks is None:
            from pytest_llmbench.providers.registry import request_hooks

            self._request_hooks = request_hooks(self.config)
        return self._request_hooks

    def resolved_model(self, model: ModelSpec) -> ModelSpec:
        if model.fallbacks:
            model = dataclasses.replace(
                model, fallbacks=tuple(self.resolved_model(f) for f in model.fallbacks))
        if model.simulated:
            return dataclasses.replace(model, base_url=self.ensure_sim())
        return model

    @property
    def breaker(self) -> CircuitBreaker:
        """The endpoints' circuit breakers: beside the rate limits, so concurrent runs share
        them too."""
        if self._breaker is None:
            from pytest_llmbench.coord.breaker import BreakerPolicy, CircuitBreaker
            from pytest_llmbench.coord.ratelimit import default_root

            policy = BreakerPolicy(threshold=self.settings.breaker_threshold,
                                   cooldown=self.settings.breaker_cooldown)
            self._breaker = CircuitBreaker(default_root(), policy)
        return self._breaker

    def make_job(self, item: LLMItem) -> Job | ItemResult:
        from pytest_llmbench.engine.runner import Job

        identity = {**item.identity, "run_id": self.run_id,
                    "request_key": self.request_key_for(item)}
        try:
            scorer = self._resolve_scorer(item.case.scorer)
        except ScorerError as exc:
            return ItemResult(key=item.key, identity=identity, status=ERROR,
                              error_class="scorer_error", error=str(exc),
                              expected=item.case.expected)
        rescore_from = None
        stored = None
        if self.settings.rescore:
            stored = rescore_from = self.stored_completions(item)
        elif self.settings.fresh and item.case.scorer.name == "code":
            stored = self.store.get(item.key)
        provider = self.provider_for(item.model)
        return Job(
            key=item.key,
            nodeid=item.nodeid,
            identity=identity,
            case=_with_tle_presets(item.case, stored),
            model=self.resolved_model(item.model),
            deadlines=self.deadlines_for(item),
            api_key=self.settings.api_key(item.model),
            scorer=scorer,
            limiter=self.limiter,
            provider=provider,
            breaker=self.breaker,
            fallback_keys=tuple(self.settings.api_key(f) for f in item.model.fallbacks),
            request_hooks=self.request_hooks,
            rescore_from=rescore_from,
            reuse_answers=not self.settings.fresh,
            shareable=self._shareable(item, scorer, provider),
        )

    def _shareable(self, item: LLMItem, scorer: Scorer, provider: Provider) -> bool:
        """Whether the item runs only this package's code (``Job.shareable``)."""
        from pytest_llmbench.providers.openai_compat import OpenAIProvider
        from pytest_llmbench.scoring.resolve import runs_only_our_code

        return (self.settings.host_threads > 1 and not item.case.tools
                and not self.request_hooks and type(provider) is OpenAIProvider
                and runs_only_our_code(scorer))

    def result_for(self, item: LLMItem) -> ItemResult:
        result = self.engine.wait(item, item.session.items)
        result.cached = result.identity.get("run_id") != self.run_id
        return result

    def in_flight(self) -> list[tuple[str, float]]:
        """(nodeid, unix start time) of the items this process's engine runs now."""
        return self._engine.in_flight() if self._engine is not None else []

    def properties(self, result: ItemResult) -> list[tuple[str, object]]:
        return report.junit_properties(result)

    def describe(self, item: LLMItem, result: ItemResult) -> str:
        prompt = ""
        for message in reversed(item.case.turns[-1]):
            if message.get("role") == "user":
                prompt = message.get("content", "")
                break
        return report.describe(result, prompt=prompt, model=item.model.name)

    # --- hooks ---------------------------------------------------------------------------

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        s = self.settings
        models = ", ".join(
            f"{m.name} ({'built-in simulator' if m.simulated else m.base_url})" for m in s.models
        )
        d = s.deadlines
        src = s.deadline_sources
        lines = [
            f"llmbench: models {models}; store {s.store_dir}; concurrency {self._concurrency_text()}",
            "llmbench deadlines: "
            f"api_timeout {d.api_timeout:g} s ({src.get('api_timeout', 'default')}), "
            f"api_retries {d.api_retries} ({src.get('api_retries', 'default')}), "
            f"task_timeout {d.task_timeout:g} s ({src.get('task_timeout', 'default')}), "
            f"lease_max {d.lease_max:g} s ({src.get('lease_max', 'default')})",
        ]
        problem = check_hierarchy(d)
        if problem:
            lines.append(f"llmbench WARNING: deadline hierarchy violated: {problem}")
        moved = self._moved if self._moved is not None else self._moved_store_warning()
        if moved:
            lines.append(moved)
        if s.fresh:
            lines.append("llmbench: --llmbench-fresh: stored results are ignored and overwritten")
        if s.rescore:
            lines.append("llmbench: --llmbench-rescore: stored completions are re-scored, no API calls")
        return lines

    def _concurrency_text(self) -> str:
        s = self.settings
        workers = getattr(self.config.option, "numprocesses", None)
        if s.concurrency_is_default and (self.is_worker or workers):
            from pytest_llmbench.config import DEFAULT_RUN_CONCURRENCY

            return f"{DEFAULT_RUN_CONCURRENCY} per run, shared by the workers"
        return f"{s.concurrency} per process"

    def _store_places(self) -> tuple[StorePlaces, str]:
        from pytest_llmbench.coord.ratelimit import default_root
        from pytest_llmbench.session.storeplace import StorePlaces, suites_key

        key = suites_key(self.config.args, Path(self.config.invocation_params.dir))
        return StorePlaces(default_root()), key

    def _moved_store_warning(self) -> str | None:
        """A new store where the last run of the same suites used another (storeplace.py)."""
        from pytest_llmbench.session.storeplace import moved_store_warning

        places, key = self._store_places()
        return moved_store_warning(places, key, self.settings.store_dir)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        """The store opens and the endpoints answer, before any item runs (and, under xdist,
        before the workers start): a mistake there is one usage error, not one per item."""
        if getattr(self.config.option, "collectonly", False):
            return
        if not self.is_worker:
            self._moved = self._moved_store_warning()  # before this run creates its store
        from pytest_llmbench.errors import StoreError

        try:  # a path that exists must be a usable store (a new one is created on first use)
            if self.settings.store_dir.exists():
                self.store  # noqa: B018 - opened (and checked) here for the message's sake
        except StoreError as exc:
            raise pytest.UsageError(str(exc)) from None
        self.start_preflight()

    def start_preflight(self) -> None:
        """Check every selected model's endpoint once; one ``UsageError`` for all failures,
        before any item runs.

        Not on xdist workers (the controller did it), with ``--collect-only``,
        ``--llmbench-rescore`` (no API call is made) or ``--llmbench-no-preflight``.

        The check goes through the ``openai`` SDK, and importing it costs ~1 CPU-s: so the
        fork server, which imports it anyway, runs the check right after its warm-up (its
        request and answer: ``engine/forkserver.py``). A plain run starts its fork server
        from ``pytest_configure`` (``start_early``) and awaits the answer when collection
        ends (``finish_preflight``): the server starts up beside pytest's own start-up and
        the collection, and pytest never imports the SDK. The xdist controller starts it at
        session start and awaits it there, before xdist starts the workers. Without a fork
        server the check runs here, in this process, at session start."""
        opt = self.config.option
        if (self._preflight_started or self.is_worker or not self.settings.preflight
                or self.settings.rescore or getattr(opt, "collectonly", False)):
            return
        self._preflight_started = True
        from pytest_llmbench.engine import forkserver
        from pytest_llmbench.providers.openai_compat import OpenAIProvider
        from pytest_llmbench.session.preflight import PREFLIGHT_TIMEOUT

        # Only endpoints our OpenAI-compatible provider serves: a third-party provider's
        # endpoint need not list models (or speak HTTP at all). The simulator is ours.
        models = [m for m in self.settings.models
                  if not m.simulated and isinstance(self.provider_for(m), OpenAIProvider)]
        if not models:
            return
        timeout = min(PREFLIGHT_TIMEOUT, self.settings.deadlines.api_timeout)
        if forkserver.enabled():
            request = forkserver.preflight_request(
                [(m, self.settings.api_key(m)) for m in models], timeout)
            if self.config.pluginmanager.has_plugin("dsession"):  # the xdist controller
                self.ensure_fork_server(preflight=request)
                if self._fork_server is not None:
                    self._preflight_done(self._fork_server.preflight_answer(), models, timeout)
                    return
            elif self._engine is None:
                self._early_server = forkserver.started(
                    lambda: forkserver.ForkServer(tls=self.uses_tls(), preflight=request),
                    "items fork from pytest")
                if self._early_server is not None:
                    self._preflight_pending = (self._early_server, models, timeout)
                    return
        self._preflight_done(None, models, timeout)

    def start_early(self) -> None:
        """From ``pytest_configure``: a plain run (no xdist: the controller knows itself
        only at session start) starts its preflight now, ~0.05-0.1 s before session start:
        the fork server's warm-up is what the first item waits for."""
        opt = self.config.option
        if getattr(opt, "numprocesses", None) or getattr(opt, "dist", "no") != "no":
            return
        if any(getattr(opt, name, False) for name in ("markers", "showfixtures",
                                                       "show_fixtures_per_test")):
            return  # pytest lists something and runs nothing (no session start either)
        self.start_preflight()
        if self.is_worker:
            return  # an xdist worker's items fork from the run's shared server
        if self._early_server is None and self._engine is None and self._names_a_suite():
            # No preflight started the fork server (a simulated model, --llmbench-no-preflight),
            # but a suite file is named on the command line: start it now rather than when
            # the collection reaches the file, ~0.25 s later, which the first item waited for.
            from pytest_llmbench.engine import forkserver

            if forkserver.enabled() and not getattr(opt, "collectonly", False):
                self._early_server = forkserver.started(
                    lambda: forkserver.ForkServer(tls=self.uses_tls()), "items fork from pytest")

    def _names_a_suite(self) -> bool:
        from pytest_llmbench.collect.items import names_likely_suite, suite_patterns

        return names_likely_suite(self.config.args, self.config.invocation_params.dir,
                                  suite_patterns(self.config))

    def finish_preflight(self) -> None:
        """A plain run: await the fork server's preflight (see ``start_preflight``)."""
        if self._preflight_pending is None:
            return
        server, models, timeout = self._preflight_pending
        self._preflight_pending = None
        self._preflight_done(server.preflight_answer(), models, timeout)

    def _preflight_done(self, answer: PreflightAnswer | None, models: list[ModelSpec],
                        timeout: float) -> None:
        """Log what the fork server's preflight logged and raise its problems; run the
        check here when it could not (``answer`` None)."""
        from pytest_llmbench.session.preflight import check_models
        from pytest_llmbench.session.preflight import log as preflight_log

        if answer is None:
            problems = check_models(models, self.settings.api_key, timeout=timeout)
        else:
            for level, message in answer.notes:
                preflight_log.log(level, "%s", message)
            problems = answer.problems
        if problems:
            raise pytest.UsageError("\n".join(problems))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: the suites whose deadlines a worker found out of hierarchy
        (only workers collect), for the summary."""
        problems = (getattr(node, "workeroutput", None) or {}).get("llmbench_hierarchy")
        if isinstance(problems, dict):
            self.hierarchy_problems.update(problems)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: hand the run id, the simulator URL and the run's fork server
        to every worker."""
        node.workerinput["llmbench_run_id"] = self.run_id
        if self.uses_sim():
            node.workerinput["llmbench_sim_url"] = self.ensure_sim()
        path = self.ensure_fork_server()
        if path is not None:
            node.workerinput["llmbench_fork_server"] = path
        if self.settings.concurrency_is_default:
            if self._run_slots_path is None:
                from pytest_llmbench.engine import runslots

                self._run_slots_path = runslots.create(int(node.workerinput.get("workercount", 1)))
            node.workerinput["llmbench_run_slots"] = str(self._run_slots_path)

    def ensure_fork_server(self, preflight: bytes | None = None) -> str | None:
        """xdist controller: the path of the fork server every worker shares (one for the
        run instead of one per worker), started on first call (at session start when it
        runs the preflight: ``start_preflight``); None if switched off or it could not
        start (each worker then starts its own)."""
        from pytest_llmbench.engine import forkserver

        if self._fork_server is None and not self._fork_server_failed and forkserver.enabled():
            self._fork_server = forkserver.started(
                lambda: forkserver.SharedForkServer(tls=self.uses_tls(), preflight=preflight),
                "each xdist worker starts its own")
            self._fork_server_failed = self._fork_server is None
        return self._fork_server.path if self._fork_server is not None else None

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            if report.nodeid.endswith(".toml"):
                self.suite_errors += 1
            else:
                self.other_collect_errors += 1

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """A plain run's preflight answer, awaited once collection ends: here rather than
        in ``pytest_runtestloop``, a ``firstresult`` hook another plugin may answer first
        (no item may run before the answer)."""
        self.finish_preflight()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> None:
        """A broken suite file is its own collection error; the other files still run.

        pytest stops the whole run on any collection error; when every failure is a suite
        file (never a Python import error), the run goes on, and still exits non-zero.
        """
        if self.suite_errors and not self.other_collect_errors:
            session.config.option.continue_on_collection_errors = True
        self._start_prefetch(session)

    def warm(self) -> None:
        """A suite file is being collected: start the fork server beside the collection
        (unless it started already, for the preflight: the engine is then created when the
        first item runs, after the preflight passed, not here)."""
        if self._early_server is None and not getattr(self.config.option, "collectonly", False):
            self.engine.warm()  # once: the engine knows whether its server runs already

    def _start_prefetch(self, session: pytest.Session) -> None:
        """xdist worker: run items while the controller waits for the other workers.

        Each worker starts with the items xdist's first round-robin batch gives it
        (positions ``w, w+W, w+2W...``), then the rest; items another worker has taken are
        skipped. Not with ``--collect-only``, ``-x``/``--maxfail`` (items the run may never
        reach) or a collection error that ends the run."""
        workerinput: dict[str, Any] | None = getattr(self.config, "workerinput", None)
        opt = self.config.option
        if (workerinput is None or getattr(opt, "collectonly", False) or getattr(opt, "maxfail", 0)
                or self.other_collect_errors or session.shouldstop or session.shouldfail):
            return
        positions = [i for i, item in enumerate(session.items) if _is_llm_item(item)]
        if not positions:
            return
        from pytest_llmbench.engine.inflight import prefetch_order

        worker = _worker_index(workerinput.get("workerid"))
        count = _worker_index(workerinput.get("workercount")) or 1
        self.engine.prefetch(session.items, prefetch_order(positions, worker, count))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        key = props.get("llmbench_key")
        if isinstance(key, str):
            source = props.get("source")
            if not isinstance(source, str):
                source = "cached" if props.get("cached") == "true" else "ran"
            self.reported[key] = source
            if not self.is_worker:
                self.runlog.add(report)

    @property
    def runlog(self) -> RunLog:
        """The outcomes of this run's items, for its manifest (not kept by xdist workers)."""
        if self._runlog is None:
            from pytest_llmbench.session.runlog import RunLog

            self._runlog = RunLog(self.run_id)
        return self._runlog

    def write_manifest(self, exitstatus: int) -> None:
        """Plain run or xdist controller: record the run in the store (``store/runs.py``)."""
        if self.is_worker or self._runlog is None or not self._runlog.items:
            return
        from pytest_llmbench.session.export import EXPORT_KEY

        hub = self.config.stash.get(EXPORT_KEY, None)
        manifest = self._runlog.manifest(
            settings=self.settings, args=self.config.invocation_params.args,
            exit_status=int(exitstatus), facts=hub.facts if hub is not None else {},
        )
        try:
            self.store.put_run(manifest)
        except (OSError, ValueError) as exc:
            log.error("could not write the manifest of run %s: %s", self.run_id, exc)
            return
        log.info("run %s: manifest of %d items written", self.run_id, len(manifest.items))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from pytest_llmbench.session.export import EXPORT_KEY

        # The records that came with the reports (session/export.py), tallied as they came:
        # complete under xdist whatever the workers' file systems, and they include plain
        # ``llm`` tests.
        hub = self.config.stash.get(EXPORT_KEY, None)
        if self.is_worker or hub is None or not hub.tally.items:
            return
        from pytest_llmbench.report.summary import render_table

        tally = hub.tally
        groups = tally.groups()
        terminalreporter.section("llmbench summary")
        for path, problem in self.hierarchy_problems.items():
            terminalreporter.write_line(
                f"llmbench WARNING: deadline hierarchy violated in {path}: {problem}")
        terminalreporter.write_line(render_table(groups))
        for line in tally.detail_lines(groups):
            terminalreporter.write_line(line)
        if tally.cached:
            terminalreporter.write_line(
                f"{tally.cached} of {tally.items} items reported from the store (cached, no API call);"
                " --llmbench-fresh runs them again"
            )
        rescored = sum(1 for source in self.reported.values() if source == "rescored")
        if rescored:
            terminalreporter.write_line(
                f"{rescored} of {tally.items} items re-scored: stored answers judged by a"
                " changed scorer, no API call"
            )
        if self._runlog is not None and self._runlog.items:
            terminalreporter.write_line(
                f"llmbench: run {self.run_id}; python -m pytest_llmbench report"
                f" {self.settings.store_dir} shows it again"
            )

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not self.is_worker and (self.settings.store_dir / "store.json").exists():
            places, key = self._store_places()
            places.remember(key, self.settings.store_dir)
        if self._engine is not None:
            if exitstatus != pytest.ExitCode.INTERRUPTED and not session.shouldstop:
                self._engine.drain()  # items claimed for other workers: finish, do not waste
            # The fork server reaps its hosts and exits while the manifest is written and
            # the summary printed; waited for at unconfigure (~0.05 s of every run's end).
            self._ending = self._engine.shutdown(wait=False)
            self._engine = None
        self._close_early_server()
        self._flush_store()  # every item is done: what they stored goes to disk now
        self.write_manifest(exitstatus)

    def _flush_store(self) -> None:
        if self._syncer is not None:
            self._syncer.close()
            self._syncer = None

    def _close_early_server(self) -> None:
        self._preflight_pending = None
        if self._early_server is not None:  # no engine adopted it: no item ran here
            self._early_server.close()
            self._early_server = None

    def pytest_unconfigure(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
        if self._ending is not None:
            self._ending.wait_closed()
            self._ending = None
        self._close_early_server()
        self._flush_store()
        if self._fork_server is not None:
            self._fork_server.close()
            self._fork_server = None
        if self._run_slots_path is not None:
            from pytest_llmbench.engine import runslots

            runslots.remove(self._run_slots_path)
            self._run_slots_path = None
        if self._sim is not None:
            self._sim.stop()
            self._sim = None
        _skip_exit_collection()


def _skip_exit_collection() -> None:
    """Have the interpreter's exit skip its last cyclic-GC pass over the run's objects.

    At exit the interpreter walks every object still alive (a run's items, reports and
    records) looking for cycles to collect: ~0.1 s after 2000 items, on the wall time of
    every run and growing with its size. Freezing them first (``gc.freeze``, O(1)) takes
    them out of that pass; nothing is lost, since nothing of the run's is collected then
    that the process's exit would not free anyway. Registered at exit (``atexit``), not
    done here: a process that goes on after this session (``pytester``'s in-process runs)
    keeps collecting its garbage. Registered once per process, afresh at each session's
    end: exit handlers run last in, first out, so the freeze comes after those registered
    since and before those registered earlier (logging's), which need no collection."""
    import atexit
    import gc

    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def _with_tle_presets(case: Case, stored: ItemResult | None) -> Case:
    """Seed 004's start-up rule: a code item whose stored run timed out starts with a
    preset limit (for this run only: the preset is not part of the item's key)."""
    if stored is None or case.scorer.name != "code" or not stored.details:
        return case
    from pytest_llmbench.scoring.codeexec import presets_from_history

    presets = presets_from_history([stored.details])
    if not presets:
        return case
    log.info("%s: preset time limits from stored TLE: %s", stored.identity.get("nodeid"), presets)
    options = {**case.scorer.options, "preset_limits": presets}
    return dataclasses.replace(case, scorer=dataclasses.replace(case.scorer, options=options))


def _worker_index(value: object) -> int:
    """``gw3`` -> 3 (xdist's worker ids; a custom id counts as 0: only an ordering hint)."""
    try:
        return max(0, int(str(value).removeprefix("gw")))
    except ValueError:
        return 0


def _is_llm_item(item: Any) -> bool:
    from pytest_llmbench.collect.items import LLMItem

    return isinstance(item, LLMItem)


__all__ = ["LLMBenchSession", "SESSION_KEY", "Path"]


def _agent_key(case: Case) -> dict[str, Any]:
    """What of an agent item changes its result: its tools (with their implementation) and
    limits; nothing for a plain item, so plain items keep their keys."""
    if not case.tools and case.agent is None:
        return {}
    tools = [{k: v for k, v in to_jsonable(t).items() if k != "base_dir"}  # where the
             for t in case.tools]  # checkout lives must not change a key
    return {"tools": tools, "agent": to_jsonable(case.agent)}
