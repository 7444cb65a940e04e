"""Suite files (TOML) to validated, rendered ``Case`` objects.

The schema is documented in ``docs/suites.md``. Loading validates the whole file before it
returns, so a suite that loads never fails later for a reason visible in the file: every
placeholder has a value, every scorer was accepted by the caller's ``scorer_check`` (and
every ``expected`` by its ``expected_check``), every value that ends up in a record is
JSON-representable.

A violation raises exactly one ``SuiteError`` -- the first one in document order -- naming the
file, the key path in TOML dotted form with indices (``prompts[2].instances[0].vars``) and the
fix. One error, deterministic, is easier to act on than a list, and cheap to recompute.

Inheritance is suite > prompt > instance: ``params``, ``deadlines`` and ``extra`` are merged
key by key (the deeper level wins), ``tags`` are united, and ``scorer``, ``threshold`` and
``repeats`` are taken from the deepest level that sets them.

This module must not import ``scoring``: the caller passes ``scorer_check`` so the data flow
stays one way (suite -> item -> engine -> scoring).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from pytest_llmbench.collect.template import find_placeholders, render
from pytest_llmbench.collect.tomlcheck import Checker, display_path, read_toml, sub
from pytest_llmbench.collect.tools import agent_table, merge_agent, tool_list
from pytest_llmbench.config import MAX_API_RETRIES
from pytest_llmbench.errors import ScorerError
from pytest_llmbench.records import AgentLimits, Case, Message, ScorerSpec, ToolSpec

__all__ = ["DEFAULT_SCORER", "ExpectedCheck", "ScorerCheck", "Suite", "load_suite"]

log = logging.getLogger("pytest_llmbench.collect.suite")

ScorerCheck = Callable[[ScorerSpec], None]
"""Raises ``ScorerError`` for an unknown scorer or bad options (``scoring`` provides it)."""

ExpectedCheck = Callable[[ScorerSpec, Any], None]
"""Raises ``ScorerError`` when the scorer cannot use an instance's ``expected`` value
(``None`` when the instance has none), e.g. ``scoring.validate_options(spec, expected)``."""

MAX_REPEATS = 10_000
"""``repeats`` above this is refused: 10**8 repeats used to hang collection."""
MAX_INSTANCES = 1_000_000
"""Instances of one prompt above this are refused (split the prompt or the suite)."""

DEFAULT_SCORER = "exact"
"""The scorer of a case when no level sets one."""

ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
TAG_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROMPTS_HEADER_RE = re.compile(r"^[ \t]*\[\[[ \t]*prompts[ \t]*\]\]", re.MULTILINE)

ROLES = ("system", "user", "assistant")
DEADLINE_KEYS = ("api_timeout", "api_retries", "task_timeout", "lease_max")

#: Tags become pytest markers: these would change how pytest runs the item, or cannot be
#: selected with ``-m`` (the expression operators).
RESERVED_TAGS = frozenset(
    {"skip", "skipif", "xfail", "parametrize", "usefixtures", "filterwarnings",
     "tryfirst", "trylast", "and", "or", "not"}
)

#: ``params`` keys the model configuration owns.
FORBIDDEN_PARAMS = {
    "model": "the model is chosen by the project config or --llmbench-model, not by the suite",
    "messages": "the messages come from template, messages or turns",
    "stream": "streaming is a property of the model config ([tool.llmbench])",
}

_COMMON_KEYS = ("scorer", "threshold", "repeats", "tags", "params", "deadlines", "extra",
                "agent")
SUITE_KEYS = ("name", "description", "system", *_COMMON_KEYS, "tools")
PROMPT_KEYS = ("id", "template", "messages", "turns", "system", *_COMMON_KEYS, "tools",
               "instances")
INSTANCE_KEYS = ("id", "vars", "expected", *_COMMON_KEYS)
MESSAGE_KEYS = ("role", "content")
TOP_KEYS = ("suite", "prompts")
TEXT_KEYS = ("template", "messages", "turns")

_HINTS = {
    "models": "models are chosen by the project config ([tool.llmbench]) or --llmbench-model",
    "model": "models are chosen by the project config ([tool.llmbench]) or --llmbench-model",
}


@dataclass(frozen=True, kw_only=True)
class Suite:
    """One loaded suite file: its identity and its cases, in file order."""

    name: str
    """``[suite] name``, default the file stem."""
    path: str
    """The file relative to the rootdir, posix separators (what node ids start with)."""
    description: str = ""
    cases: tuple[Case, ...] = ()
    tags: tuple[str, ...] = ()
    """The suite-level tags (each case carries the union with its prompt's and its own)."""


def load_suite(
    path: Path,
    *,
    rootdir: Path,
    scorer_check: ScorerCheck | None = None,
    expected_check: ExpectedCheck | None = None,
    parsed: tuple[str, dict[str, Any]] | None = None,
) -> Suite:
    """Read, validate and render one suite file.

    Raises ``SuiteError`` for the first violation (unreadable file, TOML syntax, schema,
    scorer rejected by ``scorer_check``, expected value rejected by ``expected_check``), with
    the file, the key path and the fix. ``scorer_check`` runs once per distinct spec,
    ``expected_check`` once per instance. ``parsed`` is the file's text and data when the
    caller has read it already (``tomlcheck.read_toml``; collection does, to tell a suite).
    """
    shown = display_path(path, rootdir)
    text, data = parsed if parsed is not None else read_toml(path, shown)
    suite = _Loader(shown, path.stem, text, scorer_check, expected_check,
                    base_dir=os.path.dirname(os.path.abspath(path))).load(data)
    log.debug("loaded suite %s (%s): %d cases", suite.name, suite.path, len(suite.cases))
    return suite


def _is_number(value: object) -> TypeGuard[int | float]:
    """An integer or float; booleans are ints to Python but not numbers to a TOML reader."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --- one level (suite, prompt or instance) of inheritable settings ------------------------


@dataclass
class _Scorer:
    name: str
    options: dict[str, Any]
    origin: str
    """Key path where it was set, for errors raised by the scorer check."""
    default: bool = False
    """No level set a scorer: this is ``DEFAULT_SCORER``."""
    canonical: str = field(init=False)
    """The options as sorted JSON: with name and threshold, what makes a spec distinct."""

    def __post_init__(self) -> None:
        self.canonical = json.dumps(self.options, sort_keys=True, default=repr)


@dataclass
class _Level:
    scorer: _Scorer | None = None
    threshold: float | None = None
    repeats: int | None = None
    tags: tuple[str, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)
    deadlines: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    agent: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, ToolSpec] | None = None
    """``None``: not set at this level (a prompt then gets every suite tool)."""


@dataclass
class _Body:
    """A prompt's messages before rendering; ``sources`` maps placeholder -> first key."""

    system: str | None
    first: list[tuple[str, str]]
    later: list[str]
    sources: dict[str, str]


class _Loader(Checker):
    """Validates one parsed suite, front to back, raising at the first violation."""

    def __init__(self, shown: str, stem: str, text: str, scorer_check: ScorerCheck | None,
                 expected_check: ExpectedCheck | None = None, *, base_dir: str = "") -> None:
        super().__init__(shown, hints=_HINTS)
        self.stem, self.text = stem, text
        self.base_dir = base_dir
        self.scorer_check, self.expected_check = scorer_check, expected_check
        self.checked: set[tuple[str, str, float]] = set()
        self.default_scorer = _Scorer(DEFAULT_SCORER, {}, "suite.scorer", default=True)

    def ident(self, value: object, key: str, what: str) -> str:
        text = self.string(value, key, f'write {what} ids as strings, e.g. id = "small"')
        if not ID_RE.fullmatch(text):
            bad = sorted({c for c in text if not ID_RE.fullmatch(c)})
            problem = (f"invalid {what} id {text!r}: characters {''.join(bad)!r} are not allowed"
                       if bad else f"the {what} id is empty")
            self.fail(key, problem, "use only letters, digits, '_', '.' and '-'")
        return text

    # -- the file --------------------------------------------------------------------------

    def load(self, data: dict[str, Any]) -> Suite:
        self.known_keys(data, "", TOP_KEYS)
        raw_suite = self.table(data.get("suite", {}), "suite",
                               "write the suite settings under a [suite] header")
        self.known_keys(raw_suite, "suite", SUITE_KEYS)
        name = self.stem
        if "name" in raw_suite:
            name = self.string(raw_suite["name"], "suite.name", 'e.g. name = "arithmetic"')
            if not name.strip():
                self.fail("suite.name", "the suite name is empty", "remove it to use the file name")
        description = ""
        if "description" in raw_suite:
            description = self.string(raw_suite["description"], "suite.description",
                                      'e.g. description = "Two-digit sums"')
        system: tuple[str, str] | None = None
        if "system" in raw_suite:
            system = (self.string(raw_suite["system"], "suite.system",
                                  'e.g. system = "Answer with the number only."'),
                      "suite.system")
        suite_level = self.level(raw_suite, "suite", _Level())

        if "prompts" not in data:
            self.fail("", "missing required key 'prompts'",
                      "add at least one [[prompts]] table with an id and a template")
        prompts = data["prompts"]
        if not isinstance(prompts, list) or not all(isinstance(p, dict) for p in prompts):
            self.type_error("prompts", "an array of tables", prompts,
                            "write [[prompts]] (double brackets) before each prompt")
        if not prompts:
            self.fail("prompts", "the prompts list is empty", "add at least one [[prompts]] table")

        lines = self.header_lines()
        cases: list[Case] = []
        seen: dict[str, int] = {}
        for i, prompt in enumerate(prompts):
            line = lines[i] if i < len(lines) else 0
            cases.extend(self.prompt(prompt, i, line, seen, name, system, suite_level))
        return Suite(name=name, path=self.shown, description=description,
                     cases=tuple(cases), tags=suite_level.tags)

    def header_lines(self) -> list[int]:
        """1-based lines of the ``[[prompts]]`` headers (best effort: a plain text scan)."""
        lines, line, pos = [], 1, 0
        for match in PROMPTS_HEADER_RE.finditer(self.text):
            line += self.text.count("\n", pos, match.start())
            pos = match.start()
            lines.append(line)
        return lines

    # -- inheritable settings --------------------------------------------------------------

    def level(self, table: Mapping[str, Any], prefix: str, parent: _Level) -> _Level:
        """The settings ``table`` sets itself; ``parent`` only supplies the threshold the
        scorer check sees."""
        own = _Level()
        if "threshold" in table:
            own.threshold = self.threshold(table["threshold"], sub(prefix, "threshold"))
        if "scorer" in table:
            own.scorer = self.scorer(table["scorer"], sub(prefix, "scorer"), own)
            threshold = own.threshold if own.threshold is not None else parent.threshold
            self.check_scorer(own.scorer, 1.0 if threshold is None else threshold)
        if "repeats" in table:
            key = sub(prefix, "repeats")
            repeats = table["repeats"]
            if not isinstance(repeats, int) or isinstance(repeats, bool):
                self.type_error(key, "an integer", repeats, "e.g. repeats = 3")
            if repeats < 1:
                self.fail(key, f"repeats must be >= 1, got {repeats}",
                          "use repeats = 1 to run each item once")
            if repeats > MAX_REPEATS:
                self.fail(key, f"repeats = {repeats:,} is over the limit of {MAX_REPEATS:,}",
                          "run fewer repeats (each repeat is an item and an API call)")
            own.repeats = repeats
        if "tags" in table:
            own.tags = self.tags(table["tags"], sub(prefix, "tags"))
        if "params" in table:
            own.params = self.params(table["params"], sub(prefix, "params"))
        if "deadlines" in table:
            own.deadlines = self.deadlines(table["deadlines"], sub(prefix, "deadlines"))
        if "extra" in table:
            key = sub(prefix, "extra")
            own.extra = self.table(table["extra"], key, "e.g. extra = { tests = [...] }")
            self.plain(own.extra, key)
        if "agent" in table:
            own.agent = agent_table(table["agent"], sub(prefix, "agent"), self.fail)
        if "tools" in table:
            suite_tools = None if prefix == "suite" else (parent.tools or {})
            own.tools = tool_list(table["tools"], sub(prefix, "tools"), self.base_dir,
                                  self.fail, suite_tools)
        return own

    def threshold(self, value: object, key: str) -> float:
        if not _is_number(value):
            self.type_error(key, "a number", value, "e.g. threshold = 0.5")
        number = float(value)
        if not 0.0 <= number <= 1.0:
            self.fail(key, f"threshold must be between 0 and 1, got {value!r}",
                      "scores are in [0, 1]; an item passes when score >= threshold")
        return number

    def scorer(self, value: object, key: str, own: _Level) -> _Scorer:
        example = 'e.g. scorer = "exact" or scorer = { name = "numeric", tolerance = 0.01 }'
        if isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, dict):
            if "name" not in value:
                self.fail(key, "the scorer table has no 'name'", example)
            name = self.string(value["name"], f"{key}.name", example)
            options = {k: v for k, v in value.items() if k not in ("name", "threshold")}
            self.plain(options, key)
            if "threshold" in value:
                if own.threshold is not None:
                    self.fail(f"{key}.threshold", "the threshold is set twice at this level",
                              "keep either scorer.threshold or threshold")
                own.threshold = self.threshold(value["threshold"], f"{key}.threshold")
        else:
            self.type_error(key, "a string or a table", value, example)
        if not name.strip():
            self.fail(key, "the scorer name is empty", example)
        return _Scorer(name, options, key)

    def check_scorer(self, scorer: _Scorer, threshold: float) -> None:
        if self.scorer_check is None:
            return
        marker = (scorer.name, scorer.canonical, threshold)
        if marker in self.checked:
            return
        self.checked.add(marker)
        try:
            self.scorer_check(
                ScorerSpec(name=scorer.name, options=dict(scorer.options), threshold=threshold))
        except ScorerError as exc:
            problem = f"default scorer {scorer.name!r}: {exc}" if scorer.default else str(exc)
            self.fail(scorer.origin, problem, "check the scorer name and its options")

    def tags(self, value: object, key: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.type_error(key, "an array of strings", value, 'e.g. tags = ["math"]')
        for i, tag in enumerate(value):
            tag = self.string(tag, f"{key}[{i}]", 'e.g. tags = ["math"]')
            if not TAG_RE.fullmatch(tag):
                self.fail(f"{key}[{i}]", f"tag {tag!r} is not usable as a pytest marker name",
                          "use letters, digits and '_', not starting with a digit")
            if tag in RESERVED_TAGS:
                self.fail(f"{key}[{i}]", f"tag {tag!r} is reserved by pytest",
                          "choose another name")
        return tuple(dict.fromkeys(value))

    def params(self, value: object, key: str) -> dict[str, Any]:
        params = self.table(value, key, "e.g. params = { temperature = 0.0, max_tokens = 64 }")
        for name, fix in FORBIDDEN_PARAMS.items():
            if name in params:
                self.fail(sub(key, name), f"'{name}' cannot be set in params", fix)
        self.plain(params, key)
        return params

    def deadlines(self, value: object, key: str) -> dict[str, float]:
        table = self.table(value, key, "e.g. deadlines = { task_timeout = 60, api_retries = 2 }")
        self.known_keys(table, key, DEADLINE_KEYS)
        result: dict[str, float] = {}
        for name, seconds in table.items():
            where = sub(key, name)
            if name == "api_retries":
                if not isinstance(seconds, int) or isinstance(seconds, bool):
                    self.type_error(where, "an integer >= 0", seconds, "e.g. api_retries = 2")
                if seconds < 0:
                    self.fail(where, f"api_retries must be >= 0, got {seconds}",
                              "use api_retries = 0 for no retries")
                if seconds > MAX_API_RETRIES:
                    self.fail(where, f"api_retries = {seconds:,} is over the limit of "
                              f"{MAX_API_RETRIES}", "a failing endpoint is not fixed by "
                              "retrying: use at most 20")
                result[name] = seconds
                continue
            if not _is_number(seconds):
                self.type_error(where, "a number of seconds", seconds, f"e.g. {name} = 60")
            if not (math.isfinite(seconds) and seconds > 0):
                self.fail(where, f"{name} must be a positive number of seconds, got {seconds!r}",
                          f"e.g. {name} = 60")
            result[name] = float(seconds)
        return result

    # -- prompts and instances -------------------------------------------------------------

    def prompt(self, raw: dict[str, Any], i: int, line: int, seen: dict[str, int],
               suite_name: str, suite_system: tuple[str, str] | None,
               suite_level: _Level) -> list[Case]:
        key = f"prompts[{i}]"
        self.known_keys(raw, key, PROMPT_KEYS)
        if "id" not in raw:
            self.fail(key, "missing required key 'id'",
                      'add id = "..." using letters, digits, "_", "." and "-"')
        prompt_id = self.ident(raw["id"], f"{key}.id", "prompt")
        if prompt_id in seen:
            self.fail(f"{key}.id", f"duplicate prompt id {prompt_id!r}, already used by "
                      f"prompts[{seen[prompt_id]}]", "give each prompt a unique id")
        seen[prompt_id] = i

        body = self.body(raw, key, suite_system)
        level = self.level(raw, key, suite_level)

        if "instances" not in raw:
            self.fail(key, "missing required key 'instances'",
                      "add at least one [[prompts.instances]] table after the prompt")
        instances = raw["instances"]
        if not isinstance(instances, list) or not all(isinstance(x, dict) for x in instances):
            self.type_error(f"{key}.instances", "an array of tables", instances,
                            "write [[prompts.instances]] (double brackets) before each instance")
        if len(instances) > MAX_INSTANCES:
            self.fail(f"{key}.instances", f"{len(instances):,} instances, over the limit of "
                      f"{MAX_INSTANCES:,} per prompt", "split them over several prompts or suites")
        if not instances:
            self.fail(f"{key}.instances", "the instances list is empty",
                      "add at least one [[prompts.instances]] table")

        chain = _merge_levels(suite_level, level)
        ids: dict[str, tuple[int, bool]] = {}
        cases = []
        for j, inst in enumerate(instances):
            cases.append(self.instance(inst, j, key, ids, body, chain,
                                       suite_name=suite_name, prompt_id=prompt_id, line=line))
        return cases

    def body(self, raw: dict[str, Any], key: str,
             suite_system: tuple[str, str] | None) -> _Body:
        given = [k for k in TEXT_KEYS if k in raw]
        if not given:
            self.fail(key, "missing the prompt text",
                      "add one of 'template', 'messages' or 'turns'")
        if len(given) > 1:
            self.fail(key, f"sets both '{given[0]}' and '{given[1]}'",
                      "keep exactly one of 'template', 'messages', 'turns'")
        system = suite_system
        if "system" in raw:
            system = (self.string(raw["system"], f"{key}.system",
                                  'e.g. system = "Answer briefly."'), f"{key}.system")
        texts: list[tuple[str, str]] = []  # (text, key) in message order, for placeholders
        first: list[tuple[str, str]] = []
        later: list[str] = []
        kind = given[0]
        if kind == "template":
            text = self.string(raw["template"], f"{key}.template",
                               'e.g. template = "What is {{a}} + {{b}}?"')
            first.append(("user", text))
            texts.append((text, f"{key}.template"))
        elif kind == "turns":
            turns = raw["turns"]
            fix = 'e.g. turns = ["Name a prime.", "Now a larger one."]'
            if not isinstance(turns, list):
                self.type_error(f"{key}.turns", "an array of strings", turns, fix)
            if not turns:
                self.fail(f"{key}.turns", "the turns list is empty", fix)
            for t, turn in enumerate(turns):
                text = self.string(turn, f"{key}.turns[{t}]", fix)
                texts.append((text, f"{key}.turns[{t}]"))
                if t == 0:
                    first.append(("user", text))
                else:
                    later.append(text)
        else:
            first = self.messages(raw["messages"], f"{key}.messages", texts)
            if any(role == "system" for role, _ in first):
                if "system" in raw:
                    self.fail(f"{key}.system", "the system prompt is set twice: here and "
                              "in a system message", "keep one of them")
                system = None  # the prompt's own system message replaces the suite's
        if system is not None:
            texts.insert(0, system)
        sources: dict[str, str] = {}
        for text, where in texts:
            for name in find_placeholders(text):
                sources.setdefault(name, where)
        return _Body(None if system is None else system[0], first, later, sources)

    def messages(self, value: object, key: str,
                 texts: list[tuple[str, str]]) -> list[tuple[str, str]]:
        fix = 'e.g. messages = [{ role = "user", content = "{{q}}" }]'
        if not isinstance(value, list):
            self.type_error(key, "an array of tables", value, fix)
        if not value:
            self.fail(key, "the messages list is empty", fix)
        result = []
        for m, message in enumerate(value):
            sub = f"{key}[{m}]"
            message = self.table(message, sub, fix)
            self.known_keys(message, sub, MESSAGE_KEYS)
            for name in MESSAGE_KEYS:
                if name not in message:
                    self.fail(sub, f"missing required key '{name}'", fix)
            role = self.string(message["role"], f"{sub}.role", fix)
            if role not in ROLES:
                self.fail(f"{sub}.role", f"unknown role {role!r}",
                          "use one of: " + ", ".join(ROLES))
            content = self.string(message["content"], f"{sub}.content", fix)
            texts.append((content, f"{sub}.content"))
            result.append((role, content))
        if result[-1][0] != "user":
            self.fail(f"{key}[{len(result) - 1}].role",
                      f"the last message must be a user message, got {result[-1][0]!r}",
                      "end the list with the user message the model answers")
        return result

    def check_expected(self, spec: ScorerSpec, raw: Mapping[str, Any], key: str,
                       agent: AgentLimits | None) -> None:
        if self.expected_check is None:
            return
        if agent is not None and agent.expect_error is not None and "expected" not in raw:
            return  # an item meant to end with an error class (a demonstration) needs none
        try:
            self.expected_check(spec, raw.get("expected"))
        except ScorerError as exc:
            self.fail(f"{key}.expected" if "expected" in raw else key, str(exc),
                      "give an expected value this scorer accepts, or another scorer")

    def instance(self, raw: dict[str, Any], j: int, prompt_key: str,
                 ids: dict[str, tuple[int, bool]], body: _Body, chain: _Level,
                 *, suite_name: str, prompt_id: str, line: int) -> Case:
        key = f"{prompt_key}.instances[{j}]"
        self.known_keys(raw, key, INSTANCE_KEYS)
        # An instance without an id is known by its 0-based index.
        instance_id = self.ident(raw["id"], f"{key}.id", "instance") if "id" in raw else str(j)
        if instance_id in ids:
            other, explicit = ids[instance_id]
            problem = (f"duplicate instance id {instance_id!r}, already used by "
                       f"{prompt_key}.instances[{other}]")
            fix = "give each instance a unique id"
            if not (explicit and "id" in raw):
                fix += "; an instance without an id is known by its 0-based index"
            self.fail(f"{key}.id" if "id" in raw else key, problem, fix)
        ids[instance_id] = (j, "id" in raw)

        variables: dict[str, Any] = {}
        if "vars" in raw:
            variables = self.table(raw["vars"], f"{key}.vars", "e.g. vars = { a = 2, b = 3 }")
            for name, value in variables.items():
                if not isinstance(value, (str, int, float)):  # bool is an int
                    self.type_error(sub(f"{key}.vars", name), "a string, number or boolean",
                                    value, "write the value as a string to insert it verbatim")
        for name, where in body.sources.items():
            if name not in variables:
                self.fail(f"{key}.vars", f"placeholder {{{{{name}}}}} in {where} has no value",
                          f"add {name} to vars or remove the placeholder")
        expected = raw.get("expected")
        self.plain(expected, f"{key}.expected")

        own = self.level(raw, key, chain)
        scorer = own.scorer or chain.scorer
        if scorer is None:
            scorer = self.default_scorer
        threshold = own.threshold if own.threshold is not None else chain.threshold
        if threshold is None:
            threshold = 1.0
        # The effective spec (a threshold may come from another level than the scorer);
        # definitions were checked where they stand, so this is a set lookup for most cases.
        self.check_scorer(scorer, threshold)
        spec = ScorerSpec(name=scorer.name, options=dict(scorer.options), threshold=threshold)
        agent = merge_agent([chain.agent, own.agent], bool(chain.tools))
        self.check_expected(spec, raw, key, agent)
        repeats = own.repeats or chain.repeats or 1

        turns = [tuple(_render_first(body, variables))]
        turns.extend(({"role": "user", "content": render(text, variables)},)
                     for text in body.later)
        return Case(
            suite_path=self.shown,
            suite_name=suite_name,
            prompt_id=prompt_id,
            instance_id=instance_id,
            turns=tuple(turns),
            expected=expected,
            scorer=spec,
            params={**chain.params, **own.params},
            repeats=repeats,
            deadlines={**chain.deadlines, **own.deadlines},
            tags=tuple(dict.fromkeys(chain.tags + own.tags)),
            line=line,
            extra={**chain.extra, **own.extra},
            tools=tuple((chain.tools or {}).values()),
            agent=agent,
        )


def _merge_levels(outer: _Level, inner: _Level) -> _Level:
    """``inner`` over ``outer``: what an instance inherits from its prompt and suite."""
    return _Level(
        scorer=inner.scorer or outer.scorer,
        threshold=inner.threshold if inner.threshold is not None else outer.threshold,
        repeats=inner.repeats or outer.repeats,
        tags=tuple(dict.fromkeys(outer.tags + inner.tags)),
        params={**outer.params, **inner.params},
        deadlines={**outer.deadlines, **inner.deadlines},
        extra={**outer.extra, **inner.extra},
        agent={**outer.agent, **inner.agent},
        tools=inner.tools if inner.tools is not None else outer.tools,
    )


def _render_first(body: _Body, variables: Mapping[str, Any]) -> list[Message]:
    messages: list[Message] = []
    if body.system is not None:
        messages.append({"role": "system", "content": render(body.system, variables)})
    messages.extend({"role": role, "content": render(text, variables)}
                    for role, text in body.first)
    return messages
