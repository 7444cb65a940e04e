"""Results survive kill -9, runs resume, and no item is executed twice (store + claims)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_llmbench.coord import proc
from pytest_llmbench.sim.control import SimServer
from pytest_llmbench.store.filestore import Store


def make_suite(path: Path, n: int) -> None:
    lines = ['[suite]\nscorer = "numeric"\n\n[[prompts]]\nid = "add"\ntemplate = "What is {{a}} + 1000?"\n']
    for i in range(n):
        lines.append(f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1000}"\n')
    path.write_text("\n".join(lines))


def pytest_cmd(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pytest", str(tmp / "suite.toml"), "-p", "no:cacheprovider",
            "-q", f"--llmbench-store={tmp / 'store'}", f"--rootdir={tmp}", *extra]


def env_for(sim: SimServer) -> dict[str, str]:
    env = dict(os.environ)
    env["LLMBENCH_SIM_URL"] = sim.base_url
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    return env


def run_against_sim(tmp: Path, *args: str, **sim_options: float) -> tuple[subprocess.CompletedProcess[str], list[dict]]:
    """Run pytest on ``tmp/suite.toml`` against a fresh simulator; its output and requests."""
    with SimServer.start(request_log=tmp / "requests.jsonl", **sim_options) as sim:
        run = subprocess.run(pytest_cmd(tmp, *args), env=env_for(sim), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=120)
        return run, sim.requests()


def assert_each_item_requested_once(run: subprocess.CompletedProcess[str], requests: list[dict],
                                    n: int) -> None:
    assert run.returncode == 0 and f"{n} passed" in run.stdout, run.stdout[-3000:]
    assert len(requests) == n, collections.Counter(r["key"] for r in requests).most_common(3)


def kill_tree_now(root: int) -> None:
    """SIGKILL the pytest process and every descendant at once (a crash, not a shutdown)."""
    victims = [root, *proc.descendants(root)]
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)  # freeze first so nothing forks while we collect
    victims = sorted(set(victims + [p for v in victims for p in proc.descendants(v)]))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def all_results(store_dir: Path) -> dict[str, dict]:
    results = {}
    for path in (store_dir / "results").rglob("*"):
        if path.is_file() and not path.name.startswith("."):  # dot-files: index, temp files
            assert path.suffix == ".json", f"stray file in the store: {path}"
            data = json.loads(path.read_text())  # a torn file would not parse
            results[path.stem] = data
    return results


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    n, kills, workers, concurrency = 200, 10, 2, 8
    make_suite(tmp_path / "suite.toml", n)
    rng = random.Random(1234)
    with SimServer.start(latency=0.15, jitter=0.1, request_log=tmp_path / "requests.jsonl") as sim:
        env = env_for(sim)
        cmd = pytest_cmd(tmp_path, "-n", str(workers), f"--llmbench-concurrency={concurrency}")
        for _ in range(kills):
            run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(rng.uniform(1.0, 3.0))
            kill_tree_now(run.pid)
            run.wait()
        final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stdout[-3000:]
        requests = sim.requests()

    results = all_results(tmp_path / "store")
    assert len(results) == n
    assert all(r["status"] == "passed" for r in results.values())
    per_prompt = collections.Counter(r["key"] for r in requests)
    assert len(per_prompt) == n  # every item was asked
    repeated = sum(count - 1 for count in per_prompt.values())
    # each kill may lose at most the items in flight at that moment
    assert repeated <= kills * workers * concurrency, per_prompt.most_common(5)
    for leftover in (tmp_path / "store").rglob("*.tmp"):
        # a write cut by kill -9 may leave its temp file; readers ignore dot-files
        assert leftover.name.startswith("."), leftover


def test_a_run_killed_with_items_in_flight_resumes_them_side_by_side(tmp_path: Path) -> None:
    """``kill -9`` leaves the claims of the items in flight; the next run must run those
    items ahead as it runs any other, not one at a time as pytest reaches each of them."""
    n, latency = 8, 1.0
    make_suite(tmp_path / "suite.toml", n)
    with SimServer.start(latency=latency, request_log=tmp_path / "requests.jsonl") as sim:
        env = env_for(sim)
        cmd = pytest_cmd(tmp_path, f"--llmbench-concurrency={n}")
        run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        give_up = time.monotonic() + 60
        while len(sim.requests()) < n and time.monotonic() < give_up:
            time.sleep(0.05)  # every item is waiting for its answer: all claimed
        kill_tree_now(run.pid)
        run.wait()
        claims = list((tmp_path / "store").rglob("*.claim"))
        assert len(claims) == n, claims  # what the killed run left: n claims, dead holders
        before = len(sim.requests())
        final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0 and f"{n} passed" in final.stdout, final.stdout[-3000:]
        resumed = sorted(r["t"] for r in sim.requests()[before:])
    assert len(resumed) == n
    # One at a time, each request would come at least ``latency`` after the one before (7 s
    # from first to last); run ahead, they all come at once, give or take the start-up of
    # their item hosts on a loaded machine: half the serial span tells the two apart.
    assert resumed[-1] - resumed[0] < (n - 1) * latency / 2, resumed


def test_two_concurrent_runs_execute_each_item_once(tmp_path: Path) -> None:
    n = 100
    make_suite(tmp_path / "suite.toml", n)
    with SimServer.start(latency=0.1, request_log=tmp_path / "requests.jsonl") as sim:
        env = env_for(sim)
        cmd = pytest_cmd(tmp_path, "--llmbench-concurrency=8")
        runs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]
        outputs = [run.communicate(timeout=120)[0] for run in runs]
        requests = sim.requests()
    for run, out in zip(runs, outputs, strict=False):
        assert run.returncode == 0, out[-3000:]
        assert f"{n} passed" in out
    assert len(requests) == n, collections.Counter(r["key"] for r in requests).most_common(3)
    store = Store.open(tmp_path / "store", create=False)
    assert len([r for _, r in store.iter_results() if r is not None]) == n


def test_corrupt_result_file_is_reported_and_run_again(tmp_path: Path) -> None:
    make_suite(tmp_path / "suite.toml", 3)
    with SimServer.start(request_log=tmp_path / "requests.jsonl") as sim:
        env = env_for(sim)
        first = subprocess.run(pytest_cmd(tmp_path), env=env, capture_output=True, text=True)
        assert first.returncode == 0, first.stdout
        files = sorted((tmp_path / "store" / "results").rglob("*.json"))
        files[0].write_text('{"key": "trunc')
        files[1].write_text("")
        second = subprocess.run(pytest_cmd(tmp_path, "-rA"), env=env, capture_output=True, text=True)
        assert second.returncode == 0, second.stdout
        assert "3 passed" in second.stdout
        assert len(sim.requests()) == 3 + 2
    combined = second.stdout + second.stderr
    assert str(files[0].name) in combined or "corrupt" in combined


@pytest.mark.slow
def test_overdue_claim_of_a_frozen_run_is_reclaimed_and_its_item_killed(tmp_path: Path) -> None:
    """Run A freezes (SIGSTOP) with its item stuck; past A's task deadline + grace, run B
    kills A's item process (found by the token in the claim), takes the claim and runs the
    item to a pass; A, thawed, reports its item as an error, which does not replace B's
    finished result. A itself is never killed."""
    # In run A (STUCK set) the scorer ignores every deadline: only a kill ends it.
    (tmp_path / "stuck_scorer.py").write_text(
        "import os, time\nfrom pytest_llmbench.records import Score\n"
        "def score(req):\n    while os.environ.get('STUCK'):\n        time.sleep(0.1)\n"
        "    return Score(value=1.0)\n"
    )
    (tmp_path / "suite.toml").write_text(
        '[[prompts]]\nid = "stuck"\ntemplate = "What is 1 + 1?"\nscorer = "stuck_scorer:score"\n'
        '\n[[prompts.instances]]\nid = "only"\nexpected = "2"\n'
    )
    with SimServer.start() as sim:
        env = env_for(sim)
        env["PYTHONPATH"] = str(tmp_path)
        cmd = pytest_cmd(tmp_path, "--llmbench-task-timeout=2", "--llmbench-api-timeout=1",
                         "--llmbench-api-retries=0")
        a = subprocess.Popen([*cmd, "-o", "log_cli=1", "-o", "log_cli_level=INFO"],
                             env={**env, "STUCK": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            claims: list[Path] = []
            give_up = time.monotonic() + 30
            while not claims and time.monotonic() < give_up:
                claims = [p for p in (tmp_path / "store" / "claims").rglob("*.claim")]
                time.sleep(0.05)
            assert claims, "run A never claimed its item"
            claim = json.loads(claims[0].read_text())
            assert claim["pid"] == a.pid and claim["token"]
            item_pids: list[int] = []
            while not item_pids and time.monotonic() < give_up:
                item_pids = proc.pids_with_token(claim["token"])
                time.sleep(0.05)
            assert item_pids, "run A's item process is not running"
            os.kill(a.pid, signal.SIGSTOP)
            time.sleep(max(0.0, claim["deadline"] - time.time()) + 0.5)

            b = subprocess.run([*cmd, "-o", "log_cli=1", "-o", "log_cli_level=INFO"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=60)
            assert "[ForcedRelease] resource=claim" in b.stdout, b.stdout[-3000:]
            assert b.returncode == 0 and "1 passed" in b.stdout, b.stdout[-3000:]
            assert not [p for p in item_pids if proc.pid_alive(p)], "A's item survived"
            assert proc.pid_alive(a.pid), "run A itself was killed"
        finally:
            os.kill(a.pid, signal.SIGCONT)
        out_a = a.communicate(timeout=60)[0]
    assert a.returncode == 1 and "1 error" in out_a, out_a[-3000:]
    (stored,) = all_results(tmp_path / "store").values()
    assert stored["status"] == "passed", stored


def test_a_worker_that_finishes_early_lets_other_workers_items_finish(tmp_path: Path) -> None:
    """Lookahead runs items xdist hands to other workers; a worker whose session ends first
    must let them finish, not kill them (their owners would request them again)."""
    n = 60
    make_suite(tmp_path / "suite.toml", n)
    run, requests = run_against_sim(tmp_path, "-n", "4", "--llmbench-concurrency=8",
                                    latency=0.2, jitter=1.0)
    assert_each_item_requested_once(run, requests, n)


def test_xdist_workers_start_items_before_the_controller_hands_any_out(tmp_path: Path) -> None:
    """xdist schedules only once every worker has collected; the workers that are ready
    meanwhile run items already (each item still once, every result reported)."""
    n = 24
    make_suite(tmp_path / "suite.toml", n)
    scheduled = tmp_path / "scheduled-at"
    (tmp_path / "conftest.py").write_text(
        "import time\n"
        "def pytest_xdist_node_collection_finished(node, ids):\n"
        "    # the controller: hold back scheduling for 3 s after the last worker collected\n"
        "    seen = getattr(pytest_xdist_node_collection_finished, 'seen', 0) + 1\n"
        "    pytest_xdist_node_collection_finished.seen = seen\n"
        "    if seen == 2:\n"
        "        time.sleep(3)\n"
        f"        open({str(scheduled)!r}, 'w').write(repr(time.time()))\n"
    )
    run, requests = run_against_sim(tmp_path, "-n", "2", "--llmbench-concurrency=4", latency=0.2)
    assert_each_item_requested_once(run, requests, n)
    handed_out = float(scheduled.read_text())
    early = [r for r in requests if r["t"] < handed_out]
    assert len(early) >= 8, f"{len(early)} of {n} requests before the controller scheduled"


def test_prefetch_order_starts_with_the_first_batch_xdist_deals_each_worker() -> None:
    from pytest_llmbench.engine.inflight import prefetch_order

    positions = list(range(10))
    assert prefetch_order(positions, 0, 1) == positions
    first, second = prefetch_order(positions, 0, 3), prefetch_order(positions, 1, 3)
    assert first[:4] == [0, 3, 6, 9] and second[:3] == [1, 4, 7]
    for order in (first, second):
        assert sorted(order) == positions  # every item, once
    assert first[4] != second[3]  # the rest starts at different points


def test_a_stuck_item_does_not_hold_back_the_items_queued_behind_it(tmp_path: Path) -> None:
    """One slot (--llmbench-concurrency=1), one hanging item among quick ones: once it has
    run several times longer than items usually take, the next items start beside it; it
    still ends at its own task deadline, as task_timeout."""
    n, stuck = 40, 20
    lines = ['[suite]\nscorer = "numeric"\n\n[[prompts]]\nid = "add"\n'
             'template = "What is {{a}} + 1000? {{d}}"\n']
    for i in range(n):
        d = "[[sim:hang=1]]" if i == stuck else ""
        lines.append(f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i}, d = "{d}" }}\n'
                     f'expected = "{i + 1000}"\n')
    (tmp_path / "suite.toml").write_text("\n".join(lines))
    run, requests = run_against_sim(
        tmp_path, "--llmbench-concurrency=1", "--llmbench-task-timeout=8",
        f"--llmbench-jsonl={tmp_path / 'out.jsonl'}", latency=0.05)
    requests.sort(key=lambda r: r["t"])
    assert f"{n - 1} passed, 1 error" in run.stdout, run.stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    errors = {row["identity"]["instance"]: row["error_class"] for row in rows if row["status"] == "error"}
    assert errors == {f"i{stuck}": "task_timeout"}
    assert len(requests) == n
    (hung,) = [r for r in requests if "hang" in (r.get("fault") or "")]
    after = [r["t"] - hung["t"] for r in requests if r["t"] > hung["t"]]
    # Without the straggler rule the next request waits for the kill at 8 s.
    assert after and after[0] < 5.0, after[:3]


def test_worker_ids_that_are_not_gwN_do_not_break_prefetch() -> None:
    from pytest_llmbench.session.run import _worker_index

    assert _worker_index("gw7") == 7 and _worker_index(32) == 32
    assert _worker_index("custom-id") == 0 and _worker_index(None) == 0


def test_the_straggler_rule_frees_slots_only_past_3x_the_median_and_at_most_k() -> None:
    import time as _time
    from types import SimpleNamespace

    from pytest_llmbench.engine.inflight import (
        _PROBE_EVERY,
        STRAGGLER_IDLE,
        STRAGGLER_SAMPLES,
        Child,
        Stragglers,
    )
    from pytest_llmbench.records import PASSED

    cpu = {pid: 100 for pid in range(1, 20)}  # CPU ticks per pid: unchanged = waiting
    rule = Stragglers(cpu_ticks=cpu.get)
    now = _time.monotonic()
    ok = SimpleNamespace(status=PASSED)

    def child(pid: int, started: float) -> Child:
        return Child(job=None, pid=pid, fd=-1, token="", started=started,  # type: ignore[arg-type]
                     deadline=started + 60)

    def settle(running: dict[str, Child]) -> int:
        """free_slots once the CPU probe has watched for the idle window."""
        rule.free_slots(running, 4)
        for c in running.values():
            if c.cpu_probe is not None:  # as if the first read was made the window ago
                since, _, ticks = c.cpu_probe
                c.cpu_probe = (since - STRAGGLER_IDLE - _PROBE_EVERY,
                               since - _PROBE_EVERY, ticks)
        return rule.free_slots(running, 4)

    running = {f"k{i}": child(i + 1, now - 10.0) for i in range(4)}
    assert rule.free_slots(running, 4) == 0  # no median yet: every running item counts
    for _ in range(STRAGGLER_SAMPLES):
        rule.finished(child(0, _time.monotonic() - 0.5), ok)  # type: ignore[arg-type]
    assert 1.5 <= rule.after < 1.6  # 3 x the median of 0.5 s
    assert rule.free_slots(running, 4) == 0  # past the time, but not yet seen waiting
    assert rule.next_change(running, 4) <= _time.monotonic() + _PROBE_EVERY  # looks again
    assert settle(running) == 4  # all four have run 10 s without using CPU: stragglers
    running.update({f"s{i}": child(i + 5, now - 10.0) for i in range(4)})
    assert settle(running) == 0  # at most K stragglers
    fresh = {f"f{i}": child(i + 9, now) for i in range(4)}
    assert rule.free_slots(fresh, 4) == 0
    assert now + 1.4 < rule.next_change(fresh, 4) < now + 1.7


def test_a_slow_item_that_is_working_is_not_a_straggler() -> None:
    """An item slow because the machine is busy (its CPU time grows) keeps its slot; one
    whose process has gone (ended) is not counted either."""
    import itertools
    import time as _time
    from types import SimpleNamespace

    from pytest_llmbench.engine.inflight import STRAGGLER_SAMPLES, Child, Stragglers
    from pytest_llmbench.records import PASSED

    ticks = itertools.count()
    rule = Stragglers(cpu_ticks=lambda pid: next(ticks) if pid == 1 else None)
    now = _time.monotonic()
    for _ in range(STRAGGLER_SAMPLES):
        rule.finished(SimpleNamespace(started=now - 0.5), SimpleNamespace(status=PASSED))  # type: ignore[arg-type]
    working = Child(job=None, pid=1, fd=-1, token="", started=now - 10, deadline=now + 60)  # type: ignore[arg-type]
    gone = Child(job=None, pid=2, fd=-1, token="", started=now - 10, deadline=now + 60)  # type: ignore[arg-type]
    running = {"w": working, "g": gone}
    for _ in range(5):
        assert rule.free_slots(running, 2) == 0
        if working.cpu_probe is not None:  # force a fresh read: its CPU time moved on
            since, _, t = working.cpu_probe
            working.cpu_probe = (since - 10, since - 10, t)
    assert not working.straggler and not gone.straggler
