"""Settings: one resolver, one documented precedence, values validated at the boundary.

Precedence for every setting (highest first)::

    per-item override (suite / marker)      applied later, per item (engine)
    command line (--llmbench-*)
    environment, then a ``.env`` file in the rootdir
    ini option (pytest.ini / [tool.pytest.ini_options]: llmbench_*)
    [tool.llmbench] in pyproject.toml, or llmbench.toml
    built-in default

Environment variables are the ones the user's own runners used (``OPENAI_TIMEOUT``,
``OPENAI_MAX_RETRIES``, ``TASK_EXECUTION_TIMEOUT``, ``RESOURCE_MAX_OCCUPATION_TIME``) plus
``LLMBENCH_*`` twins. A bad value is a ``ConfigError`` naming where it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_llmbench.errors import ConfigError
from pytest_llmbench.records import Deadlines, ModelSpec

try:  # compiled wheels: 1.5-2.7x faster than the stdlib's pure-Python copy (pyproject.toml)
    import tomli as tomllib
except ImportError:  # pragma: no cover - a tomli-less environment (not as installed)
    import tomllib  # type: ignore[no-redef, import-not-found, unused-ignore]

#: The built-in simulated model, used when nothing else is configured.
SIM_MODEL = ModelSpec(name="sim", model="sim-1", base_url="sim")

DEFAULT_CONCURRENCY = 16
#: Shareable items (``runner.Job.shareable``) one item host runs at once, a thread each.
#: Measured in bench/README.md ("shared hosts"): a process per item in flight cost
#: 2.2x the CPU per item at 1000 in flight and took 6.7 s to start 1000 items.
DEFAULT_HOST_THREADS = 16
#: Seconds a stored result may wait for the disk (``store/durable.py``): the run's file
#: store is flushed this often in one ``syncfs``; 0 fsyncs every result as it is stored.
DEFAULT_SYNC_INTERVAL = 1.0
#: Without a configured concurrency, the items in flight of a whole ``-n W`` run: each
#: worker gets ``max(2, DEFAULT_RUN_CONCURRENCY // W)``. Measured (bench/run.py, xdist):
#: under ``-n 32`` on 2 cores, 16 per worker (512 in flight) took 21 s for 500 items, 2-4
#: per worker 14.5 s; and a paid endpoint is not hit by hundreds of requests at once.
DEFAULT_RUN_CONCURRENCY = 64


def default_concurrency() -> int:
    """16 per process; under xdist, 64 // W per worker (at least 2). A worker that gets
    the controller's run-wide count (engine/runslots.py) uses all 64 instead, as long as
    the others leave them free; this even split is the fallback without it."""
    try:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    except ValueError:
        workers = 1
    if workers <= 1:
        return DEFAULT_CONCURRENCY
    return max(2, DEFAULT_RUN_CONCURRENCY // workers)
DEFAULT_STORE = ".llmbench"
MAX_API_RETRIES = 20
"""More retries than this is a usage error: a failing endpoint is not fixed by retrying."""
DEFAULT_BREAKER_THRESHOLD = 5
DEFAULT_BREAKER_COOLDOWN = 30.0

#: setting -> (CLI dest, ini name, env vars, help). One help text serves CLI and ini.
DEADLINE_SOURCES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "api_timeout": (
        "llmbench_api_timeout",
        ("LLMBENCH_API_TIMEOUT", "OPENAI_TIMEOUT"),
        "Seconds one API attempt may take (default 30)",
    ),
    "api_retries": (
        "llmbench_api_retries",
        ("LLMBENCH_API_RETRIES", "OPENAI_MAX_RETRIES"),
        "Retries after a failed API attempt (default 2)",
    ),
    "task_timeout": (
        "llmbench_task_timeout",
        ("LLMBENCH_TASK_TIMEOUT", "TASK_EXECUTION_TIMEOUT"),
        "Seconds one item may take in all; its process tree is killed after (default 600)",
    ),
    "lease_max": (
        "llmbench_lease_max",
        ("LLMBENCH_LEASE_MAX", "RESOURCE_MAX_OCCUPATION_TIME"),
        "Seconds a lease on a shared resource may be held (default 900)",
    ),
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the run needs to know, resolved once at configure time."""

    models: tuple[ModelSpec, ...]
    """Selected models, in command-line order."""
    deadlines: Deadlines
    deadline_sources: Mapping[str, str] = field(default_factory=dict)
    """setting -> where its value came from (for the header)."""
    store_dir: Path
    concurrency: int = DEFAULT_CONCURRENCY
    host_threads: int = DEFAULT_HOST_THREADS
    """How many shareable items an item host runs at once (1: every item has a process)."""
    concurrency_is_default: bool = False
    """No concurrency was configured: under xdist, the workers share a run-wide
    ``DEFAULT_RUN_CONCURRENCY`` (engine/runslots.py)."""
    fresh: bool = False
    rescore: bool = False
    jsonl: Path | None = None
    resources: Mapping[str, int] = field(default_factory=dict)
    """Lease pools: name -> slots."""
    sim_options: Mapping[str, Any] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    """Values from the rootdir's ``.env`` file (secrets included: never printed)."""
    breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN
    preflight: bool = True
    """Check every selected model's endpoint before the first item (session/preflight.py)."""
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    """Seconds between flushes of the file store to disk; 0: an fsync per result."""

    def api_key(self, model: ModelSpec) -> str | None:
        """The model's key from the environment or ``.env``; never stored anywhere."""
        if not model.api_key_env:
            return None
        key = os.environ.get(model.api_key_env) or self.env.get(model.api_key_env) or None
        from pytest_llmbench.scrub import add_secret

        add_secret(key)  # every text quoting a server's bytes is scrubbed of it
        return key


