"""One clear message per mistake: every configuration error names the key (or option,
variable, file) and the fix, as one usage-error line, never a traceback.

Suite-file errors are checked message by message in test_suite.py, preflight errors in
test_preflight.py; this file covers config.py and plugin.py."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

SUITE = '[[prompts]]\nid = "p"\ntemplate = "hi"\n[[prompts.instances]]\nexpected = "x"\n'


@dataclass
class Case:
    id: str
    says: tuple[str, ...]
    """Fragments the one error line must hold: where the mistake is, then the fix."""
    files: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    run: bool = False
    """Run (not just collect): the store is checked when the session starts."""


def _model(body: str) -> dict[str, str]:
    return {"llmbench.toml": f'[models.m]\nbase_url = "http://127.0.0.1:9/v1"\n{body}\n'}


CASES = [
    Case("unknown-top-key", ("llmbench.toml: unknown key(s) ['colour']", "allowed: models"),
         {"llmbench.toml": "colour = 1\n"}),
    Case("unknown-model-key", ("models.m: unknown key(s) ['temprature']", "allowed: ['api_key_env'"),
         _model("temprature = 0")),
    Case("api-key-in-file", ("models.m.api_key: keys are read from the environment only",
                             'set api_key_env = "VAR" and export VAR'), _model('api_key = "sk-x"')),
    Case("bad-base-url", ("models.b.base_url: expected an http(s) URL ending in /v1",),
         {"llmbench.toml": '[models.b]\nbase_url = "localhost:8000"\n'}),
    Case("params-not-table", ("models.m.params must be a table", "(e.g. params = {"),
         _model('params = "hot"')),
    Case("negative-rpm", ("models.m.rpm: must be greater than 0", "(use a positive number)"),
         _model("rpm = -1")),
    Case("zero-connections", ("models.m.max_connections: must be at least 1", "(use 1 or more)"),
         _model("max_connections = 0")),
    Case("stream-not-bool", ("models.m.stream: expected true or false", "(use true or false)"),
         _model('stream = "please"')),
    Case("model-not-table", ("models.m must be a table", "[tool.llmbench.models.m]"),
         {"llmbench.toml": "[models]\nm = 3\n"}),
    Case("models-not-table", ("models must be a table of tables", "[tool.llmbench.models.NAME]"),
         {"llmbench.toml": "models = 3\n"}),
    Case("default-models-string", ("default_models must be a list of model names",
                                   'default_models = ["gpt-4o"]'),
         {"llmbench.toml": 'default_models = "gpt"\n'}),
    Case("deadline-not-number", ("llmbench.toml: deadlines.task_timeout: expected a number of "
                                 "seconds, got 'soon'", "(e.g. 30)"),
         {"llmbench.toml": '[deadlines]\ntask_timeout = "soon"\n'}),
    Case("deadlines-not-table", ("deadlines must be a table", "[tool.llmbench.deadlines]"),
         {"llmbench.toml": "deadlines = 3\n"}),
    Case("resource-zero-slots", ("resources.sandbox: must be at least 1", "(use 1 or more)"),
         {"llmbench.toml": "[resources]\nsandbox = 0\n"}),
    Case("resources-not-table", ("resources must be a table of pool = slots",
                                 "[tool.llmbench.resources] sandbox = 2"),
         {"llmbench.toml": "resources = 3\n"}),
    Case("unknown-sim-key", ("sim: unknown key(s) ['latencey']", "allowed: ['error_rate'"),
         {"llmbench.toml": "[sim]\nlatencey = 1\n"}),
    Case("sim-not-table", ("sim must be a table of simulator options", "[tool.llmbench.sim]"),
         {"llmbench.toml": "sim = 3\n"}),
    Case("concurrency-in-file", ("llmbench.toml: concurrency: must be at least 1",
                                 "(use 1 or more)"), {"llmbench.toml": "concurrency = 0\n"}),
    Case("invalid-toml", ("llmbench.toml: invalid TOML", "(fix the syntax there)"),
         {"llmbench.toml": "[models\n"}),
    Case("pyproject-not-table", ("pyproject.toml: [tool.llmbench] must be a table",
                                 "[tool.llmbench] section"),
         {"pyproject.toml": "[tool]\nllmbench = 3\n"}),
    Case("dotenv-line", (".env:2: expected KEY=VALUE in .env file", "write KEY=VALUE"),
         {".env": "A=1\nnot a setting\n"}),
    Case("unknown-model", ("--llmbench-model 'nope': unknown model",
                           "declare it under [tool.llmbench.models] or pass NAME@BASE_URL"),
         args=("--llmbench-model=nope",)),
    Case("bad-model-url", ("--llmbench-model 'a@localhost': expected NAME@BASE_URL",
                           "e.g. local@http://"), args=("--llmbench-model=a@localhost",)),
    Case("model-twice", ("--llmbench-model: model(s) selected twice: sim", "(name each model once)"),
         args=("--llmbench-model=sim", "--llmbench-model=sim")),
    Case("fresh-and-rescore", ("--llmbench-fresh and --llmbench-rescore exclude each other",
                               "pick one"), args=("--llmbench-fresh", "--llmbench-rescore")),
    Case("concurrency-option", ("--llmbench-concurrency: must be at least 1", "(use 1 or more)"),
         args=("--llmbench-concurrency=0",)),
    Case("concurrency-env", ("environment variable LLMBENCH_CONCURRENCY: expected a whole number",
                             "(e.g. 2)"), env={"LLMBENCH_CONCURRENCY": "lots"}),
    Case("timeout-env", ("environment variable TASK_EXECUTION_TIMEOUT: must be greater than 0",
                         "(use a positive number)"), env={"TASK_EXECUTION_TIMEOUT": "-1"}),
    Case("retries-ini", ("ini option llmbench_api_retries: expected a whole number", "(e.g. 2)"),
         args=("-o", "llmbench_api_retries=x")),
    Case("store-is-a-file", ("afile: exists and is not a directory",
                             "point --llmbench-store (ini llmbench_store) at a directory"),
         {"afile": "x"}, args=("--llmbench-store=afile",), run=True),
    Case("store-is-foreign", ("mine is not a pytest-llmbench result store",
                              "point --llmbench-store to a new or empty directory"),
         {"mine/notes.txt": "x"}, args=("--llmbench-store=mine",), run=True),
    Case("store-of-another-version", ("format 99", "--llmbench-store"),
         {".llmbench/store.json": '{"format": 99, "created": "2026-01-01T00:00:00Z"}'},
         run=True),
    Case("timeout-option", ("option --llmbench-api-timeout: expected a number of seconds",
                            "(e.g. 30)"), args=("--llmbench-api-timeout=fast",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_each_config_mistake_is_one_line_naming_key_and_fix(
    case: Case, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("LLMBENCH_CONCURRENCY", "TASK_EXECUTION_TIMEOUT", "LLMBENCH_TASK_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in case.env.items():
        monkeypatch.setenv(var, value)
    for name, text in {"s.toml": SUITE, **case.files}.items():
        (pytester.path / name).parent.mkdir(parents=True, exist_ok=True)
        (pytester.path / name).write_text(text)
    mode = () if case.run else ("--collect-only",)
    result = pytester.runpytest("-p", "no:cacheprovider", *mode, *case.args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(errors) == 1, result.stderr.lines
    for fragment in case.says:
        assert fragment in errors[0]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_bad_marker_key_fails_only_that_test_naming_it(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.llmbench(timeout=5)
        def test_bad(llm):
            pass

        def test_good(llm):
            pass
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    text = result.stdout.str()
    assert ("::test_bad: llmbench marker: unknown deadline 'timeout'; allowed: ['api_retries', "
            "'api_timeout', 'lease_max', 'task_timeout']") in text
    assert "During handling" not in text
    assert "Traceback" not in result.stdout.str() and "def llm(" not in result.stdout.str()
