"""The suite loader (suite.py) and the template syntax (template.py)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_llmbench.collect.suite import Suite, load_suite
from pytest_llmbench.collect.template import TemplateError, find_placeholders, render
from pytest_llmbench.errors import ScorerError, SuiteError
from pytest_llmbench.records import Case, ScorerSpec

DOCS = Path(__file__).resolve().parent.parent / "docs" / "suites.md"


def write(tmp_path: Path, text: str, name: str = "suite.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str, **kwargs: Any) -> Suite:
    return load_suite(write(tmp_path, text), rootdir=tmp_path, **kwargs)


def error_of(tmp_path: Path, text: str, **kwargs: Any) -> SuiteError:
    with pytest.raises(SuiteError) as info:
        load(tmp_path, text, **kwargs)
    return info.value


# --- templates ---------------------------------------------------------------------------


def test_find_placeholders_in_order_each_once() -> None:
    text = "{{b}} and {{ a }} and {{b}} {{\tc_1\t}} {{1x}} {{a.b}} {x} {{}} {{ }}"
    assert find_placeholders(text) == ["b", "a", "c_1"]


def test_render_replaces_placeholders_and_keeps_other_braces() -> None:
    text = 'Return {"n": {{n}}} for {{ who }}; {{1x}} {{}} {single} {{{n}}}'
    rendered = render(text, {"n": 7, "who": "Ann", "unused": 1})
    assert rendered == 'Return {"n": 7} for Ann; {{1x}} {{}} {single} {7}'


@pytest.mark.parametrize(
    ("value", "shown"),
    [(3, "3"), (-2, "-2"), (2.5, "2.5"), (1e-3, "0.001"), (True, "true"), (False, "false"),
     ("x y", "x y"), ("", "")],
)
def test_render_value_conversion(value: object, shown: str) -> None:
    assert render("<{{v}}>", {"v": value}) == f"<{shown}>"


def test_render_missing_variable_raises_template_error() -> None:
    with pytest.raises(TemplateError) as info:
        render("{{a}} {{b}}", {"a": 1})
    err = info.value
    assert isinstance(err, KeyError)
    assert err.name == "b"
    assert str(err) == "no value for placeholder {{b}}"
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, TemplateError) and copy.name == "b"


# --- a valid suite with every feature ------------------------------------------------------

FULL = """\
# a suite using every feature
[suite]
name = "everything"
description = "all the features"
system = "You are terse, {{who}}."
scorer = { name = "numeric", tolerance = 0.01 }
threshold = 0.5
repeats = 2
tags = ["math", "smoke"]
params = { temperature = 0.0, max_tokens = 64 }
deadlines = { task_timeout = 60, api_retries = 2 }
extra = { level = "suite", keep = 1 }

[[prompts]]
id = "add"
template = "What is {{a}} + {{ b }}? Reply as {\\"sum\\": N}."
params = { max_tokens = 16, top_p = 0.9 }
deadlines = { api_timeout = 5 }
tags = ["smoke", "arith"]
extra = { level = "prompt" }

[[prompts.instances]]
id = "small"
vars = { a = 2, b = 3, who = "bot" }
expected = "5"

[[prompts.instances]]
vars = { a = 1.5, b = true, who = "Zoë" }
expected = 2.5
scorer = "exact"
threshold = 1.0
repeats = 1
tags = ["hard", "math"]
params = { temperature = 0.7 }
deadlines = { task_timeout = 30.5, lease_max = 100 }
extra = { tests = [{ input = "1", output = "2" }] }

[[prompts]]
id = "chat.v2"
scorer = { name = "regex", flags = "i", threshold = 0.25 }
messages = [
  { role = "system", content = "Own system for {{who}}" },
  { role = "user", content = "Q: {{q}}" },
  { role = "assistant", content = "A: 4" },
  { role = "user", content = "Q: {{q}} again" },
]
instances = [
  { id = "only", vars = { q = "2+2", who = "x" }, expected = ["4", "four"] },
]

[[prompts]]
id = "multi_turn"
system = "Prompt-level system."
turns = ["Name a prime below {{limit}}.", "Now one above {{limit}}.", "Thanks."]
repeats = 3

