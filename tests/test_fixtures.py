"""Plain Python tests get the same machinery; models from the command line and config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_llm_fixture_calls_the_model_with_deadlines(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makepyfile(
        """
        import pytest
        from pytest_llmbench.errors import APIError

        def test_answer(llm):
            completion = llm.chat("What is 20 + 22?", system="Answer with the number only.")
            assert completion.text.strip() == "42"
            assert completion.finish_reason == "stop"

        @pytest.mark.llmbench(api_timeout=0.5, api_retries=0)
        def test_marker_deadlines_apply(llm):
            assert llm.deadlines.api_timeout == 0.5
            with pytest.raises(APIError) as info:
                llm.chat("hello [[sim:hang=1]]")
            assert info.value.error_class == "api_timeout"

        def test_lease(llm_lease):
            with llm_lease("sandbox", timeout=5) as lease:
                assert lease.slot in (0, 1)
        """
    )
    pytester.makepyprojecttoml("[tool.llmbench.resources]\nsandbox = 2\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_model_from_command_line_and_multi_turn(pytester: pytest.Pytester, shared_sim: str) -> None:
    pytester.makefile(
        ".toml",
        chat="""
[[prompts]]
id = "twice"
turns = ["What is {{a}} + {{b}}?", "Multiply that by 2"]
scorer = "numeric"
[[prompts.instances]]
vars = { a = 2, b = 3 }
expected = 10
""",
    )
    out = pytester.path / "r.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmbench-model=local@{shared_sim}",
                                f"--llmbench-jsonl={out}", "-v")
    result.stdout.fnmatch_lines(["*chat.toml::twice?0-local? PASSED*"])
    (record,) = map(json.loads, out.read_text().splitlines())
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "user", "assistant"]
    assert len(record["completions"]) == 2


def test_declared_models_and_unknown_model_error(pytester: pytest.Pytester, shared_sim: str) -> None:
    pytester.makepyprojecttoml(
        f'[tool.llmbench]\ndefault_models = ["a"]\n[tool.llmbench.models.a]\nbase_url = "{shared_sim}"\n'
        'model = "sim-1"\nparams = { temperature = 0 }\n'
    )
    pytester.makefile(".toml", s='[[prompts]]\nid = "p"\ntemplate = "What is 1 + 1?"\n'
                      'scorer = "numeric"\n[[prompts.instances]]\nexpected = 2\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "-v")
    result.stdout.fnmatch_lines(["*s.toml::p?0-a? PASSED*"])
    result = pytester.runpytest("--llmbench-model=nope")
    result.stderr.fnmatch_lines(["*--llmbench-model 'nope': unknown model; declared: a, sim*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_unreachable_endpoint_is_one_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", s='[[prompts]]\nid = "p"\ntemplate = "hi"\n[[prompts.instances]]\nexpected = "x"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-model=down@http://127.0.0.1:9/v1",
                                "--llmbench-api-retries=0", "--llmbench-no-preflight")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*ERROR [[]connection_error[]]*127.0.0.1:9*"])
    assert "Traceback" not in result.stdout.str()


def test_report_cli_reads_the_store_of_a_run(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makefile(".toml", s='[[prompts]]\nid = "p"\ntemplate = "What is {{a}} + 1?"\n'
                      'scorer = "numeric"\n[[prompts.instances]]\nvars = { a = 1 }\nexpected = 2\n'
                      '[[prompts.instances]]\nvars = { a = 2 }\nexpected = 4\n')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)
    csv = pytester.path / "out.csv"
    cli = subprocess.run([sys.executable, "-m", "pytest_llmbench", "report",
                          str(pytester.path / ".llmbench"), "--csv", str(csv)],
                         capture_output=True, text=True, check=True)
    assert "50.0%" in cli.stdout
    assert len(csv.read_text().splitlines()) == 3