# --- parsing helpers ---------------------------------------------------------------------


def parse_seconds(value: object, where: str, *, allow_zero: bool = False) -> float:
    """A positive number of seconds; ``where`` names the option/variable for the message."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number of seconds, got {value!r} (e.g. 30)") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: expected a finite number of seconds, got {value!r} (e.g. 30)")
    if number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{where}: must be greater than 0, got {value!r} (use a positive number)")
    return number


def parse_count(value: object, where: str, *, minimum: int = 0,
                maximum: int | None = None) -> int:
    """A whole number in ``minimum..maximum``."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a whole number, got {value!r} (e.g. 2)")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ConfigError(f"{where}: expected a whole number, got {value!r} (e.g. 2)") from None
    if number < minimum:
        raise ConfigError(f"{where}: must be at least {minimum}, got {value!r} (use {minimum} or more)")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{where}: must be at most {maximum}, got {value!r} (use {maximum} or less)")
    return number


def parse_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r} (use true or false)")


def read_dotenv(path: Path) -> dict[str, str]:
    """Minimal ``.env`` reader: ``KEY=VALUE`` lines, ``#`` comments, optional quotes/export."""
    values: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return values
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read .env file: {exc}") from None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE in .env file (write KEY=VALUE, "
                              "or comment the line out with #)")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_file_config(rootdir: Path) -> tuple[dict[str, Any], Path | None]:
    """``[tool.llmbench]`` of pyproject.toml, else the whole of ``llmbench.toml``."""
    standalone = rootdir / "llmbench.toml"
    if standalone.is_file():
        return _load_toml(standalone), standalone
    pyproject = rootdir / "pyproject.toml"
    if pyproject.is_file():
        data = _load_toml(pyproject).get("tool", {}).get("llmbench")
        if data is not None:
            if not isinstance(data, dict):
                raise ConfigError(f"{pyproject}: [tool.llmbench] must be a table (write it as a "
                                  "[tool.llmbench] section)")
            return data, pyproject
    return {}, None


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc} (fix the syntax there)") from None


#: Keys of ``[tool.llmbench.sim]``: keywords of ``SimServer.start`` (docs/simulator.md).
SIM_KEYS = frozenset({
    "latency", "jitter", "error_rate", "hang_rate", "fail_rate", "rpm", "require_key",
    "request_log", "seed", "models",
})

_MODEL_KEYS = {
    "model", "base_url", "api_key_env", "params", "stream", "rpm", "tpm",
    "max_connections", "headers", "fallbacks", "api_version", "max_response_bytes",
    "max_retry_after", "price_input", "price_output",
}


