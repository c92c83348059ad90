"""bench/code_record.py, measured.py: an entry names the code its run imported, and retrains when that code changes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.conftest import load_bench

machines = load_bench("run_machines")

REPO = Path(__file__).resolve().parents[1]


def _code_suite(tmp_path, monkeypatch, imports=("diffcli/train.py",), fail=False):
    """A Suite over a repository of three files whose fake runs import `imports`; the partial each run saw."""
    q = load_bench("quality_v2")
    monkeypatch.setattr(q, "trainer_methods", lambda: {"l0"})
    root = tmp_path / "repo"
    for rel in ("diffcli/train.py", "diffcli/plot.py", "bench/baselines.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    executed = []

    def fake(self, run, s, run_dir):
        executed.append(((run.method, run.lr), (run_dir / "ckpt.partial").is_dir()))
        if fail:
            (run_dir / "usage.json").write_text(json.dumps({"imported": list(imports)}))
            raise RuntimeError("exit 1: boom")
        return {"score": 50.0 + run.lr, "bytes": 10, "train_seconds": 1.0, "imported": list(imports)}

    monkeypatch.setattr(q.Suite, "_execute", fake)
    p = q.Protocol(quick=True, tasks=["rte"], methods=["full", "dp-l0"], seeds=[1], data_dir=str(tmp_path))
    return q, q.Suite(p, tmp_path / "work", code_root=root), root, executed


def _touch(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_a_cached_run_is_retrained_when_a_file_it_imported_changes_and_only_then(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch)
    suite.lane(wait_s=0)
    assert len(executed) == 2
    entry = suite.cached(q.Run("rte", "full", q.LR_GRID["full"][1], 1))
    assert set(entry["code"]) == {"diffcli/train.py"}  # a baseline: what its process imported, nothing else
    dp = suite.cached(q.Run("rte", "dp-l0", q.LR_GRID["dp-l0"][1], 1))
    assert set(dp["code"]) >= {"diffcli/train.py", *q.SCORING_CODE}  # a diffprune run: and the lane's scoring
    executed.clear()
    _touch(root / "diffcli/plot.py", "x = 1\n")      # a file no run imported: every cell stays cached
    (root / "diffcli/new.py").write_text("y = 2\n")
    suite.lane(wait_s=0)
    assert executed == []
    assert suite.stale_entries() == 0
    _touch(root / "diffcli/train.py", "z = 3\n")     # a file every run imported: every cell is due again
    assert suite.cached(q.Run("rte", "full", q.LR_GRID["full"][1], 1)) is None
    assert suite.stale_entries() == 2
    report = load_bench("quality_v2_report")
    doc = report.assemble(suite)
    text = report.render(suite, {**doc, "environment": machines.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert "2 cached runs left out: code they imported has changed since" in text
    suite.lane(wait_s=0)
    assert len(executed) == 2
    executed.clear()
    suite.lane(wait_s=0)
    assert executed == []
    (root / "diffcli/train.py").unlink()               # a file that is gone counts as changed
    assert suite.plan() and len(suite.plan()) == 2


def test_a_failure_is_retried_after_the_code_it_ran_changes(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch, fail=True)
    suite.lane(wait_s=0)
    assert len(executed) == 2 and len(list(suite.work.glob("*.failed.json"))) == 2
    suite.lane(wait_s=0)
    assert len(executed) == 2                          # recorded, not retried
    _touch(root / "diffcli/plot.py", "w = 4\n")  # not imported by the failed runs
    suite.lane(wait_s=0)
    assert len(executed) == 2
    _touch(root / "diffcli/train.py", "fix = 1\n")
    suite.lane(wait_s=0)
    assert len(executed) == 4


def test_an_interrupted_run_resumes_only_under_the_library_code_it_started_with(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch)
    run = q.Run("rte", "dp-l0", q.LR_GRID["dp-l0"][1], 1)
    run_dir = suite.work / "runs" / suite.stem(run, suite.settings(run))
    # started with today's library, then interrupted: it resumes
    (run_dir / "ckpt.partial").mkdir(parents=True)
    lib = {k: v for k, v in suite.code.library().items() if k.startswith("diffcli/")}
    (run_dir / "code-start.json").write_text(json.dumps(lib))
    assert suite.run_one(run) and executed[-1] == (("dp-l0", run.lr), True)
    # started under other code (or before the mark existed): the partial is dropped, the run starts over
    for mark in ({**lib, "diffcli/train.py": "0" * 16}, None):
        (suite.work / f"{suite.stem(run, suite.settings(run))}.json").unlink()
        (run_dir / "ckpt.partial").mkdir(exist_ok=True)
        if mark is None:
            (run_dir / "code-start.json").unlink()
        else:
            (run_dir / "code-start.json").write_text(json.dumps(mark))
        assert suite.run_one(run) and executed[-1] == (("dp-l0", run.lr), False)
        assert not (run_dir / "ckpt.partial").exists()


def test_measured_records_the_repository_files_a_run_imported(tmp_path):
    import subprocess

    usage = tmp_path / "usage.json"
    script = tmp_path / "run.py"
    script.write_text("import diffcli.metrics\n")
    subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), str(script)], check=True,
                   cwd=REPO)
    written = json.loads(usage.read_text())
    got = written["imported"]
    assert "diffcli/metrics.py" in got and "diffcli/__init__.py" in got
    assert written["machine"]["cores"] == os.cpu_count() and written["machine"]["cpu"]
    assert "diffcli/artifact.py" not in got and "bench/measured.py" not in got
    subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), "-m", "diffcli", "--help"],
                   check=True, cwd=REPO, capture_output=True)
    got = json.loads(usage.read_text())["imported"]
    assert "diffcli/__main__.py" in got and "diffcli/cli/app.py" in got


def test_measured_runs_the_checkouts_own_code_not_another_copy_on_the_path(tmp_path):
    """A lane in a second worktree must train (and record) that worktree's library, not an installed or other copy."""
    import os
    import subprocess

    other = tmp_path / "other" / "diffcli"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise SystemExit('imported another copy of diffcli')\n")
    usage = tmp_path / "usage.json"
    script = tmp_path / "run.py"
    script.write_text("import diffcli.metrics\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "other")}
    for args in ([str(script)], ["-m", "diffcli", "--help"]):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "measured.py"), str(usage), *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "diffcli/__init__.py" in json.loads(usage.read_text())["imported"]



def test_a_change_to_how_the_lane_trains_or_scores_a_diffprune_run_makes_only_diffprune_entries_stale(tmp_path,
                                                                                                     monkeypatch):
    q, suite, root, _executed = _code_suite(tmp_path, monkeypatch)
    (root / "bench/dp_run.py").write_text("# the train command and the packed .diff's score\n")
    suite.lane(wait_s=0)
    full, dp = (q.Run("rte", m, q.LR_GRID[m][1], 1) for m in ("full", "dp-l0"))
    assert "bench/dp_run.py" in suite.cached(dp)["code"]
    _touch(root / "bench/dp_run.py", "w = 4\n")
    assert suite.cached(dp) is None and suite.cached(full) is not None
    mt = load_bench("quality_v2_methods")  # the methods table's runs are sized by methods_sizing, trimmed by fit_density
    assert set(mt.MethodsSuite.scoring_code) == {*q.SCORING_CODE, "bench/bench_size_score.py", "bench/methods_sizing.py"}
