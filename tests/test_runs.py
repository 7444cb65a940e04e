"""Verdicts keyed by their scorer (re-scored with zero API calls), run manifests, ``report``
of a run, and ``compare`` with its exact McNemar test. Real pytest runs in subprocesses
against a simulator that logs every request; the CLI as a real subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llmbench.report.compare import binom_cdf_half, compare_items, mcnemar_exact
from pytest_llmbench.sim.control import SimServer
from pytest_llmbench.store.filestore import Store
from pytest_llmbench.store.runs import RunItem, RunManifest, new_run_id, scrub_secrets

SCORER = '''
def judge(req):
    return 1.0 if req.answer.strip() == str(req.expected) else 0.0
'''


def write_suite(path: Path, values: list[int], scorer: str = '"myscore:judge"') -> None:
    lines = [f'[suite]\nname = "plus"\nscorer = {scorer}\n\n[[prompts]]\nid = "p"\n'
             'template = "What is {{a}} + 1?"\n']
    for n, a in enumerate(values):
        lines.append(f'[[prompts.instances]]\nid = "i{n}"\nvars = {{ a = {a} }}\nexpected = "{a + 1}"\n')
    path.write_text("\n".join(lines))


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_llmbench", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


class Project:
    """A project directory, its simulator (request log) and its pytest runs."""

    def __init__(self, root: Path, sim: SimServer) -> None:
        self.root, self.sim = root, sim
        self.store = root / "store"

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["LLMBENCH_SIM_URL"] = self.sim.base_url
        for var in ("PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS", "OPENAI_TIMEOUT",
                    "TASK_EXECUTION_TIMEOUT", "LLMBENCH_CONCURRENCY"):
            env.pop(var, None)
        env["PYTHONPATH"] = os.pathsep.join([str(self.root), env.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "pytest", "suite.toml", "-p", "no:cacheprovider", "-rA",
               f"--llmbench-store={self.store}", f"--rootdir={self.root}", *args]
        return subprocess.run(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=180)

    def requests(self) -> int:
        return len(self.sim.requests())

    def last_run(self) -> RunManifest:
        return Store.open(self.store, create=False, readonly=True).runs()[-1]


@pytest.fixture
def project(tmp_path: Path) -> object:
    with SimServer.start(request_log=tmp_path / "requests.jsonl") as sim:
        yield Project(tmp_path, sim)


def outcomes(run: subprocess.CompletedProcess[str]) -> str:
    return run.stdout.strip().splitlines()[-1]


def test_editing_a_scorer_rescores_stored_answers_with_zero_api_calls(project: Project) -> None:
    (project.root / "myscore.py").write_text(SCORER)
    write_suite(project.root / "suite.toml", [1, 2, 3])
    first = project.run()
    assert "3 passed" in outcomes(first), first.stdout[-2000:]
    assert project.requests() == 3
    assert {i.source for i in project.last_run().items} == {"ran"}

    # A stricter scorer: the stored answers are judged again, nothing is bought again.
    (project.root / "myscore.py").write_text(SCORER.replace("1.0 if", "0.0 if"))
    second = project.run()
    assert "3 failed" in outcomes(second), second.stdout[-2000:]
    assert project.requests() == 3
    assert "3 of 3 items re-scored" in second.stdout
    assert {i.source for i in project.last_run().items} == {"rescored"}

    # Unchanged since: the new verdicts are reported from the store.
    third = project.run()
    assert "3 failed" in outcomes(third) and project.requests() == 3
    assert {i.source for i in project.last_run().items} == {"cached"}

    # Options count too: a built-in with a tolerance that accepts every answer.
    write_suite(project.root / "suite.toml", [1, 2, 3], scorer='{ name = "numeric", tolerance = 0.5 }')
    fourth = project.run()
    assert "3 passed" in outcomes(fourth) and project.requests() == 3
    write_suite(project.root / "suite.toml", [1, 2, 3], scorer='{ name = "numeric", tolerance = 0.25 }')
    assert "3 passed" in outcomes(project.run()) and project.requests() == 3
    assert {i.source for i in project.last_run().items} == {"rescored"}


def test_a_broken_scorer_fixed_after_rescore_leaves_no_broken_verdict(project: Project) -> None:
    (project.root / "myscore.py").write_text(SCORER)
    write_suite(project.root / "suite.toml", [1, 2])
    assert "2 passed" in outcomes(project.run())
    (project.root / "myscore.py").write_text(SCORER.replace("1.0 if", "0.0 if"))  # broken
    assert "2 failed" in outcomes(project.run("--llmbench-rescore"))
    (project.root / "myscore.py").write_text(SCORER + "\n# fixed\n")
    fixed = project.run()
    assert "2 passed" in outcomes(fixed), fixed.stdout[-2000:]
    assert project.requests() == 2
    # --llmbench-fresh buys the answers again (and finds the same verdicts)
    assert "2 passed" in outcomes(project.run("--llmbench-fresh")) and project.requests() == 4


def test_report_shows_the_latest_run_after_a_prompt_was_edited(project: Project) -> None:
    (project.root / "myscore.py").write_text(SCORER)
    write_suite(project.root / "suite.toml", [1, 2, 3, 4])
    assert "4 passed" in outcomes(project.run())
    first = project.last_run()
    write_suite(project.root / "suite.toml", [1, 2, 3, 40])  # one instance edited
    second_run = project.run("-n", "2")
    assert "4 passed" in outcomes(second_run), second_run.stdout[-2000:]
    assert project.requests() == 5

    runs = Store.open(project.store, create=False, readonly=True).runs()
    assert [r.run_id for r in runs][0] == first.run_id and len(runs) == 2  # workers write none
    second = runs[-1]
    assert len(second.items) == 4 and second.counts() == {"passed": 4, "cached": 3, "ran": 1}
    assert second.models == ("sim",) and second.finished_at and second.exit_status == 0
    assert "-n" in second.command and second.settings["concurrency"]
    item = next(i for i in second.items if i.instance == "i3")
    assert (item.suite, item.prompt, item.model, item.nodeid) == ("plus", "p", "sim", "suite.toml::p[i3-sim]")

    latest = cli("report", str(project.store))
    assert latest.returncode == 0, latest.stderr
    row = next(line.split() for line in latest.stdout.splitlines() if line.startswith("plus"))
    assert row[:7] == ["plus", "sim", "4", "(3", "cached)", "4", "0"], latest.stdout
    assert latest.stdout.startswith(f"run {second.run_id}")
    everything = cli("report", str(project.store), "--all")
    row = next(line.split() for line in everything.stdout.splitlines() if line.startswith("plus"))
    assert row[:4] == ["plus", "sim", "5", "5"], everything.stdout
    older = cli("report", str(project.store), "--run", first.run_id[:17])
    assert older.stdout.startswith(f"run {first.run_id}")
    listing = cli("runs", str(project.store))
    assert listing.returncode == 0 and first.run_id in listing.stdout and second.run_id in listing.stdout
    assert cli("report", str(project.store), "--list").stdout == listing.stdout
    unknown = cli("report", str(project.store), "--run", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no run 'nope'")


# --- compare ----------------------------------------------------------------------------------


def test_exact_binomial_and_mcnemar() -> None:
    assert binom_cdf_half(0, 10) == pytest.approx(1 / 1024)
    assert binom_cdf_half(3, 10) == pytest.approx(sum(math.comb(10, i) for i in range(4)) / 1024)
    # the log-space branch agrees with exact integers
    exact = sum(math.comb(1500, i) for i in range(700)) / 2**1500
    assert binom_cdf_half(699, 1500) == pytest.approx(exact, rel=1e-9)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(7, 1) == pytest.approx(2 * 9 / 256)


def items(outcomes: list[str], *, model: str = "m", suite: str = "s") -> list[RunItem]:
    return [RunItem(key=f"{suite}{model}{n:04d}".ljust(8, "0"), nodeid=f"{suite}.toml::p[{n}-{model}]",
                    outcome=o, suite=suite, suite_path=f"{suite}.toml", prompt="p",
                    instance=str(n), model=model) for n, o in enumerate(outcomes)]


def test_compare_finds_10_of_200_regressed_significant_and_1_not() -> None:
    base = ["passed"] * 150 + ["failed"] * 50
    ten = ["failed"] * 10 + base[10:]
    one = ["failed"] + base[1:]
    (row,) = compare_items(items(base), items(ten), with_model=True)
    assert (row.paired, len(row.regressed), len(row.improved)) == (200, 10, 0)
    assert row.p_value < 0.01 and row.significant_regression(0.05)
    assert row.regressed[0] == "s.toml::p[0-m]"
    (row,) = compare_items(items(base), items(one), with_model=True)
    assert len(row.regressed) == 1 and not row.significant_regression(0.05)
    # two models of one run pair by case
    (row,) = compare_items(items(base, model="a"), items(ten, model="b"), with_model=False)
    assert row.paired == 200 and row.significant_regression(0.05)


def put_run(store: Store, outcomes_by_model: dict[str, list[str]], started: float) -> str:
    run_id = new_run_id(started)
    all_items = [i for model, o in outcomes_by_model.items() for i in items(o, model=model)]
    store.put_run(RunManifest(run_id=run_id, started_at=started, finished_at=started + 1,
                              models=tuple(outcomes_by_model), items=tuple(all_items)))
    return run_id


def test_compare_cli_gates_on_a_significant_regression(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "st")
    base = ["passed"] * 150 + ["failed"] * 50
    a = put_run(store, {"m": base}, 1_700_000_000)
    b = put_run(store, {"m": ["failed"] * 10 + base[10:]}, 1_700_000_100)
    c = put_run(store, {"m": ["failed"] + base[1:], "n": ["failed"] * 10 + base[10:]}, 1_700_000_200)
    gate = cli("compare", a, b, "--store", str(store.root), "--fail-on-regression")
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "REGRESSED" in gate.stdout and "s.toml::p[0-m]" in gate.stdout
    assert cli("compare", a, b, "--store", str(store.root)).returncode == 0  # report only
    assert cli("compare", a, b, "--store", str(store.root), "--fail-on-regression",
               "--alpha", "0.001").returncode == 0  # p = 0.00195
    one = cli("compare", a, f"{c}:m", "--store", str(store.root), "--fail-on-regression")
    assert one.returncode == 0 and "REGRESSED" not in one.stdout
    # models of one run (the latest by default), paired by case
    models = cli("compare", "m", "n", "--store", str(store.root), "--fail-on-regression")
    assert models.returncode == 1 and f"run {c} model n" in models.stdout
    bad = cli("compare", a, "nosuch", "--store", str(store.root))
    assert bad.returncode == 2 and bad.stderr.startswith("error: 'nosuch' is neither a run")


def test_manifests_hold_no_secret() -> None:
    settings = {"models": [{"name": "x", "base_url": "https://user:s3cret@host/v1",
                            "api_key_env": "OPENAI_API_KEY",
                            "headers": {"Authorization": "Bearer s3cret", "x-trace": "1"}}],
                "api_key": "s3cret", "url": "https://h/v1?api-key=s3cret&x=1"}
    clean = json.dumps(scrub_secrets(settings))
    assert "s3cret" not in clean and "OPENAI_API_KEY" in clean and "x-trace" in clean
    assert "x=1" in clean


def test_scorer_fingerprints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from pytest_llmbench.records import ScorerSpec
    from pytest_llmbench.scoring.resolve import NamedScorer, resolve_scorer, scorer_fingerprint
    from pytest_llmbench.version import plugin_version

    assert scorer_fingerprint(resolve_scorer(ScorerSpec(name="numeric"))) == f"builtin:{plugin_version()}"
    assert scorer_fingerprint(resolve_scorer(ScorerSpec(name="code"))) == f"builtin:{plugin_version()}"
    module = tmp_path / "fp_scorer.py"
    module.write_text(SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    first = scorer_fingerprint(resolve_scorer(ScorerSpec(name="fp_scorer:judge"), rootdir=tmp_path))
    module.write_text(SCORER + "\ndef helper():\n    return 1\n")  # the file, not only the function
    second = scorer_fingerprint(NamedScorer("fp_scorer:judge", importlib.import_module("fp_scorer").judge))
    assert first.startswith("source:") and first != second

    def judge(req: object) -> float:
        return 1.0

    judge.llmbench_fingerprint = lambda: "model=gpt-4o;t=0"  # type: ignore[attr-defined]
    assert scorer_fingerprint(NamedScorer("j", judge)).endswith(";judge:model=gpt-4o;t=0")