def parse_model_table(name: str, table: object, where: str) -> ModelSpec:
    """One ``[tool.llmbench.models.NAME]`` table."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: models.{name} must be a table (declare it as "
                          f"[tool.llmbench.models.{name}] with base_url, model, ...)")
    if "api_key" in table:  # a secret in a file that gets committed: say what to do instead
        raise ConfigError(
            f"{where}: models.{name}.api_key: keys are read from the environment only "
            f"(remove it; set api_key_env = \"VAR\" and export VAR, or put VAR in .env)"
        )
    unknown = set(table) - _MODEL_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: models.{name}: unknown key(s) {sorted(unknown)}; "
            f"allowed: {sorted(_MODEL_KEYS)}"
        )
    base_url = table.get("base_url", "sim")
    if not isinstance(base_url, str) or not (base_url == "sim" or "://" in base_url):
        raise ConfigError(
            f"{where}: models.{name}.base_url: expected an http(s) URL ending in /v1 "
            f"or \"sim\", got {base_url!r}"
        )
    params = table.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: models.{name}.params must be a table "
                          "(e.g. params = { temperature = 0.0, max_tokens = 512 })")
    def opt_num(key: str) -> float | None:
        value = table.get(key)
        return None if value is None else parse_seconds(value, f"{where}: models.{name}.{key}")
    max_conn = table.get("max_connections")
    return ModelSpec(
        name=name,
        model=str(table.get("model", name)),
        base_url=base_url,
        api_key_env=table.get("api_key_env", None if base_url == "sim" else "OPENAI_API_KEY"),
        params=params,
        stream=parse_bool(table.get("stream", False), f"{where}: models.{name}.stream"),
        rpm=opt_num("rpm"),
        tpm=opt_num("tpm"),
        max_connections=None if max_conn is None else parse_count(
            max_conn, f"{where}: models.{name}.max_connections", minimum=1
        ),
        headers={str(k): str(v) for k, v in dict(table.get("headers", {})).items()},
        price_input=_price(table, "price_input", f"{where}: models.{name}"),
        price_output=_price(table, "price_output", f"{where}: models.{name}"),
        **_provider_keys(name, table, where),
    )


def _provider_keys(name: str, table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The model keys the OpenAI-compatible provider reads (docs/configuration.md)."""
    out: dict[str, Any] = {}
    version = table.get("api_version")
    if version is not None:
        if not isinstance(version, str) or not version.strip():
            raise ConfigError(f"{where}: models.{name}.api_version: expected a string such as "
                              f"\"2024-06-01\", got {version!r}")
        out["api_version"] = version.strip()
    if "max_response_bytes" in table:
        out["max_response_bytes"] = parse_count(
            table["max_response_bytes"], f"{where}: models.{name}.max_response_bytes",
            minimum=1024)
    if "max_retry_after" in table:
        out["max_retry_after"] = parse_seconds(
            table["max_retry_after"], f"{where}: models.{name}.max_retry_after")
    return out




