"""The store does not move by accident: a new store where the last run of the same suites
used another one is named in the header, with the option that pins it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llmbench.session.storeplace import MAX_ENTRIES, StorePlaces, suites_key

SUITE = '[[prompts]]\nid = "p"\ntemplate = "What is 1 + 1?"\nscorer = "numeric"\n' \
        '[[prompts.instances]]\nexpected = 2\n'


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_header_names_the_previous_store_when_the_rootdir_moves(
    pytester: pytest.Pytester, sim_env: str, cache_home: Path
) -> None:
    suites = pytester.mkdir("suites")
    (suites / "s.toml").write_text(SUITE)
    first = pytester.runpytest("-p", "no:cacheprovider", "suites", f"--rootdir={pytester.path}")
    first.assert_outcomes(passed=1)
    assert "WARNING: a new result store" not in first.stdout.str()
    old = pytester.path / ".llmbench"
    assert (old / "store.json").exists()

    # the same suites, with the rootdir (so the default store) elsewhere
    moved = pytester.runpytest("-p", "no:cacheprovider", "suites", f"--rootdir={suites}")
    moved.stdout.fnmatch_lines([
        f"llmbench WARNING: a new result store will be created at {suites / '.llmbench'}, "
        f"but the last run of these suites used {old} *pass --llmbench-store {old} *"])
    moved.assert_outcomes(passed=1)
    # pinned back: the stored result is reused, and no warning
    pinned = pytester.runpytest("-p", "no:cacheprovider", "suites", f"--rootdir={suites}",
                                f"--llmbench-store={old}", "-v")
    assert "WARNING: a new result store" not in pinned.stdout.str()
    pinned.stdout.fnmatch_lines(["*1 of 1 items reported from the store*"])
    # the existing store in the new place is not "new": no warning either
    again = pytester.runpytest("-p", "no:cacheprovider", "suites", f"--rootdir={suites}")
    assert "WARNING: a new result store" not in again.stdout.str()


def test_suites_key_is_the_same_from_any_directory(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    here = suites_key(["sub/a.toml::p", "sub/b.toml"], tmp_path)
    assert here == suites_key(["b.toml", "a.toml"], tmp_path / "sub")
    assert here != suites_key(["sub/a.toml"], tmp_path)


def test_state_file_is_bounded_and_a_broken_one_is_ignored(tmp_path: Path) -> None:
    places = StorePlaces(tmp_path)
    places.path.write_text("{not json")
    assert places.previous("k") is None
    for i in range(MAX_ENTRIES + 3):
        places.remember(f"k{i}", tmp_path / f"s{i}")
    assert places.previous("k0") is None
    assert places.previous(f"k{MAX_ENTRIES + 2}") == tmp_path / f"s{MAX_ENTRIES + 2}"
