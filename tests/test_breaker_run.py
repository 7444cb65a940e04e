"""The circuit breaker and fallbacks in real runs (-n 2), against a loopback server that can
be switched down (503) and up again, with the simulator as the fallback endpoint."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_llmbench.coord.breaker import CircuitBreaker


class _Toggle(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: items sharing a host connect all at once, and a
    # burst over the backlog was reset ("Connection reset by peer"), as no real endpoint does.
    request_queue_size = 128
    up = False
    chats = 0


class _Handler(BaseHTTPRequestHandler):
    server: _Toggle

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - the models list a preflight may ask for
        self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.chats += 1
        if not self.server.up:
            self._send(503, {"error": {"message": "down for maintenance"}})
            return
        question = body["messages"][-1]["content"]
        a = int(re.search(r"(\d+) \+ 1", question).group(1))  # type: ignore[union-attr]
        self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": str(a + 1)}}],
                         "usage": {"prompt_tokens": 5, "completion_tokens": 1,
                                   "total_tokens": 6}})


@pytest.fixture
def toggle() -> Iterator[_Toggle]:
    server = _Toggle(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _project(pytester: pytest.Pytester, url: str, *, fallback: bool, cooldown: float) -> None:
    fb = 'fallbacks = ["backup"]' if fallback else ""
    pytester.makefile(".toml", llmbench=f"""
default_models = ["main"]
breaker = {{ threshold = 3, cooldown = {cooldown} }}
[models.main]
model = "m"
base_url = "{url}"
api_key_env = "BREAKER_TEST_KEY"
{fb}
[models.backup]
model = "sim-1"
base_url = "sim"
""")
    body = 'suite = "s"\n[[prompts]]\nid = "p"\ntemplate = "What is {{a}} + 1?"\nscorer = "numeric"\n'
    for i in range(20):
        body += f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
    pytester.makefile(".toml", suite=body.replace('suite = "s"\n', ""))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                         "--llmbench-api-retries=0", *args, timeout=300)


def _records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def breaker_env(sim_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("BREAKER_TEST_KEY", "sk-test-breaker-0000")
    return tmp_path / "cache" / "pytest-llmbench"


def test_a_down_endpoint_opens_the_breaker_and_the_fallback_answers(
        pytester: pytest.Pytester, toggle: _Toggle, breaker_env: Path) -> None:
    url = f"http://127.0.0.1:{toggle.server_address[1]}/v1"
    _project(pytester, url, fallback=True, cooldown=60)
    result = _run(pytester, "--llmbench-jsonl=out.jsonl", "--llmbench-concurrency=2")
    records = _records(pytester.path / "out.jsonl")
    assert result.ret == 0, result.stdout.str()
    assert len(records) == 20 and all(r["status"] == "passed" for r in records)
    # The breaker opened after 3 failures: what reached the server is at most the 2 x 2
    # requests in flight at the start and the 2 started after the first 2 failures.
    assert toggle.chats <= 2 * 2 + 2, toggle.chats
    answered = [c["endpoint"] for r in records for c in r["completions"]]  # type: ignore[union-attr]
    assert set(answered) == {"backup"}
    assert CircuitBreaker(breaker_env).state(url).state == "open"


def test_without_a_fallback_items_end_as_endpoint_down_and_the_breaker_closes_when_it_is_back(
        pytester: pytest.Pytester, toggle: _Toggle, breaker_env: Path) -> None:
    url = f"http://127.0.0.1:{toggle.server_address[1]}/v1"
    cooldown = 2.0
    _project(pytester, url, fallback=False, cooldown=cooldown)
    started = time.monotonic()
    result = _run(pytester, "--llmbench-jsonl=out.jsonl", "--llmbench-concurrency=2")
    took = time.monotonic() - started
    records = _records(pytester.path / "out.jsonl")
    assert result.ret == 1
    # What reaches the server: the 2 x 2 requests in flight when the run starts, 2 more
    # started while the first 2 failures are counted (threshold 3), and one probe per
    # cool-down the run lasted (a loaded machine makes the run longer, not the bound wrong).
    bound = 2 * 2 + 2 + math.ceil(took / cooldown)
    assert toggle.chats <= bound, (toggle.chats, took)
    down = [r for r in records if r["error_class"] == "endpoint_down"]
    # every item that did not reach the server was refused by the breaker
    assert len(down) >= 20 - toggle.chats > 0, [r["error_class"] for r in records]
    # refused at once, not after the API timeout (30 s) a down endpoint would otherwise cost
    assert all(float(r["elapsed"]) < 10.0 for r in down)  # type: ignore[arg-type]
    assert "endpoint_down" in result.stdout.str()

    toggle.up = True
    time.sleep(cooldown + 0.2)  # the cool-down: then one probe decides
    result = _run(pytester)
    assert result.ret == 0, result.stdout.str()
    assert CircuitBreaker(breaker_env).state(url).state == "closed"