def _price(table: Mapping[str, Any], key: str, where: str) -> float | None:
    """An optional price in USD per 1M tokens (a number >= 0)."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(
            f"{where}.{key}: expected a price in USD per 1M tokens (a number >= 0), got {value!r}"
        )
    return float(value)


def parse_model_arg(value: str, declared: Mapping[str, ModelSpec]) -> ModelSpec:
    """``--llmbench-model`` value: a declared name, ``sim``, or ``NAME@BASE_URL``."""
    value = value.strip()
    if "@" in value:
        name, _, url = value.partition("@")
        if not name or "://" not in url:
            raise ConfigError(
                f"--llmbench-model {value!r}: expected NAME@BASE_URL, "
                "e.g. local@http://127.0.0.1:8000/v1"
            )
        return ModelSpec(name=name, model=name, base_url=url, api_key_env="OPENAI_API_KEY")
    if value in declared:
        return declared[value]
    if value == "sim":
        return SIM_MODEL
    known = ", ".join(sorted([*declared, "sim"]))
    raise ConfigError(
        f"--llmbench-model {value!r}: unknown model; declared: {known} "
        "(declare it under [tool.llmbench.models] or pass NAME@BASE_URL)"
    )


def check_hierarchy(deadlines: Deadlines, max_turns: int = 1) -> str | None:
    """Say which numbers break ``lease > task > api_timeout x (retries+1) x max_turns``."""
    api_total = deadlines.api_timeout * (deadlines.api_retries + 1) * max_turns
    problems = []
    if not deadlines.task_timeout > api_total:
        problems.append(
            f"task_timeout {deadlines.task_timeout:g} s <= api_timeout {deadlines.api_timeout:g} s"
            f" x (retries {deadlines.api_retries} + 1) x max_turns {max_turns} = {api_total:g} s"
            " (late retries will be cut short by the task deadline)"
        )
    if not deadlines.lease_max > deadlines.task_timeout:
        problems.append(
            f"lease_max {deadlines.lease_max:g} s <= task_timeout {deadlines.task_timeout:g} s"
            " (a lease may be reclaimed from a task that is still within its deadline)"
        )
    return "; ".join(problems) or None


Getter = Callable[[str], Any]


def resolve_deadlines(
    *,
    cli: Getter,
    ini: Getter,
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
    file_config: Mapping[str, Any],
    file_path: Path | None,
) -> tuple[Deadlines, dict[str, str]]:
    """Apply the precedence to the four deadline settings; returns values and sources."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    file_deadlines = file_config.get("deadlines", {})
    if not isinstance(file_deadlines, dict):
        raise ConfigError(f"{file_path}: deadlines must be a table "
                          "(e.g. [tool.llmbench.deadlines] task_timeout = 600)")
    for key, (dest, env_vars, _help) in DEADLINE_SOURCES.items():
        option = "--" + dest.replace("_", "-")
        candidates: list[tuple[object, str]] = []
        cli_value = cli(dest)
        if cli_value is not None:
            candidates.append((cli_value, f"option {option}"))
        for var in env_vars:
            if environ.get(var, "").strip():
                candidates.append((environ[var], f"environment variable {var}"))
        for var in env_vars:
            if dotenv.get(var, "").strip():
                candidates.append((dotenv[var], f".env variable {var}"))
        ini_value = ini(dest)
        if ini_value not in (None, ""):
            candidates.append((ini_value, f"ini option {dest}"))
        if key in file_deadlines:
            candidates.append((file_deadlines[key], f"{file_path}: deadlines.{key}"))
        if not candidates:
            sources[key] = "default"
            continue
        raw, where = candidates[0]
        if key == "api_retries":
            values[key] = parse_count(raw, where, maximum=MAX_API_RETRIES)
        else:
            values[key] = parse_seconds(raw, where)
        sources[key] = where
    return Deadlines(**values), sources


def deadline_overrides(raw: Mapping[str, Any], where: str) -> dict[str, float]:
    """Validate per-item overrides (suite ``deadlines`` table or ``llmbench`` marker)."""
    out: dict[str, float] = {}
    for key, value in raw.items():
        if key not in DEADLINE_SOURCES:
            raise ConfigError(f"{where}: unknown deadline {key!r}; allowed: {sorted(DEADLINE_SOURCES)}")
        out[key] = parse_count(value, f"{where}.{key}", maximum=MAX_API_RETRIES) if key == "api_retries" else parse_seconds(
            value, f"{where}.{key}"
        )
    return out


def declared_models(file_config: Mapping[str, Any], where: str) -> dict[str, ModelSpec]:
    models = file_config.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{where}: models must be a table of tables "
                          "(declare each as [tool.llmbench.models.NAME])")
    declared = {name: parse_model_table(name, table, where) for name, table in models.items()}
    return {name: _with_fallbacks(spec, models[name], declared, where)
            for name, spec in declared.items()}


def _with_fallbacks(spec: ModelSpec, table: Mapping[str, Any], declared: Mapping[str, ModelSpec],
                    where: str) -> ModelSpec:
    """Resolve ``fallbacks = ["other", ...]`` to the declared models (one level deep)."""
    names = table.get("fallbacks", [])
    key = f"{where}: models.{spec.name}.fallbacks"
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{key}: expected a list of declared model names")
    unknown = [n for n in names if n not in declared or n == spec.name]
    if unknown:
        raise ConfigError(f"{key}: {unknown} not declared under [tool.llmbench.models] "
                          f"(or the model itself); declared: {sorted(declared)}")
    return dataclasses.replace(spec, fallbacks=tuple(declared[n] for n in names))


