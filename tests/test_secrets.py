"""The one scrubber (``pytest_llmbench.scrub``): unit rules, then a server that echoes the
API key every way it can, through the real API layer, and a run whose store, JSONL, JUnit
file and terminal must not hold it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_api import USER, spec
from test_providers import Scripted, respond, sse

from pytest_llmbench.errors import APIError
from pytest_llmbench.providers.api import chat
from pytest_llmbench.records import Attempt, Deadlines
from pytest_llmbench.scrub import add_secret, scrub

SECRET = "sk-live-Abc123DEF456ghi789JKL012mno345"


def test_keys_in_any_case_and_their_long_prefixes_and_suffixes() -> None:
    assert scrub(f"key={SECRET}.", SECRET) == "key=***."
    assert scrub(f"echo {SECRET.lower()} and {SECRET.upper()}", SECRET) == "echo *** and ***"
    assert scrub(f"cut: {SECRET[:14]}", SECRET) == "cut: ***"  # a prefix of 12+ chars
    assert scrub(f"{SECRET[-13:]} tail", SECRET) == "*** tail"  # a suffix of 12+ chars
    assert scrub(f"short {SECRET[:11]}", SECRET) == f"short {SECRET[:11]}"  # too short to tell
    assert scrub("nothing here", SECRET) == "nothing here"


def test_labelled_credentials_whatever_the_key() -> None:
    assert scrub("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer ***"
    assert scrub('{"api-key": "zzz999"} x-api-key=qq') == '{"api-key": "***"} x-api-key=***'
    assert scrub("API_KEY: hunter2") == "API_KEY: ***"
    # a model's answer is code to judge: only the keys themselves go
    assert scrub("api_key = read()", labelled=False) == "api_key = read()"


def test_known_keys_are_scrubbed_without_being_passed() -> None:
    add_secret("sk-registered-0123456789abcdef")
    assert scrub("x SK-REGISTERED-0123456789ABCDEF y") == "x *** y"


KEY = "sk-echo-Zyx987WVU654tsr321"


def _half(text: str) -> tuple[str, str]:
    return text[: len(text) // 2], text[len(text) // 2:]


@pytest.fixture(scope="module")
def echo() -> Iterator[Scripted]:
    server = Scripted()
    low = KEY.lower()
    a, b = _half(KEY)

    def stream(*events: Any) -> Any:
        return lambda c, h, body: respond(c, sse(*events), ctype="text/event-stream")

    server.routes.update({
        # an error body quoting the request head (Authorization included) and the key lower-cased
        "body": lambda c, h, body: respond(c, (h + " " + low).encode(),
                                           status="401 Unauthorized"),
        "header": lambda c, h, body: respond(c, b'{"error": "bad"}', status="500 Oops",
                                             headers=f"X-Echo: {KEY}\r\n"),
        "error-event": stream({"error": {"message": f"key {KEY} revoked"}}),
        "invalid-event": stream(f"{{not json {KEY}".encode()),
        "split": stream({"choices": [{"index": 0, "delta": {"content": "k=" + a}}]},
                        {"choices": [{"index": 0, "delta": {"content": b},
                                      "finish_reason": "stop"}]}),
        "json-error": lambda c, h, body: respond(
            c, json.dumps({"error": {"message": f"Incorrect API key provided: {KEY[:-4]}****"}})
            .encode(), status="401 Unauthorized"),
    })
    yield server
    server.close()


@pytest.mark.parametrize("route", ["body", "header", "error-event", "invalid-event", "split",
                                   "json-error"])
def test_a_server_echoing_the_key_never_gets_it_into_a_message(echo: Scripted,
                                                                route: str) -> None:
    stream = route in ("error-event", "invalid-event", "split")
    attempts: list[Attempt] = []
    text = ""
    try:
        got = chat(spec(echo.url(route), stream=stream), USER, api_key=KEY,
                   deadlines=Deadlines(api_retries=0), on_attempt=attempts.append, env={})
        text = got.text
        assert route == "split" and text == "k=***"
    except APIError as exc:
        text = str(exc) + " ".join(a.error for a in attempts)
    low = text.lower()
    assert KEY.lower() not in low
    for n in range(12, len(KEY)):
        assert KEY[:n].lower() not in low and KEY[-n:].lower() not in low, text


def test_a_run_against_an_echoing_server_leaves_the_key_nowhere(
        pytester: pytest.Pytester, echo: Scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHO_KEY", KEY)
    pytester.makefile(".toml", suite="""
        [suite]
        scorer = "exact"
        [[prompts]]
        id = "p"
        template = "say hi"
        [[prompts.instances]]
        expected = "hi"
        """)
    models = "\n".join(f"""
        [tool.llmbench.models.{route.replace('-', '_')}]
        base_url = "{echo.url(route)}"
        api_key_env = "ECHO_KEY"
        stream = {'true' if route in ('error-event', 'invalid-event', 'split') else 'false'}
        """ for route in ("body", "invalid-event", "split", "json-error"))
    pytester.makepyprojecttoml(models)
    jsonl, junit = pytester.path / "out.jsonl", pytester.path / "junit.xml"
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--llmbench-api-retries=0", "--llmbench-no-preflight", f"--llmbench-jsonl={jsonl}",
        f"--junitxml={junit}", *[f"--llmbench-model={r.replace('-', '_')}" for r in
                                 ("body", "invalid-event", "split", "json-error")])
    assert result.ret != 0
    assert len(jsonl.read_text().splitlines()) == 4  # every model was asked
    output = "\n".join(result.outlines + result.errlines)
    everything = [output, jsonl.read_text(), junit.read_text()]
    for path in Path(pytester.path).rglob("*"):
        if path.is_file():
            everything.append(path.read_bytes().decode("utf-8", "replace"))
    blob = "\n".join(everything).lower()
    assert KEY.lower()[:12] not in blob and KEY.lower()[-12:] not in blob
