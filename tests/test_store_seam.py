"""The ``ResultStore`` seam: a third-party backend (``sqlstore.py``, SQLite) chosen by a
conftest's ``pytest_llmbench_get_store`` runs the plugin's runs, plain and under ``-n 2``:
results, claims, answers for re-scoring and run manifests all go through it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_llmbench.store.filestore import Store
from pytest_llmbench.store.protocol import ResultStore

HERE = Path(__file__).resolve().parent

CONFTEST = '''
import pytest
from sqlstore import SqliteStore

@pytest.hookimpl(optionalhook=True)
def pytest_llmbench_get_store(config):
    return SqliteStore(str(config.rootpath / "results.db"))
'''

SUITE = '[suite]\nscorer = "numeric"\n[[prompts]]\nid = "p"\ntemplate = "What is {{a}} + 1?"\n' + "".join(
    f'[[prompts.instances]]\nid = "i{a}"\nvars = {{ a = {a} }}\nexpected = "{a + 1}"\n' for a in range(6)
)


def test_both_backends_implement_the_protocol(tmp_path: Path) -> None:
    from sqlstore import SqliteStore

    assert isinstance(Store.open(tmp_path / "files"), ResultStore)
    assert isinstance(SqliteStore(str(tmp_path / "x.db")), ResultStore)


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_conftest_store_backs_a_run(
    pytester: pytest.Pytester, sim_env: str, monkeypatch: pytest.MonkeyPatch, workers: str | None
) -> None:
    from sqlstore import counts

    shutil.copy(HERE / "sqlstore.py", pytester.path / "sqlstore.py")
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))  # the item hosts unpickle SqliteRef
    pytester.makeconftest(CONFTEST)
    pytester.makefile(".toml", suite=SUITE)
    args = ["-p", "no:cacheprovider"] + (["-n", workers] if workers else [])
    first = pytester.runpytest_subprocess(*args)
    first.assert_outcomes(passed=6)
    db = str(pytester.path / "results.db")
    assert counts(db) == {"results": 6, "claims": 0, "runs": 1}
    assert not (pytester.path / ".llmbench" / "results").exists()  # no file store on the side

    again = pytester.runpytest_subprocess(*args)
    again.assert_outcomes(passed=6)
    again.stdout.fnmatch_lines(["*6 of 6 items reported from the store (cached*"])
    # an edited expectation: a new key, the stored answer re-scored through answer_for
    pytester.makefile(".toml", suite=SUITE.replace('expected = "1"', 'expected = "7"'))
    third = pytester.runpytest_subprocess(*args)
    third.assert_outcomes(passed=5, failed=1)
    third.stdout.fnmatch_lines(["*1 of 6 items re-scored*"])
    assert counts(db) == {"results": 7, "claims": 0, "runs": 3}