def parse_breaker(file_config: Mapping[str, Any], where: str) -> tuple[int, float]:
    """``[tool.llmbench.breaker]``: ``threshold`` (consecutive failures) and ``cooldown`` (s)."""
    table = file_config.get("breaker", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: breaker must be a table (threshold, cooldown)")
    unknown = set(table) - {"threshold", "cooldown"}
    if unknown:
        raise ConfigError(f"{where}: breaker: unknown key(s) {sorted(unknown)}; "
                          "allowed: cooldown, threshold")
    threshold = parse_count(table.get("threshold", DEFAULT_BREAKER_THRESHOLD),
                            f"{where}: breaker.threshold", minimum=1)
    cooldown = parse_seconds(table.get("cooldown", DEFAULT_BREAKER_COOLDOWN),
                             f"{where}: breaker.cooldown")
    return threshold, cooldown


def select_models(
    cli_models: Sequence[str], ini_models: Sequence[str], declared: Mapping[str, ModelSpec],
    file_default: object, where: str,
) -> tuple[ModelSpec, ...]:
    chosen: Sequence[str]
    if cli_models:
        chosen = cli_models
    elif ini_models:
        chosen = ini_models
    elif file_default is not None:
        if not isinstance(file_default, list) or not all(isinstance(x, str) for x in file_default):
            raise ConfigError(f"{where}: default_models must be a list of model names "
                              '(e.g. default_models = ["gpt-4o"])')
        chosen = file_default
    else:
        chosen = ["sim"]
    models = [parse_model_arg(v, declared) for v in chosen]
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--llmbench-model: model(s) selected twice: {', '.join(dupes)} "
                          "(name each model once)")
    return tuple(models)


def resolve_concurrency(cli: Getter, ini: Getter, file_config: Mapping[str, Any],
                        where: str) -> int:
    """CLI > ``LLMBENCH_CONCURRENCY`` > ini > file > default; a bad value names its source."""
    candidates = (
        (cli("llmbench_concurrency"), "--llmbench-concurrency"),
        (os.environ.get("LLMBENCH_CONCURRENCY", "").strip(),
         "environment variable LLMBENCH_CONCURRENCY"),
        (ini("llmbench_concurrency"), "ini option llmbench_concurrency"),
        (file_config.get("concurrency"), f"{where}: concurrency"),
    )
    for raw, source in candidates:
        if raw not in (None, ""):
            return parse_count(raw, source, minimum=1)
    return default_concurrency()


def resolve_host_threads(cli: Getter, ini: Getter, file_config: Mapping[str, Any],
                         where: str) -> int:
    """CLI > ini > file > default; a bad value names its source."""
    candidates = (
        (cli("llmbench_host_threads"), "--llmbench-host-threads"),
        (ini("llmbench_host_threads"), "ini option llmbench_host_threads"),
        (file_config.get("host_threads"), f"{where}: host_threads"),
    )
    for raw, source in candidates:
        if raw not in (None, ""):
            return parse_count(raw, source, minimum=1, maximum=1024)
    return DEFAULT_HOST_THREADS


def _resources(file_config: Mapping[str, Any], where: str) -> dict[str, int]:
    """``[tool.llmbench.resources]``: lease pool name -> slots."""
    raw = file_config.get("resources", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: resources must be a table of pool = slots "
                          "(e.g. [tool.llmbench.resources] sandbox = 2)")
    return {str(name): parse_count(slots, f"{where}: resources.{name}", minimum=1)
            for name, slots in raw.items()}


