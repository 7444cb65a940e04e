"""The provider seam through pytest itself: ``pytest_llmbench_modify_request`` edits every
request body, and a third-party provider registered by a conftest through
``pytest_llmbench_get_provider`` answers the items, plain and under ``-n 2``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SUITE = """
[suite]
scorer = "exact"

[[prompts]]
id = "echo"
template = "{{word}}"

[[prompts.instances]]
id = "a"
vars = { word = "stressed" }
expected = "desserts"

[[prompts.instances]]
id = "b"
vars = { word = "drawer" }
expected = "reward"

[[prompts.instances]]
id = "c"
vars = { word = "flow" }
expected = "wolf"
"""

# The provider of docs/providers.md, word for word (keep them the same).
PROVIDER = '''
import time

from pytest_llmbench.errors import AttemptFailure
from pytest_llmbench.records import Completion


class ReverseProvider:
    """Answers every chat with its last message reversed, without any network."""

    def endpoint(self, model):
        return f"reverse://{model.name}"

    def build_body(self, request):
        return {"model": request.model.model, "messages": list(request.messages),
                **request.model.params, **request.params}

    def send(self, request, body, deadline):
        if time.monotonic() >= deadline:
            raise AttemptFailure("timeout", "", retryable=True)
        text = body["messages"][-1]["content"]
        if text == "fail":
            raise AttemptFailure("server_error", "HTTP 503: reverse is down",
                                 retryable=True, status=503)
        return Completion(text=text[::-1], finish_reason="stop", model=body["model"],
                          prompt_tokens=len(text.split()), completion_tokens=1)


def pytest_llmbench_get_provider(model):
    if model.base_url.startswith("reverse:"):
        return ReverseProvider()
    return None  # every other model: the plugin's own provider
'''

HOOK = '''
def pytest_llmbench_modify_request(body, model):
    body["model"] = "hooked-" + model.name
    body.setdefault("metadata", {})["suite_run"] = "yes"
'''


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_third_party_provider_from_a_conftest_answers_the_items(
        pytester: pytest.Pytester, workers: list[str]) -> None:
    pytester.makeconftest(PROVIDER + HOOK)
    pytester.makefile(".toml", words=SUITE)
    pytester.makepyprojecttoml("""
        [tool.llmbench.models.rev]
        model = "rev-1"
        base_url = "reverse://local"
        api_key_env = ""
        """)
    jsonl = pytester.path / "out.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-model=rev",
                                f"--llmbench-jsonl={jsonl}", *workers)
    result.assert_outcomes(passed=3)
    got = records(jsonl)
    assert sorted(r["answer"] for r in got) == ["desserts", "reward", "wolf"]
    # the request hook ran on the body the provider sent, in the item's process
    assert {c["model"] for r in got for c in r["completions"]} == {"hooked-rev"}


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_modify_request_edits_what_the_default_provider_sends(
        pytester: pytest.Pytester, sim_env: str, workers: list[str]) -> None:
    pytester.makeconftest(HOOK)
    pytester.makefile(".toml", arith="""
        [suite]
        scorer = "numeric"
        [[prompts]]
        id = "add"
        template = "What is {{a}} + {{b}}?"
        [[prompts.instances]]
        vars = { a = 2, b = 3 }
        expected = "5"
        [[prompts.instances]]
        vars = { a = 4, b = 3 }
        expected = "7"
        """)
    jsonl = pytester.path / "out.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--llmbench-jsonl={jsonl}", *workers)
    result.assert_outcomes(passed=2)
    # the simulator answers with the model the body named: the hook's
    assert {c["model"] for r in records(jsonl) for c in r["completions"]} == {"hooked-sim"}


def test_a_provider_failure_goes_through_the_generic_retry_policy(
        pytester: pytest.Pytester) -> None:
    pytester.makeconftest(PROVIDER)
    pytester.makefile(".toml", down="""
        [suite]
        scorer = "exact"
        [[prompts]]
        id = "p"
        template = "fail"
        [[prompts.instances]]
        expected = "liaf"
        """)
    pytester.makepyprojecttoml("""
        [tool.llmbench.models.rev]
        base_url = "reverse://local"
        api_key_env = ""
        """)
    jsonl = pytester.path / "out.jsonl"
    result = pytester.runpytest("-p", "no:cacheprovider", "--llmbench-model=rev",
                                "--llmbench-api-retries=1", f"--llmbench-jsonl={jsonl}")
    result.assert_outcomes(errors=1)
    (record,) = records(jsonl)
    assert record["error_class"] == "api_error"
    assert "at reverse://rev: 2 attempts failed; last: HTTP 503: reverse is down" in record["error"]
    assert [a["outcome"] for a in record["attempts"]] == ["server_error", "server_error"]