[[prompts.instances]]
vars = { limit = 10 }
"""


def test_full_suite_produces_exact_cases(tmp_path: Path) -> None:
    checked: list[ScorerSpec] = []
    suite = load(tmp_path, FULL, scorer_check=checked.append)

    assert (suite.name, suite.path, suite.description, suite.tags) == (
        "everything", "suite.toml", "all the features", ("math", "smoke"))
    common = {"suite_path": "suite.toml", "suite_name": "everything"}
    numeric = ScorerSpec(name="numeric", options={"tolerance": 0.01}, threshold=0.5)
    assert suite.cases == (
        Case(
            **common, prompt_id="add", instance_id="small",
            turns=((
                {"role": "system", "content": "You are terse, bot."},
                {"role": "user", "content": 'What is 2 + 3? Reply as {"sum": N}.'},
            ),),
            expected="5",
            scorer=numeric,
            params={"temperature": 0.0, "max_tokens": 16, "top_p": 0.9},
            repeats=2,
            deadlines={"task_timeout": 60.0, "api_retries": 2, "api_timeout": 5.0},
            tags=("math", "smoke", "arith"),
            line=14,
            extra={"level": "prompt", "keep": 1},
        ),
        Case(
            **common, prompt_id="add", instance_id="1",
            turns=((
                {"role": "system", "content": "You are terse, Zoë."},
                {"role": "user", "content": 'What is 1.5 + true? Reply as {"sum": N}.'},
            ),),
            expected=2.5,
            scorer=ScorerSpec(name="exact", options={}, threshold=1.0),
            params={"temperature": 0.7, "max_tokens": 16, "top_p": 0.9},
            repeats=1,
            deadlines={"task_timeout": 30.5, "api_retries": 2, "api_timeout": 5.0,
                       "lease_max": 100.0},
            tags=("math", "smoke", "arith", "hard"),
            line=14,
            extra={"level": "prompt", "keep": 1,
                   "tests": [{"input": "1", "output": "2"}]},
        ),
        Case(
            **common, prompt_id="chat.v2", instance_id="only",
            turns=((
                {"role": "system", "content": "Own system for x"},
                {"role": "user", "content": "Q: 2+2"},
                {"role": "assistant", "content": "A: 4"},
                {"role": "user", "content": "Q: 2+2 again"},
            ),),
            expected=["4", "four"],
            scorer=ScorerSpec(name="regex", options={"flags": "i"}, threshold=0.25),
            params={"temperature": 0.0, "max_tokens": 64},
            repeats=2,
            deadlines={"task_timeout": 60.0, "api_retries": 2},
            tags=("math", "smoke"),
            line=38,
            extra={"level": "suite", "keep": 1},
        ),
        Case(
            **common, prompt_id="multi_turn", instance_id="0",
            turns=(
                ({"role": "system", "content": "Prompt-level system."},
                 {"role": "user", "content": "Name a prime below 10."}),
                ({"role": "user", "content": "Now one above 10."},),
                ({"role": "user", "content": "Thanks."},),
            ),
            expected=None,
            scorer=numeric,
            params={"temperature": 0.0, "max_tokens": 64},
            repeats=3,
            deadlines={"task_timeout": 60.0, "api_retries": 2},
            tags=("math", "smoke"),
            line=51,
            extra={"level": "suite", "keep": 1},
        ),
    )
    # Each distinct spec once, in document order.
    assert checked == [numeric, ScorerSpec(name="exact", options={}, threshold=1.0),
                       ScorerSpec(name="regex", options={"flags": "i"}, threshold=0.25)]
    # Types the rest of the chain relies on.
    case = suite.cases[1]
    assert isinstance(case.deadlines["api_retries"], int)
    assert isinstance(case.deadlines["task_timeout"], float)
    assert pickle.loads(pickle.dumps(suite)) == suite


def test_defaults_minimal_suite(tmp_path: Path) -> None:
    path = write(tmp_path, '[[prompts]]\nid = "p"\ntemplate = "Hi"\n[[prompts.instances]]\n',
                 name="sub/dir/mini.toml")
    suite = load_suite(path, rootdir=tmp_path)
    assert (suite.name, suite.path, suite.description, suite.tags) == (
        "mini", "sub/dir/mini.toml", "", ())
    (case,) = suite.cases
    assert case == Case(
        suite_path="sub/dir/mini.toml", suite_name="mini", prompt_id="p", instance_id="0",
        turns=(({"role": "user", "content": "Hi"},),), expected=None,
        scorer=ScorerSpec(name="exact", options={}, threshold=1.0), params={}, repeats=1,
        deadlines={}, tags=(), line=1, extra={},
    )


def test_suite_system_applies_to_messages_without_system_message(tmp_path: Path) -> None:
    suite = load(tmp_path, """\