def _sim_options(file_config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``[tool.llmbench.sim]``: keywords of ``SimServer.start``."""
    options = file_config.get("sim", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: sim must be a table of simulator options "
                          "(e.g. [tool.llmbench.sim] latency = 0.1)")
    bad = sorted(set(options) - SIM_KEYS)
    if bad:  # they are SimServer.start's keywords: an unknown one would be a TypeError
        raise ConfigError(f"{where}: sim: unknown key(s) {bad}; allowed: {sorted(SIM_KEYS)}")
    return options


def _output_path(raw: object, base: Path) -> Path:
    """A path given on the command line: ``~`` expanded, relative to where pytest started."""
    path = Path(str(raw)).expanduser()
    return path if path.is_absolute() else base / path


def load_settings(config: Any) -> Settings:
    """Build ``Settings`` from a ``pytest.Config`` (CLI, ini), the environment and files."""
    rootdir = Path(config.rootpath)
    file_config, file_path = read_file_config(rootdir)
    where = str(file_path) if file_path else "[tool.llmbench]"
    unknown = set(file_config) - {
        "models", "default_models", "deadlines", "resources", "store", "concurrency", "sim",
        "breaker", "host_threads",
    }
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}; allowed: models, default_models, "
            "deadlines, resources, store, concurrency, sim, breaker, host_threads"
        )
    dotenv = read_dotenv(rootdir / ".env")

    def cli(dest: str) -> Any:
        return config.getoption(dest, None)

    def ini(name: str) -> Any:
        return config.getini(name)

    deadlines, sources = resolve_deadlines(
        cli=cli, ini=ini, environ=os.environ, dotenv=dotenv,
        file_config=file_config, file_path=file_path,
    )
    declared = declared_models(file_config, where)
    models = select_models(
        cli("llmbench_models") or [], ini("llmbench_models") or [], declared,
        file_config.get("default_models"), where,
    )

    store_raw = cli("llmbench_store") or ini("llmbench_store") or file_config.get("store") or DEFAULT_STORE
    store_dir = Path(str(store_raw)).expanduser()
    if not store_dir.is_absolute():
        store_dir = rootdir / store_dir

    concurrency = resolve_concurrency(cli, ini, file_config, where)
    concurrency_is_default = all(
        v in (None, "") for v in (cli("llmbench_concurrency"), ini("llmbench_concurrency"),
                                  os.environ.get("LLMBENCH_CONCURRENCY", "").strip())
    ) and "concurrency" not in file_config
    host_threads = resolve_host_threads(cli, ini, file_config, where)
    resources = _resources(file_config, where)
    sim_options = _sim_options(file_config, where)

    jsonl_raw = cli("llmbench_jsonl") or ini("llmbench_jsonl")
    jsonl = _output_path(jsonl_raw, Path(config.invocation_params.dir)) if jsonl_raw else None

    breaker_threshold, breaker_cooldown = parse_breaker(file_config, where)
    fresh = cli("llmbench_fresh")
    rescore = cli("llmbench_rescore")
    no_preflight = cli("llmbench_no_preflight")
    sync_raw = cli("llmbench_sync_interval")
    if sync_raw in (None, ""):
        sync_raw = ini("llmbench_sync_interval")
    sync_interval = (DEFAULT_SYNC_INTERVAL if sync_raw in (None, "") else parse_seconds(
        sync_raw, "--llmbench-sync-interval (ini llmbench_sync_interval)", allow_zero=True))
    settings = Settings(
        models=models,
        deadlines=deadlines,
        deadline_sources=sources,
        store_dir=store_dir,
        concurrency=concurrency,
        concurrency_is_default=concurrency_is_default,
        host_threads=host_threads,
        fresh=bool(fresh if fresh is not None else ini("llmbench_fresh")),
        rescore=bool(rescore if rescore is not None else ini("llmbench_rescore")),
        jsonl=jsonl,
        resources=resources,
        sim_options=sim_options,
        env=dotenv,
        breaker_threshold=breaker_threshold,
        breaker_cooldown=breaker_cooldown,
        preflight=not bool(no_preflight if no_preflight is not None
                           else ini("llmbench_no_preflight")),
        sync_interval=sync_interval,
    )
    if settings.fresh and settings.rescore:
        raise ConfigError("--llmbench-fresh and --llmbench-rescore exclude each other; pick one")
    check_output_paths(settings)
    return settings


def check_output_paths(settings: Settings) -> None:
    """The store and the JSONL file must be usable *before* the run spends anything.

    (An unusable ``--llmbench-jsonl`` used to fail with a traceback after the whole run; a
    store path that is a file gave one traceback per suite.)"""
    store = settings.store_dir
    if store.exists() and not store.is_dir():
        raise ConfigError(f"store {store}: exists and is not a directory; point "
                          "--llmbench-store (ini llmbench_store) at a directory")
    _check_creatable(store, f"store {store}", "--llmbench-store (ini llmbench_store)")
    if settings.jsonl is not None:
        check_output_file(settings.jsonl, "--llmbench-jsonl")


def check_output_file(path: Path, option: str) -> None:
    """An output file (``--llmbench-jsonl``, ``--llmbench-html``) can be written."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{option} {path}: not writable; fix its permissions "
                          "or choose another file")
    if not path.parent.is_dir():
        raise ConfigError(f"{option} {path}: directory {path.parent} does not "
                          "exist; create it or choose another file")
    _check_creatable(path, f"{option} {path}", option)


def _check_creatable(path: Path, what: str, option: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory."""
    if path.exists():
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what}: {parent} is not a directory; choose another path with "
                          f"{option}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: cannot be created ({parent} is not writable); choose "
                          f"another path with {option}")
