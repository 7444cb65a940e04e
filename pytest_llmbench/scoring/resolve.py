"""Scorers: judge a model's answer against the instance's expectation.

A scorer is any ``Callable[[ScoreRequest], Score]``. A suite names it; the name resolves,
first match wins:

1. the ``pytest_llmbench_get_scorer(name)`` hook (conftests and plugins add or override scorers);
2. the built-ins: ``exact``, ``normalized`` (``normalised``), ``contains``, ``regex``,
   ``numeric``, ``choice``, ``json`` and ``code`` (the latter lives in ``codeexec.py`` and is
   imported only when called, so a broken sandbox fails only the suites that use it);
3. a ``module:function`` reference, imported with the rootdir / current directory on
   ``sys.path`` as pytest would have them.

Built-ins check their options and expected value with the same code at collection time
(``validate_options``, called by the suite loader) and at scoring time, so a schema mistake
surfaces before anything runs and a scorer never sees an option it does not know.
Nothing here holds run state: resolution is a pure function of its arguments (and of
``sys.modules`` for references).

The built-ins themselves (their options, ``expected`` checks and text extractors) are in
``scorers_builtin.py``; this module resolves names, validates specs and runs scorers.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import inspect
import logging
import marshal
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import Score, ScoreRequest, ScorerSpec
from pytest_llmbench.scoring.builtin import (
    _BUILTINS,
    _Bad,
    _check_options,
    _run_builtin,
    _score_code,
    _show,
    extract_choice,
    extract_last_number,
    json_equal,
    normalize_text,
    parse_json_object,
)
from pytest_llmbench.version import plugin_version

__all__ = [
    "ALIASES",
    "BUILTIN_SCORERS",
    "NOT_GIVEN",
    "NamedScorer",
    "ScorerFn",
    "coerce_score",
    "extract_choice",
    "extract_last_number",
    "json_equal",
    "normalize_text",
    "parse_json_object",
    "resolve_scorer",
    "run_scorer",
    "scorer_exists",
    "scorer_fingerprint",
    "unknown_scorer_message",
    "validate_options",
]

log = logging.getLogger("pytest_llmbench.scoring.resolve")

ScorerFn = Callable[[ScoreRequest], Score]

#: Built-in scorer names, in the order shown in messages.
BUILTIN_SCORERS: tuple[str, ...] = (
    "exact", "normalized", "contains", "regex", "numeric", "choice", "json", "code",
)
ALIASES: Mapping[str, str] = {"normalised": "normalized"}


class _NotGiven:
    """Sentinel type: ``expected`` not passed (``None`` is a real, if useless, value)."""

    def __repr__(self) -> str:
        return "NOT_GIVEN"


NOT_GIVEN: Any = _NotGiven()


@dataclass(frozen=True)
class NamedScorer:
    """A resolved scorer with the name it was resolved from (for error messages)."""

    name: str
    fn: Callable[[ScoreRequest], Any]

    def __call__(self, req: ScoreRequest) -> Score:
        return coerce_score(self.fn(req), self.name)


def unknown_scorer_message(name: str) -> str:
    close = difflib.get_close_matches(name, [*BUILTIN_SCORERS, *ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"unknown scorer {name!r}{hint}: use a built-in scorer ({', '.join(BUILTIN_SCORERS)}), "
        "or a 'module:function' reference, or a plugin implementing pytest_llmbench_get_scorer"
    )


def _from_hook(hook: Any, name: str) -> Callable[[ScoreRequest], Any] | None:
    """Ask ``pytest_llmbench_get_scorer``. ``hook`` is a hook relay (``config.hook``) or the hook
    caller itself; without the hookspec registered, pluggy returns a list of results."""
    if hook is None:
        return None
    caller = getattr(hook, "pytest_llmbench_get_scorer", None)
    if caller is None and callable(hook):
        caller = hook
    if caller is None:
        return None
    try:
        result = caller(name=name)
    except Exception as exc:
        raise ScorerError(f"pytest_llmbench_get_scorer({name!r}) raised {type(exc).__name__}: {exc}") from exc
    if isinstance(result, list):
        result = next((r for r in result if r is not None), None)
    if result is not None and not callable(result):
        raise ScorerError(f"pytest_llmbench_get_scorer({name!r}) returned {result!r}, which is not callable")
    return cast("Callable[[ScoreRequest], Any] | None", result)


def _rootdir_of(pluginmanager: Any) -> Path | None:
    config = pluginmanager.get_plugin("pytestconfig") if pluginmanager is not None else None
    rootpath = getattr(config, "rootpath", None)
    return rootpath if isinstance(rootpath, Path) else None


#: Scorer modules whose code was checked against their source in this process (by path).
_CHECKED: set[str] = set()


def _without_stale_bytecode(module: Any) -> Any:
    """``module``, its body run again from its source if it ran stale bytecode.

    Python trusts a ``.pyc`` whose recorded source mtime (whole seconds) and size match the
    source file: a scorer edited within the same second to a file of the same size (``1.0
    if`` -> ``0.0 if``, a script flipping a threshold and running at once) runs its old code,
    while its fingerprint (``scorer_fingerprint``) is the new source's hash, so the old
    code's verdicts would be stored as the new scorer's, and reused from then on. Once per
    module and process, the module's source is compiled and compared with its cached code;
    when they differ, the cache file is removed (the processes that import the module after
    this one compile the source) and the module's body runs again from the source."""
    path, cached = getattr(module, "__file__", None), getattr(module, "__cached__", None)
    if not path or not cached or not str(path).endswith(".py") or path in _CHECKED:
        return module
    _CHECKED.add(path)
    try:
        with open(cached, "rb") as fh:
            data = fh.read()
        with open(path, "rb") as fh:
            source = fh.read()
        if len(data) < 16 or int.from_bytes(data[4:8], "little") & 1:
            return module  # hash-based: checked by Python, or unchecked by request
        fresh = compile(source, path, "exec", dont_inherit=True)
        stale = marshal.loads(data[16:]) != fresh
    except (OSError, ValueError, EOFError, TypeError, SyntaxError):
        return module  # no cache file, or one Python will not use either: nothing stale
    if not stale:
        return module
    log.warning("scorer module %s ran bytecode older than its source (edited within the "
                "same second, same size): run again from source", path)
    # The item processes import it by name: without the cache file they compile the
    # source (and write a correct one). Here, the module body runs again from the source
    # itself, as ``importlib.reload`` would (which would find the stale file again if it
    # could not be removed).
    with contextlib.suppress(OSError):
        os.unlink(cached)
    exec(fresh, module.__dict__)  # noqa: S102 - the module's own source, as an import runs it
    return module