[suite]
system = "S {{x}}"
[[prompts]]
id = "m"
messages = [{ role = "user", content = "U {{x}}" }]
[[prompts.instances]]
vars = { x = 1 }
""")
    assert suite.cases[0].turns == ((
        {"role": "system", "content": "S 1"}, {"role": "user", "content": "U 1"}),)


def test_placeholder_only_in_replaced_suite_system_needs_no_value(tmp_path: Path) -> None:
    suite = load(tmp_path, """\
[suite]
system = "S {{x}}"
[[prompts]]
id = "m"
messages = [{ role = "system", content = "own" }, { role = "user", content = "U" }]
[[prompts.instances]]
""")
    assert suite.cases[0].turns == ((
        {"role": "system", "content": "own"}, {"role": "user", "content": "U"}),)


def test_expected_is_never_rendered(tmp_path: Path) -> None:
    suite = load(tmp_path, """\
[[prompts]]
id = "p"
template = "{{a}}"
[[prompts.instances]]
vars = { a = "x" }
expected = "{{a}}"
""")
    assert suite.cases[0].expected == "{{a}}"


def test_unicode_bom_and_crlf(tmp_path: Path) -> None:
    text = ('[suite]\r\nname = "ünïcödé"\r\nsystem = "Réponds en français 🇫🇷"\r\n'
            '[[prompts]]\r\nid = "grüß"\r\ntemplate = "Übersetze: {{wort}} → ?"\r\n'
            '[[prompts.instances]]\r\nid = "häus.1"\r\nvars = { wort = "日本語" }\r\n'
            'expected = "ß"\r\n')
    # Non-ASCII ids are rejected (node ids stay ASCII); everything else passes through.
    err = error_of(tmp_path, text)
    assert str(err) == ("suite.toml: prompts[0].id: invalid prompt id 'grüß': characters 'ßü' "
                        "are not allowed (use only letters, digits, '_', '.' and '-')")
    path = tmp_path / "u.toml"
    path.write_bytes(b"\xef\xbb\xbf" + text.replace("grüß", "gruss").replace("häus.1", "haus.1")
                     .encode("utf-8"))
    suite = load_suite(path, rootdir=tmp_path)
    assert suite.name == "ünïcödé"
    (case,) = suite.cases
    assert case.turns == ((
        {"role": "system", "content": "Réponds en français 🇫🇷"},
        {"role": "user", "content": "Übersetze: 日本語 → ?"},
    ),)
    assert (case.prompt_id, case.instance_id, case.expected, case.line) == (
        "gruss", "haus.1", "ß", 4)


def test_path_outside_rootdir_is_relative_with_dotdot(tmp_path: Path) -> None:
    path = write(tmp_path, '[[prompts]]\nid = "p"\ntemplate = "t"\n[[prompts.instances]]\n',
                 name="elsewhere/s.toml")
    suite = load_suite(path, rootdir=tmp_path / "root")
    assert suite.path == "../elsewhere/s.toml"
    assert suite.cases[0].suite_path == "../elsewhere/s.toml"


def test_docs_example_loads(tmp_path: Path) -> None:
    """The complete example in docs/suites.md is valid and means what the docs say."""
    example = re.search(r"## A complete example\n\n```toml\n(.*?)```", DOCS.read_text("utf-8"),
                        re.S)
    assert example is not None
    suite = load(tmp_path, example.group(1))
    ids = [c.case_id for c in suite.cases]
    assert ids == ["add[small]", "add[1]", "json-echo[0]", "primes[0]"]
    assert suite.cases[1].repeats == 3 and suite.cases[1].tags == ("math", "float")
    assert suite.cases[2].turns[0][1]["content"] == 'Return {"n": 7}'
    assert suite.cases[2].expected == '{"n": 7}'
    assert len(suite.cases[3].turns) == 2


# --- scorer checks --------------------------------------------------------------------------


def _reject(name: str) -> Any:
    def check(spec: ScorerSpec) -> None:
        if spec.name == name:
            raise ScorerError(f"unknown scorer {name!r}")
    return check


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[suite]\nscorer = "bad"\n', "suite.scorer"),
        ('[[prompts]]\nid = "p"\ntemplate = "t"\nscorer = { name = "bad", x = 1 }\n'
         "[[prompts.instances]]\n", "prompts[0].scorer"),
        ('[[prompts]]\nid = "p"\ntemplate = "t"\n[[prompts.instances]]\n[[prompts.instances]]\n'
         'scorer = "bad"\n', "prompts[0].instances[1].scorer"),
    ],
)
def test_scorer_error_becomes_suite_error_at_its_key(tmp_path: Path, text: str, key: str) -> None:
    if not text.startswith("[[prompts]]"):
        text += '[[prompts]]\nid = "p"\ntemplate = "t"\n[[prompts.instances]]\n'
    err = error_of(tmp_path, text, scorer_check=_reject("bad"))
    assert str(err) == f"suite.toml: {key}: unknown scorer 'bad' (check the scorer name and its options)"
    assert err.key == key


def test_default_scorer_is_checked(tmp_path: Path) -> None:
    err = error_of(tmp_path, '[[prompts]]\nid = "p"\ntemplate = "t"\n[[prompts.instances]]\n',
                   scorer_check=_reject("exact"))
    assert str(err) == ("suite.toml: suite.scorer: default scorer 'exact': unknown scorer "
                        "'exact' (check the scorer name and its options)")


def test_expected_check_error_at_expected_key(tmp_path: Path) -> None:
    seen: list[tuple[str, Any]] = []

    def check(spec: ScorerSpec, expected: Any) -> None:
        seen.append((spec.name, expected))
        if not isinstance(expected, (int, float)):
            raise ScorerError(f"scorer {spec.name!r}: expected must be a number, not {expected!r}")

    text = ('[suite]\nscorer = "numeric"\n[[prompts]]\nid = "p"\ntemplate = "t"\n'
            '[[prompts.instances]]\nexpected = 4\n[[prompts.instances]]\nexpected = "four"\n')
    err = error_of(tmp_path, text, expected_check=check)
    assert str(err) == ("suite.toml: prompts[0].instances[1].expected: scorer 'numeric': "
                        "expected must be a number, not 'four' (give an expected value this "
                        "scorer accepts, or another scorer)")
    assert seen == [("numeric", 4), ("numeric", "four")]


# --- one error per schema violation ---------------------------------------------------------

P = '[[prompts]]\nid = "p"\ntemplate = "hi"\n[[prompts.instances]]\n'
"""A valid prompt whose (only) instance accepts more keys appended after it."""

ERRORS = [
    ("unknown-prompt-key", '[[prompts]]\nid = "p"\ntempalte = "x"\n', "prompts[0].tempalte",
     "unknown key 'tempalte' (did you mean 'template'? allowed keys: id, template, messages, "
     "turns, system, scorer, threshold, repeats, tags, params, deadlines, extra, agent, tools, "
     "instances)"),
    ("unknown-instance-key", P + 'expect = "1"\n', "prompts[0].instances[0].expect",
     "unknown key 'expect' (did you mean 'expected'? allowed keys: id, vars, expected, scorer, "
     "threshold, repeats, tags, params, deadlines, extra, agent)"),
    ("unknown-top-key", 'prompt = 1\n' + P, "prompt",
     "unknown key 'prompt' (did you mean 'prompts'? allowed keys: suite, prompts)"),
    ("models-in-suite", '[suite]\nmodels = ["gpt"]\n' + P, "suite.models",
     "unknown key 'models' (models are chosen by the project config ([tool.llmbench]) or "
     "--llmbench-model; allowed keys: name, description, system, scorer, threshold, repeats, "
     "tags, params, deadlines, extra, agent, tools)"),
    ("unknown-message-key",
     '[[prompts]]\nid = "p"\nmessages = [{ role = "user", content = "x", name = "n" }]\n'
     '[[prompts.instances]]\n', "prompts[0].messages[0].name",
     "unknown key 'name' (allowed keys: role, content)"),
    ("missing-prompts", '[suite]\nname = "x"\n', "",
     "missing required key 'prompts' (add at least one [[prompts]] table with an id and a "
     "template)"),
    ("prompts-not-array", '[prompts]\nid = "p"\n', "prompts",
     "expected an array of tables, got table (write [[prompts]] (double brackets) before each "
     "prompt)"),
    ("missing-id", '[[prompts]]\ntemplate = "x"\n[[prompts.instances]]\n', "prompts[0]",
     """missing required key 'id' (add id = "..." using letters, digits, "_", "." and "-")"""),
    ("missing-text", '[[prompts]]\nid = "p"\n[[prompts.instances]]\n', "prompts[0]",
     "missing the prompt text (add one of 'template', 'messages' or 'turns')"),
    ("two-texts", '[[prompts]]\nid = "p"\ntemplate = "x"\nturns = ["a"]\n', "prompts[0]",
     "sets both 'template' and 'turns' (keep exactly one of 'template', 'messages', 'turns')"),
    ("wrong-type-number", '[suite]\nthreshold = "1o"\n' + P, "suite.threshold",
     "expected a number, got string '1o' (e.g. threshold = 0.5)"),
    ("wrong-type-string", '[[prompts]]\nid = "p"\ntemplate = 3\n', "prompts[0].template",
     """expected a string, got integer 3 (e.g. template = "What is {{a}} + {{b}}?")"""),
    ("wrong-type-id", '[[prompts]]\nid = 7\ntemplate = "x"\n', "prompts[0].id",
     """expected a string, got integer 7 (write prompt ids as strings, e.g. id = "small")"""),
    ("duplicate-prompt-id", P + P, "prompts[1].id",
     "duplicate prompt id 'p', already used by prompts[0] (give each prompt a unique id)"),
    ("duplicate-instance-id", P + 'id = "a"\n[[prompts.instances]]\nid = "a"\n',
     "prompts[0].instances[1].id",
     "duplicate instance id 'a', already used by prompts[0].instances[0] (give each instance "
     "a unique id)"),
    ("duplicate-default-instance-id", P + 'id = "1"\n[[prompts.instances]]\n',
     "prompts[0].instances[1]",
     "duplicate instance id '1', already used by prompts[0].instances[0] (give each instance "
     "a unique id; an instance without an id is known by its 0-based index)"),
    ("invalid-id-chars", '[[prompts]]\nid = "a b/c"\ntemplate = "x"\n', "prompts[0].id",
     "invalid prompt id 'a b/c': characters ' /' are not allowed (use only letters, digits, "
     "'_', '.' and '-')"),
    ("invalid-instance-id", P + 'id = "x[1]"\n', "prompts[0].instances[0].id",
     "invalid instance id 'x[1]': characters '[]' are not allowed (use only letters, digits, "
     "'_', '.' and '-')"),
    ("empty-id", '[[prompts]]\nid = ""\ntemplate = "x"\n', "prompts[0].id",
     "the prompt id is empty (use only letters, digits, '_', '.' and '-')"),
    ("placeholder-without-var",
     '[[prompts]]\nid = "p"\ntemplate = "{{a}} + {{b}}"\n' + '[[prompts.instances]]\n'
     'vars = { a = 1, b = 2 }\n' * 3 + '[[prompts.instances]]\nvars = { a = 1 }\n',
     "prompts[0].instances[3].vars",
     "placeholder {{b}} in prompts[0].template has no value (add b to vars or remove the "
     "placeholder)"),
    ("placeholder-in-turn", '[[prompts]]\nid = "p"\nturns = ["a", "{{ q }}"]\n'
     '[[prompts.instances]]\n', "prompts[0].instances[0].vars",
     "placeholder {{q}} in prompts[0].turns[1] has no value (add q to vars or remove the "
     "placeholder)"),
    ("placeholder-in-suite-system", '[suite]\nsystem = "{{who}}"\n' + P,
     "prompts[0].instances[0].vars",
     "placeholder {{who}} in suite.system has no value (add who to vars or remove the "
     "placeholder)"),
    ("placeholder-in-message", '[[prompts]]\nid = "p"\nmessages = [{ role = "user", '
     'content = "{{m}}" }]\n[[prompts.instances]]\n', "prompts[0].instances[0].vars",
     "placeholder {{m}} in prompts[0].messages[0].content has no value (add m to vars or "
     "remove the placeholder)"),
    ("unknown-role", '[[prompts]]\nid = "p"\nmessages = [{ role = "usr", content = "x" }]\n'
     '[[prompts.instances]]\n', "prompts[0].messages[0].role",
     "unknown role 'usr' (use one of: system, user, assistant)"),
    ("last-message-not-user", '[[prompts]]\nid = "p"\nmessages = [{ role = "user", content = '
     '"x" }, { role = "assistant", content = "y" }]\n[[prompts.instances]]\n',
     "prompts[0].messages[1].role",
     "the last message must be a user message, got 'assistant' (end the list with the user "
     "message the model answers)"),
    ("system-twice", '[[prompts]]\nid = "p"\nsystem = "s"\nmessages = [{ role = "system", '
     'content = "x" }, { role = "user", content = "y" }]\n[[prompts.instances]]\n',
     "prompts[0].system",
     "the system prompt is set twice: here and in a system message (keep one of them)"),
    ("message-missing-content", '[[prompts]]\nid = "p"\nmessages = [{ role = "user" }]\n',
     "prompts[0].messages[0]",
     """missing required key 'content' (e.g. messages = [{ role = "user", content = "{{q}}" }])"""),
    ("empty-turns", '[[prompts]]\nid = "p"\nturns = []\n', "prompts[0].turns",
     """the turns list is empty (e.g. turns = ["Name a prime.", "Now a larger one."])"""),
    ("empty-instances", '[[prompts]]\nid = "p"\ntemplate = "x"\ninstances = []\n',
     "prompts[0].instances",
     "the instances list is empty (add at least one [[prompts.instances]] table)"),
    ("missing-instances", '[[prompts]]\nid = "p"\ntemplate = "x"\n', "prompts[0]",
     "missing required key 'instances' (add at least one [[prompts.instances]] table after "
     "the prompt)"),
    ("repeats-zero", P + "repeats = 0\n", "prompts[0].instances[0].repeats",
     "repeats must be >= 1, got 0 (use repeats = 1 to run each item once)"),
    ("repeats-string", '[suite]\nrepeats = "3"\n' + P, "suite.repeats",
     "expected an integer, got string '3' (e.g. repeats = 3)"),
    ("deadline-negative", P + "deadlines = { task_timeout = -1 }\n",
     "prompts[0].instances[0].deadlines.task_timeout",
     "task_timeout must be a positive number of seconds, got -1 (e.g. task_timeout = 60)"),
    ("deadline-non-numeric", '[suite]\ndeadlines = { api_timeout = "10s" }\n' + P,
     "suite.deadlines.api_timeout",
     "expected a number of seconds, got string '10s' (e.g. api_timeout = 60)"),
    ("deadline-unknown-key", P + "deadlines = { timeout = 3 }\n",
     "prompts[0].instances[0].deadlines.timeout",
     "unknown key 'timeout' (did you mean 'api_timeout'? allowed keys: api_timeout, "
     "api_retries, task_timeout, lease_max)"),
    ("deadline-retries-float", P + "deadlines = { api_retries = 1.5 }\n",
     "prompts[0].instances[0].deadlines.api_retries",
     "expected an integer >= 0, got float 1.5 (e.g. api_retries = 2)"),
    ("deadline-retries-negative", P + "deadlines = { api_retries = -1 }\n",
     "prompts[0].instances[0].deadlines.api_retries",
     "api_retries must be >= 0, got -1 (use api_retries = 0 for no retries)"),
    ("deadline-infinite", P + "deadlines = { lease_max = inf }\n",
     "prompts[0].instances[0].deadlines.lease_max",
     "lease_max must be a positive number of seconds, got inf (e.g. lease_max = 60)"),
    ("params-model", '[suite]\nparams = { model = "gpt-4o" }\n' + P, "suite.params.model",
     "'model' cannot be set in params (the model is chosen by the project config or "
     "--llmbench-model, not by the suite)"),
    ("params-stream", P + "params = { stream = true }\n", "prompts[0].instances[0].params.stream",
     "'stream' cannot be set in params (streaming is a property of the model config "
     "([tool.llmbench]))"),
    ("tag-not-identifier", '[suite]\ntags = ["ok", "a-b"]\n' + P, "suite.tags[1]",
     "tag 'a-b' is not usable as a pytest marker name (use letters, digits and '_', not "
     "starting with a digit)"),
    ("tag-reserved", P + 'tags = ["skip"]\n', "prompts[0].instances[0].tags[0]",
     "tag 'skip' is reserved by pytest (choose another name)"),
    ("threshold-range", P + "threshold = 2\n", "prompts[0].instances[0].threshold",
     "threshold must be between 0 and 1, got 2 (scores are in [0, 1]; an item passes when "
     "score >= threshold)"),
    ("threshold-twice", P + 'threshold = 0.5\nscorer = { name = "x", threshold = 0.3 }\n',
     "prompts[0].instances[0].scorer.threshold",
     "the threshold is set twice at this level (keep either scorer.threshold or threshold)"),
    ("scorer-wrong-type", P + "scorer = 3\n", "prompts[0].instances[0].scorer",
     """expected a string or a table, got integer 3 (e.g. scorer = "exact" or scorer = """
     """{ name = "numeric", tolerance = 0.01 })"""),
    ("scorer-without-name", P + "scorer = { tolerance = 1 }\n", "prompts[0].instances[0].scorer",
     """the scorer table has no 'name' (e.g. scorer = "exact" or scorer = """
     """{ name = "numeric", tolerance = 0.01 })"""),
    ("var-array", P + 'vars = { "ä b" = [1] }\n', 'prompts[0].instances[0].vars."ä b"',
     "expected a string, number or boolean, got array (write the value as a string to insert "
     "it verbatim)"),
    ("date-in-expected", P + "expected = 1979-05-27\n", "prompts[0].instances[0].expected",
     'TOML date values are not supported here (quote it as a string: "1979-05-27")'),
    ("date-in-extra", P + "extra = { tests = [{ at = 07:32:00 }] }\n",
     "prompts[0].instances[0].extra.tests[0].at",
     'TOML time values are not supported here (quote it as a string: "07:32:00")'),
    ("empty-suite-name", '[suite]\nname = ""\n' + P, "suite.name",
     "the suite name is empty (remove it to use the file name)"),
]


@pytest.mark.parametrize(("text", "key", "message"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_schema_error(tmp_path: Path, text: str, key: str, message: str) -> None:
    err = error_of(tmp_path, text, scorer_check=lambda spec: None)
    prefix = f"suite.toml: {key}: " if key else "suite.toml: "
    assert str(err) == prefix + message
    assert "\n" not in str(err)
    assert (err.path, err.key) == ("suite.toml", key)
    assert err.fix and f"({err.fix})" in str(err)
    # Errors cross process boundaries (xdist, forked children) intact.
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_first_error_in_document_order_is_reported(tmp_path: Path) -> None:
    text = ('[suite]\nrepeats = 0\n[[prompts]]\nid = "bad id"\ntemplate = "{{x}}"\n'
            '[[prompts.instances]]\n')
    assert error_of(tmp_path, text).key == "suite.repeats"
    text = text.replace("repeats = 0", "repeats = 1")
    assert error_of(tmp_path, text).key == "prompts[0].id"


def test_toml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    err = error_of(tmp_path, '[[prompts]]\nid = "p"\ntemplate "x"\n')
    message = str(err)
    assert message.startswith("suite.toml: invalid TOML: ")
    assert "(at line 3, column 10)" in message
    assert message.endswith("(fix the syntax at that line and column)")
    assert err.key == "" and "\n" not in message


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"^missing\.toml: cannot read the file: No such file"):
        load_suite(tmp_path / "missing.toml", rootdir=tmp_path)
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('[suite]\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(SuiteError, match=r"^latin1\.toml: not UTF-8 text .*\(save the file as UTF-8\)$"):
        load_suite(bad, rootdir=tmp_path)


# --- size ------------------------------------------------------------------------------------


def test_ten_thousand_instances_load(tmp_path: Path) -> None:
    parts = ['[suite]\nsystem = "Be brief."\nscorer = "numeric"\n\n'
             '[[prompts]]\nid = "add"\ntemplate = "What is {{a}} + {{b}}?"\n']
    parts += [f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i}, b = 1 }}\n'
              f'expected = {i + 1}\n' for i in range(10_000)]
    checked: list[ScorerSpec] = []
    suite = load(tmp_path, "\n".join(parts), scorer_check=checked.append)
    assert len(suite.cases) == 10_000
    assert len({c.instance_id for c in suite.cases}) == 10_000
    last = suite.cases[-1]
    assert last.turns[0][1] == {"role": "user", "content": "What is 9999 + 1?"}
    assert last.expected == 10_000 and last.line == 5
    assert checked == [ScorerSpec(name="numeric", options={}, threshold=1.0)]
