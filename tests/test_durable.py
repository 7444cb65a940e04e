"""Group commit of the file store (store/durable.py): one syncfs a second, and one at the end,
instead of two fsyncs per result."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pytest_llmbench.store import durable

linux = pytest.mark.skipif(not durable.available(), reason="syncfs is Linux only")

SUITE = """\
[suite]
scorer = "numeric"

[[prompts]]
id = "add"
template = "What is {{a}} + 1?"

[[prompts.instances]]
id = "one"
vars = { a = 1 }
expected = "2"

[[prompts.instances]]
id = "two"
vars = { a = 2 }
expected = "3"
"""


@linux
def test_syncfs_flushes_a_directory_and_a_missing_one_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "result.json").write_text("{}")
    durable.syncfs(tmp_path)
    with pytest.raises(OSError):
        durable.syncfs(tmp_path / "missing")


@linux
def test_the_syncer_flushes_every_interval_and_once_more_when_closed(tmp_path: Path) -> None:
    syncer = durable.Syncer(tmp_path, 0.02)
    syncer.start()
    try:
        give_up = time.monotonic() + 30
        while syncer.flushes < 2 and time.monotonic() < give_up:
            time.sleep(0.01)
        assert syncer.flushes >= 2, "the thread never flushed"
    finally:
        syncer.close()
    closed_with = syncer.flushes
    syncer.close()  # idempotent: no second final flush, no error
    assert syncer.flushes == closed_with
    assert syncer._thread is None


@linux
def test_a_failed_flush_is_logged_and_the_syncer_goes_on(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    gone = tmp_path / "gone"
    syncer = durable.Syncer(gone, 60)
    assert syncer.flush() is False
    assert "could not flush the result store" in caplog.text and str(gone) in caplog.text
    gone.mkdir()
    assert syncer.flush() is True and syncer.flushes == 1


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makefile(".toml", suite=SUITE)
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "log_cli=true", "--log-cli-level=DEBUG",
        "--llmbench-store", str(pytester.path / "store"), *args, timeout=120)


@linux
def test_a_run_flushes_its_store_once_at_the_end_not_each_result(
        pytester: pytest.Pytester, sim_env: str) -> None:
    result = _run(pytester)
    result.assert_outcomes(passed=2)
    assert "flushed to disk" in result.stdout.str()
    stored = list((pytester.path / "store" / "results").rglob("*.json"))
    assert len(stored) == 2 and all(json.loads(p.read_text())["status"] == "passed" for p in stored)


@linux
def test_sync_interval_zero_fsyncs_every_result_instead(pytester: pytest.Pytester,
                                                        sim_env: str) -> None:
    result = _run(pytester, "--llmbench-sync-interval", "0")
    result.assert_outcomes(passed=2)
    assert "flushed to disk" not in result.stdout.str()


def test_a_bad_sync_interval_is_one_usage_error(pytester: pytest.Pytester, sim_env: str) -> None:
    pytester.makeini("[pytest]\nllmbench_sync_interval = soon\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--llmbench-sync-interval (ini llmbench_sync_interval): expected a number of seconds*"])
    assert "Traceback" not in result.stderr.str()