def _import_reference(ref: str, rootdir: str | os.PathLike[str] | None) -> Callable[[ScoreRequest], Any]:
    """Import ``module:function`` (``function`` may be dotted, e.g. ``Class.method``).

    Only when the module itself is not found are the rootdir and current directory put on
    ``sys.path`` (kept there, as pytest keeps the rootdir for conftests): a module that is
    found but fails inside is reported as it is.
    """
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ScorerError(f"scorer reference {ref!r} must look like 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing_self = exc.name is not None and (module_name + ".").startswith(exc.name + ".")
        added = []
        if missing_self:
            for directory in (os.getcwd(), rootdir):  # rootdir ends up first
                if directory is not None and str(directory) not in sys.path:
                    sys.path.insert(0, str(directory))
                    added.append(str(directory))
        if not added:
            raise ScorerError(f"cannot import module {module_name!r} for scorer {ref!r}: {exc}") from exc
        log.debug("added %s to sys.path to import scorer %s", added, ref)
        importlib.invalidate_caches()
        try:
            module = importlib.import_module(module_name)
        except Exception as exc2:
            for directory in added:
                sys.path.remove(directory)
            raise ScorerError(
                f"cannot import module {module_name!r} for scorer {ref!r}: {type(exc2).__name__}: {exc2}"
            ) from exc2
    except Exception as exc:
        raise ScorerError(
            f"cannot import module {module_name!r} for scorer {ref!r}: {type(exc).__name__}: {exc}"
        ) from exc
    module = _without_stale_bytecode(module)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ScorerError(f"scorer reference {ref!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ScorerError(f"scorer reference {ref!r} is not callable ({type(obj).__name__})")
    return cast("Callable[[ScoreRequest], Any]", obj)


def _resolve(name: str, hook: Any, rootdir: str | os.PathLike[str] | None) -> NamedScorer:
    fn = _from_hook(hook, name)
    if fn is not None:
        return NamedScorer(name, fn)
    canonical = ALIASES.get(name, name)
    if canonical in _BUILTINS:
        return NamedScorer(canonical, functools.partial(_run_builtin, canonical))
    if canonical == "code":
        return NamedScorer("code", _score_code)
    if ":" in name:
        return NamedScorer(name, _import_reference(name, rootdir))
    raise ScorerError(unknown_scorer_message(name))


def resolve_scorer(
    spec: ScorerSpec, pluginmanager: Any = None, *, rootdir: str | os.PathLike[str] | None = None
) -> NamedScorer:
    """The scorer for ``spec.name``: hook, then built-in, then ``module:function``.

    ``pluginmanager`` is pytest's (``config.pluginmanager``) or any pluggy manager with the
    hookspecs added; ``rootdir`` defaults to the rootdir of the pytest config registered in
    it. The options are not bound: pass ``spec.options`` in the ``ScoreRequest``.
    """
    hook = pluginmanager.hook if pluginmanager is not None else None
    return _resolve(spec.name, hook, rootdir if rootdir is not None else _rootdir_of(pluginmanager))


def scorer_exists(name: str, hook: Any = None, *, rootdir: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``name`` resolves (a ``module:function`` reference is imported to know)."""
    try:
        _resolve(name, hook, rootdir)
    except ScorerError as exc:
        log.debug("scorer %r does not resolve: %s", name, exc)
        return False
    return True


def validate_options(
    spec: ScorerSpec,
    expected: Any = NOT_GIVEN,
    *,
    hook: Any = None,
    rootdir: str | os.PathLike[str] | None = None,
) -> None:
    """Raise ScorerError if ``spec`` cannot work: unknown scorer, threshold outside [0, 1],
    an unknown or ill-typed option of a built-in, or (when given) an ``expected`` value the
    built-in cannot use. A name provided by the hook is the plugin's to validate."""
    threshold = spec.threshold
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= float(threshold) <= 1:
        raise ScorerError(f"scorer {spec.name!r}: threshold must be a number in [0, 1], not {threshold!r}")
    if _from_hook(hook, spec.name) is not None:
        return
    canonical = ALIASES.get(spec.name, spec.name)
    if canonical in _BUILTINS:
        try:
            opts = _check_options(canonical, spec.options)
            if expected is not NOT_GIVEN:
                _BUILTINS[canonical].expected(expected, opts)
        except _Bad as exc:
            raise ScorerError(f"scorer {spec.name!r}: {exc}") from None
    elif canonical != "code":  # code's options belong to codeexec, checked when it runs
        _resolve(spec.name, None, rootdir)


def scorer_fingerprint(scorer: NamedScorer) -> str:
    """What a stored verdict of ``scorer`` is valid for, beyond its name and options.

    - a built-in: the plugin's version (a release may change how it judges);
    - anything else (``module:function``, a hook's callable): a sha256 of the source file
      that defines it (the whole file, so an edited helper the function calls counts too;
      re-scoring costs no API call, so erring towards "changed" is cheap), or of the
      function's own source when there is no file;
    - plus ``llmbench_fingerprint`` when the callable has one (a string, or a callable
      returning one): a judge scorer puts its judge model's configuration there.
    """
    fn: Any = scorer.fn
    if (isinstance(fn, functools.partial) and fn.func is _run_builtin) or fn is _score_code:
        return f"builtin:{plugin_version()}"
    extra = getattr(fn, "llmbench_fingerprint", None)
    if callable(extra):
        extra = extra()
    target = fn.func if isinstance(fn, functools.partial) else fn
    digest = _source_digest(target)
    return f"source:{digest}" + (f";judge:{extra}" if extra is not None else "")


def runs_only_our_code(scorer: Any) -> bool:
    """Whether ``scorer`` is a built-in text scorer: this package's code, no process, no
    I/O (not ``code``, which runs programs). Items so scored may share an item host."""
    fn = getattr(scorer, "fn", None) if isinstance(scorer, NamedScorer) else None
    return isinstance(fn, functools.partial) and fn.func is _run_builtin


def _source_digest(fn: Any) -> str:
    """sha256 of the file defining ``fn`` (or of its source, or of its name)."""
    target = inspect.unwrap(fn) if callable(fn) else fn
    try:
        path = inspect.getsourcefile(target) or inspect.getsourcefile(type(target))
        if path:
            with open(path, "rb") as fh:
                return hashlib.sha256(fh.read()).hexdigest()[:32]
    except (OSError, TypeError):
        pass
    try:
        text = inspect.getsource(target)
    except (OSError, TypeError):
        text = f"{getattr(target, '__module__', '')}:{getattr(target, '__qualname__', repr(target))}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def coerce_score(raw: Any, name: str) -> Score:
    """A scorer's return value as a Score: a Score, or a bare bool/int/float, in [0, 1]."""
    if isinstance(raw, Score):
        value: Any = raw.value
    elif isinstance(raw, numbers.Real):
        value = raw
    else:
        raise ScorerError(
            f"scorer {name!r} returned {type(raw).__name__} {_show(repr(raw), 40)}; "
            "a scorer must return a Score or a number in [0, 1]"
        )
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ScorerError(f"scorer {name!r} returned score {value!r}, outside [0, 1]")
    if isinstance(raw, Score):
        return raw if type(raw.value) is float else replace(raw, value=float(value))
    return Score(value=float(value))


def run_scorer(scorer: Callable[[ScoreRequest], Any], req: ScoreRequest, threshold: float) -> tuple[Score, bool]:
    """Score ``req``; returns ``(score, passed)`` with passed = ``value >= threshold``.

    Anything the scorer raises becomes a ScorerError carrying the original type and
    message (the item's error class is then ``scorer_error``, not a crash).
    """
    name = getattr(scorer, "name", None) or getattr(scorer, "__qualname__", None) or repr(scorer)
    try:
        raw = scorer(req)
    except ScorerError:
        raise
    except Exception as exc:
        raise ScorerError(f"scorer {name!r} raised {type(exc).__name__}: {exc}") from exc
    score = coerce_score(raw, str(name))
    return score, score.value >= threshold
