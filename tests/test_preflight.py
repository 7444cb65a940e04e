"""The preflight: a wrong key, a server that is down or a model id the endpoint does not serve
end the run before any item, with one line naming the model, the endpoint, the key's
variable and the fix (real simulator over HTTP, real pytest runs)."""

from __future__ import annotations

import socket

import pytest

from pytest_llmbench.sim.control import SimServer

SUITE = ('[[prompts]]\nid = "p"\ntemplate = "What is {{a}} + 1?"\nscorer = "numeric"\n'
         '[[prompts.instances]]\nvars = { a = 1 }\nexpected = 2\n'
         '[[prompts.instances]]\nvars = { a = 2 }\nexpected = 3\n')
SECRET = "sk-preflight-SECRET-42"


def _free_port() -> int:
    with socket.socket() as probe:  # a port with (almost surely) nobody listening
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _error_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stderr.lines if line.startswith("ERROR:")]


def _no_item_ran(pytester: pytest.Pytester, sim: SimServer) -> None:
    assert sim.requests() == []  # not one chat request
    results = pytester.path / ".llmbench" / "results"
    assert not results.exists() or not any(results.rglob("*.json"))


@pytest.fixture
def keyed_sim(pytester: pytest.Pytester) -> SimServer:
    pytester.makefile(".toml", s=SUITE)
    sim = SimServer.start(require_key=SECRET, models=["m1"],
                          request_log=pytester.path / "requests.jsonl")
    yield sim  # type: ignore[misc]
    sim.stop()


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_wrong_key_ends_the_run_before_any_item(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch,
    workers: list[str],
) -> None:
    monkeypatch.setenv("MY_KEY", SECRET + "-wrong")
    pytester.makepyprojecttoml(
        f'[tool.llmbench]\ndefault_models = ["m1"]\n[tool.llmbench.models.m1]\n'
        f'base_url = "{keyed_sim.base_url}"\napi_key_env = "MY_KEY"\n')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *workers)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert "model 'm1'" in line and keyed_sim.base_url in line and "$MY_KEY" in line
    assert "fix: set MY_KEY" in line and "--llmbench-no-preflight" in line
    assert SECRET not in result.stdout.str() + result.stderr.str()
    _no_item_ran(pytester, keyed_sim)


def test_missing_key_names_the_variable(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--llmbench-model=m1@{keyed_sim.base_url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert "$OPENAI_API_KEY is not set; fix: export OPENAI_API_KEY=" in line
    _no_item_ran(pytester, keyed_sim)


def test_unknown_model_id_is_named_with_the_listed_ones(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--llmbench-model=gpt-9@{keyed_sim.base_url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert "does not serve model id 'gpt-9' (it lists: m1)" in line
    assert "fix: set model = one of them in [tool.llmbench.models.gpt-9]" in line
    _no_item_ran(pytester, keyed_sim)


def test_good_key_runs_and_no_preflight_skips_the_check(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    ok = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                       f"--llmbench-model=m1@{keyed_sim.base_url}")
    ok.assert_outcomes(passed=2)
    # skipped: the items find the wrong key themselves, one 401 each
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    for flag in (["--llmbench-no-preflight"], ["-o", "llmbench_no_preflight=true"]):
        bad = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--llmbench-fresh",
                                            f"--llmbench-model=m1@{keyed_sim.base_url}", *flag)
        bad.assert_outcomes(errors=2)
        bad.stdout.fnmatch_lines(["*ERROR [[]auth_error[]]*"])


def test_unreachable_endpoint(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", s=SUITE)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmbench-model=down@{url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert f"model 'down' at {url}: cannot connect" in line
    assert "fix: start the server, or correct base_url" in line


def test_refused_proxy_is_named(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makefile(".toml", s=SUITE)
    proxy_port = _free_port()
    monkeypatch.setenv("http_proxy", f"http://user:pw@127.0.0.1:{proxy_port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    result = pytester.runpytest("-p", "no:cacheprovider",
                                "--llmbench-model=far@http://llm.example.invalid/v1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert f"cannot connect through the proxy http://127.0.0.1:{proxy_port}" in line
    assert "no_proxy=llm.example.invalid" in line and "pw" not in line


def test_collect_only_needs_no_preflight(pytester: pytest.Pytester) -> None:
    pytester.makefile(".toml", s=SUITE)
    url = f"http://127.0.0.1:{_free_port()}/v1"
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only",
                                f"--llmbench-model=down@{url}")
    assert result.ret == pytest.ExitCode.OK


def test_the_fork_server_runs_the_preflight_and_pytest_never_imports_the_sdk(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check costs ``import openai`` (~1 CPU-s): the fork server, which imports it
    anyway, runs it right after its warm-up, and what it logged is logged by pytest."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    pytester.makeconftest(
        "import sys\n"
        "def pytest_sessionfinish(session):\n"
        "    open('sdk-in-pytest.txt', 'w').write(str('openai' in sys.modules))\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--llmbench-model=m1@{keyed_sim.base_url}",
        "-o", "log_cli=true", "--log-cli-level=INFO")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*preflight: 1 endpoint(s) checked in *, 0 problem(s)*"])
    assert (pytester.path / "sdk-in-pytest.txt").read_text() == "False"
    assert SECRET not in result.stdout.str() + result.stderr.str()


def test_without_a_fork_server_pytest_runs_the_preflight_itself(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMBENCH_FORK_SERVER", "0")
    _wrong_key_is_refused(pytester, keyed_sim, monkeypatch)


def test_a_plugin_that_runs_the_items_itself_still_waits_for_the_preflight(
    pytester: pytest.Pytester, keyed_sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pytest_runtestloop`` is ``firstresult``: a plugin's own loop may answer before
    ours. The preflight's answer is awaited when collection ends, before any loop."""
    pytester.makeconftest(  # registered after ours, so called before ours
        "import pytest\n"
        "class OwnLoop:\n"
        "    @pytest.hookimpl(tryfirst=True)\n"
        "    def pytest_runtestloop(self, session):\n"
        "        for item in session.items:\n"
        "            item.config.hook.pytest_runtest_protocol(item=item, nextitem=None)\n"
        "        return True\n"
        "@pytest.hookimpl(trylast=True)\n"
        "def pytest_configure(config):\n"
        "    config.pluginmanager.register(OwnLoop(), 'own-loop')\n")
    _wrong_key_is_refused(pytester, keyed_sim, monkeypatch)


def _wrong_key_is_refused(pytester: pytest.Pytester, sim: SimServer,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of model ``m1`` with a wrong key: one usage error naming the fix, no item."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET + "-wrong")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--llmbench-model=m1@{sim.base_url}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    (line,) = _error_lines(result)
    assert "model 'm1'" in line and "fix: set OPENAI_API_KEY" in line
    _no_item_ran(pytester, sim)
