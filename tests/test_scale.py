"""Many items in flight: the channels between pytest, the fork server and the item hosts
stay live, and the open-file limit is raised or named (engine/fdlimit.py).

No timing is asserted here (bench/run.py measures speed); what is checked is that the run
ends, every item passes, and that as many item processes ran at once as were asked for.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llmbench.engine.fdlimit import files_needed

#: A scorer in a module of its own (pickled to the item hosts by reference): it logs the
#: item process's pid, so the test can count how many processes ran items.
PID_SCORER = """
import os
from pytest_llmbench.records import Score

def score(req):
    if os.environ.get("PIDS_LOG"):
        with open(os.environ["PIDS_LOG"], "a") as fh:
            fh.write(f"{os.getpid()}\\n")
    return Score(value=1.0)
"""


def write_suite(pytester: pytest.Pytester, n: int, *, latency: float) -> str:
    module = f"pid_scorer_{secrets.token_hex(4)}"
    pytester.makepyfile(**{module: PID_SCORER})
    template = "What is {{a}} + 1? [[sim:latency=" + f"{latency:g}]]"
    lines = [f'[[prompts]]\nid = "add"\ntemplate = "{template}"\nscorer = "{module}:score"\n']
    lines += [f'[[prompts.instances]]\nid = "i{i}"\nvars = {{ a = {i} }}\nexpected = "{i + 1}"\n'
              for i in range(n)]
    pytester.makefile(".toml", wide="".join(lines))
    return module


@pytest.mark.slow
def test_600_items_at_600_in_flight_all_pass(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """K = 600 once deadlocked: the pytest process and the fork server both blocked sending
    on their socket after ~280 hosts. Every item waits 2 s at the simulator, so they are all
    in flight together: 600 item processes at once, with their requests and replies."""
    n = 600
    write_suite(pytester, n, latency=2.0)
    pids = pytester.path / "pids.log"
    monkeypatch.setenv("PIDS_LOG", str(pids))
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--llmbench-concurrency", str(n), timeout=600,
    )
    result.assert_outcomes(passed=n)
    # A host is forked only when no host is idle: 600 processes ran items, so (nearly) all
    # 600 items were in flight at once, far past where the channel used to block.
    assert len(set(pids.read_text().split())) > n * 0.9


def _run_with_nofile(pytester: pytest.Pytester, soft: int, hard: int, *args: str,
                     ) -> subprocess.CompletedProcess[str]:
    code = (
        "import resource, sys, pytest;"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}));"
        "sys.exit(pytest.main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "-p", "no:cacheprovider", *args],
        cwd=pytester.path, capture_output=True, text=True, timeout=300, check=False,
    )


def test_a_low_soft_open_file_limit_is_raised(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makepyfile(test_limit=f"""
        import resource
        def test_soft_limit_raised():
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= {files_needed(300)}
    """)
    write_suite(pytester, 2, latency=0.0)
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < files_needed(300):
        pytest.skip(f"the hard open-file limit here ({hard}) is too low for this test")
    done = _run_with_nofile(pytester, 512, hard, "--llmbench-concurrency", "300",
                            "-p", "pytester")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


def test_a_hard_open_file_limit_too_low_is_one_clear_error(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    write_suite(pytester, 2, latency=0.0)
    done = _run_with_nofile(pytester, 1024, 1024, "--llmbench-concurrency", "2000")
    assert done.returncode == 4, done.stdout + done.stderr  # pytest's usage error
    err = done.stderr
    assert "--llmbench-concurrency 2000 needs up to 8256 open files" in err
    assert "RLIMIT_NOFILE" in err and "1024 hard" in err
    assert "lower --llmbench-concurrency to 192 or less" in err
    assert "Traceback" not in err


def test_the_limit_module_never_lowers_a_limit() -> None:
    import resource

    from pytest_llmbench.engine.fdlimit import ensure_open_files

    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert ensure_open_files(1) >= soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft



def test_workers_share_the_run_wide_budget_through_the_slot_file() -> None:
    from pytest_llmbench.engine import runslots

    path = runslots.create(3)
    try:
        first = runslots.RunSlots(path, 0, 64)
        second = runslots.RunSlots(path, 1, 64)
        # The first worker up may take the whole budget while the others run nothing.
        assert first.free(0) == 64
        first.publish(60)
        assert second.free(0) == 4
        second.publish(4)
        assert first.free(60) == 0
        # What one worker finishes, another may start.
        first.publish(50)
        assert second.free(4) == 10
        # A worker id past the count (an xdist replacement) maps onto a slot, modulo.
        third = runslots.RunSlots(path, 5, 64)
        assert third.offset == 2 * 8
        first.close()
        assert second.free(4) == 60
    finally:
        runslots.remove(path)
    assert not path.exists()


def test_a_worker_publishes_each_item_it_starts_ahead_so_the_run_wide_budget_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers filling at the same instant each took the whole budget: a fill read the
    others' counts once and published its own after the batch (under -n 32, 322 items ran
    at once for a budget of 64). Here another worker takes 6 of 8 slots right after this
    one's first start: this one must stop at 2."""
    from pytest_llmbench.engine import runslots
    from pytest_llmbench.engine.scheduler import Engine
    from pytest_llmbench.store.filestore import Store

    path = runslots.create(2)
    engine = None
    try:
        mine, other = runslots.RunSlots(path, 0, 8), runslots.RunSlots(path, 1, 8)
        engine = Engine(store=Store.open(tmp_path / "store"), coord_dir=tmp_path, run_id="r",
                        concurrency=8, make_job=lambda item: item, key_of=lambda item: item,
                        run_slots=mine)
        started: list[str] = []

        def look_ahead(item: str, *, skip_stored: bool = False) -> int:
            engine.running[item] = object()  # type: ignore[union-attr,assignment]
            started.append(item)
            if len(started) == 1:
                other.publish(6)
            return 1

        monkeypatch.setattr(engine, "_look_ahead", look_ahead)
        engine._fill([f"item{i}" for i in range(20)])
        assert started == ["item0", "item1"]
        engine.running.clear()
    finally:
        if engine is not None:
            engine.shutdown()
        runslots.remove(path)


def test_under_xdist_every_worker_may_use_the_whole_default_budget(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytest.importorskip("xdist")
    write_suite(pytester, 4, latency=0.0)
    pytester.makepyfile(test_budget="""
        from pytest_llmbench.config import DEFAULT_RUN_CONCURRENCY
        from pytest_llmbench.session.run import SESSION_KEY

        def test_engine_budget(request):
            engine = request.config.stash[SESSION_KEY].engine
            assert engine.concurrency == DEFAULT_RUN_CONCURRENCY
            assert engine.run_slots is not None
            assert engine.run_slots.budget == DEFAULT_RUN_CONCURRENCY
            assert engine.run_slots.workers == 2
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(["*concurrency 64 per run, shared by the workers*"])


def test_an_explicit_concurrency_stays_per_process_under_xdist(
    pytester: pytest.Pytester, sim_env: str
) -> None:
    pytest.importorskip("xdist")
    write_suite(pytester, 2, latency=0.0)
    pytester.makepyfile(test_budget="""
        from pytest_llmbench.session.run import SESSION_KEY

        def test_engine_budget(request):
            engine = request.config.stash[SESSION_KEY].engine
            assert engine.concurrency == 5
            assert engine.run_slots is None
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                           "--llmbench-concurrency", "5")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*concurrency 5 per process*"])


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_reported_records_are_not_kept_until_the_end_of_the_run(
    pytester: pytest.Pytester, sim_env: str, workers: list[str]
) -> None:
    """A run of 100,000 items held every record (answers, transcripts) until its summary:
    ~1.9 GB for the pytest process. The summary and the run's manifest now keep only their
    figures: every record handed to ``pytest_llmbench_result`` is garbage once its exporters
    have it (no HTML report here, which needs them all)."""
    write_suite(pytester, 6, latency=0.0)
    pytester.makeconftest("""
        import gc, weakref

        refs = []

        def pytest_llmbench_result(result):
            refs.append(weakref.ref(result))

        def pytest_terminal_summary(terminalreporter):
            gc.collect()
            alive = sum(ref() is not None for ref in refs)
            terminalreporter.write_line(f"RECORDS seen={len(refs)} alive={alive}")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *workers, timeout=300)
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["*llmbench summary*", "wide *sim *6 *6 *0 *"])
    assert "RECORDS seen=6 alive=0" in result.stdout.str()


def test_the_interpreter_exit_skips_a_collection_of_the_run(pytester: pytest.Pytester,
                                                              sim_env: str) -> None:
    """At exit the interpreter's last cyclic-GC pass walked every object the run left
    alive (~0.1 s after 2000 items, on every run's wall time): the session freezes them
    at exit first (``gc.freeze``), objects made after it ended included."""
    write_suite(pytester, 2, latency=0.0)
    pytester.makeconftest("""
        import atexit, gc
        import pytest

        KEPT = []
        # Registered before the session's own exit hook, so it runs after it (LIFO).
        atexit.register(lambda: print(f"FROZEN-SINCE {gc.get_freeze_count() - KEPT[0]}"))

        @pytest.hookimpl(trylast=True)
        def pytest_unconfigure(config):
            KEPT.append(gc.get_freeze_count())
            KEPT.append([[i] for i in range(1000)])  # 1001 objects made after the session
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    line = next(ln for ln in result.stdout.lines if ln.startswith("FROZEN-SINCE"))
    assert int(line.split()[1]) >= 1001, line


def test_finished_items_are_not_kept_by_the_engine_during_the_run(pytester: pytest.Pytester,
                                                                    sim_env: str) -> None:
    """The engine's heap of half-deadline warnings kept each started item (its job, its
    result, its decoded events) until half of its task deadline had passed, 300 s by
    default: a fresh run of 100,000 items peaked at 1.95 GB. A finished item's record is
    garbage soon after it is reported, during the run."""
    write_suite(pytester, 24, latency=0.0)
    pytester.makeconftest("""
        import gc, weakref

        refs = []

        def pytest_llmbench_result(result):
            refs.append(weakref.ref(result))
            if len(refs) == 24:
                gc.collect()
                alive = sum(ref() is not None for ref in refs[:12])
                print(f"EARLY-RECORDS-ALIVE {alive}")
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s",
                                           "--llmbench-concurrency", "4", timeout=300)
    result.assert_outcomes(passed=24)
    result.stdout.fnmatch_lines(["*EARLY-RECORDS-ALIVE 0*"])
