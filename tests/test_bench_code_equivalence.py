"""bench/code_equivalence.py, code_record's equivalences: a checked change keeps entries; anything else retrains them."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from tests.conftest import load_bench
from tests.test_bench_code_record import _code_suite, _touch

machines = load_bench("run_machines")


def _hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _attest(root, files: dict, result: str = "identical") -> None:
    rec = root / "bench/results/code-equivalence.json"
    rec.parent.mkdir(parents=True, exist_ok=True)
    doc = json.loads(rec.read_text()) if rec.is_file() else {"checks": []}
    doc["checks"].append({"from": "a", "to": "b", "result": result, "files": files})
    rec.write_text(json.dumps(doc))


def test_an_entry_counts_through_checked_changes_and_only_through_them(tmp_path, monkeypatch):
    q, suite, root, executed = _code_suite(tmp_path, monkeypatch)
    suite.lane(wait_s=0)
    assert len(executed) == 2
    train = root / "diffcli/train.py"
    h0 = _hash(train)
    _touch(train, "# only refuses bad input\n")
    h1 = _hash(train)
    _touch(train, "# reads with less memory\n")
    h2 = _hash(train)
    code = q.code_record
    fresh = lambda: q.Suite(suite.p, suite.work, code_root=root)  # noqa: E731 - the record is read at start
    assert fresh().stale_entries() == 2
    _attest(root, {"diffcli/train.py": [h0, h1]})
    assert fresh().stale_entries() == 2                      # h0 → h1 checked, but the file is at h2 now
    _attest(root, {"diffcli/train.py": [h1, h2]}, result="differs")
    assert fresh().stale_entries() == 2                      # a failed check counts for nothing
    _attest(root, {"diffcli/train.py": [h1, h2]})
    s = fresh()
    assert s.stale_entries() == 0 and s.attested_entries() == 2   # h0 → h1 → h2: a chain of checks
    assert s.plan() == [] and s.cached(q.Run("rte", "full", q.LR_GRID["full"][1], 1)) is not None
    report = load_bench("quality_v2_report")
    doc = report.assemble(s)
    text = report.render(s, {**doc, "environment": machines.environment(), "date": "d", "majority": {}}, ["cmd"])
    assert "2 cached runs count although code they imported has changed since" in text
    _touch(train, "# computes something else\n")           # an unchecked change: stale as before
    assert fresh().stale_entries() == 2 and fresh().attested_entries() == 0
    _attest(root, {"diffcli/train.py": [h2, h0]})   # a cycle h0 → h1 → h2 → h0 ends, it does not loop
    assert code.Snapshot(root).current("diffcli/train.py", h0) is False
    assert code.Snapshot(root, checked=False).current("diffcli/train.py", h2) is False


@pytest.mark.parametrize("text", ["{", '{"checks": [{"result": "identical", "files": {"a.py": "h"}}]}', "[]"])
def test_a_broken_equivalence_record_is_an_error_not_silence(tmp_path, text):
    code = load_bench("code_record")
    rec = tmp_path / code.EQUIVALENCE
    rec.parent.mkdir(parents=True)
    rec.write_text(text)
    with pytest.raises(ValueError, match="not a code-equivalence record"):
        code.Snapshot(tmp_path)


# ------------------------------------------------------------------------------------------ the check itself
def _entry(score: float, **extra) -> dict:
    return {"score": score, "bytes": 100, "history": [{"epoch": 1, "score": score}], "train_seconds": 1.0,
            "peak_rss_bytes": 5, "finished": "t", **extra}


@pytest.fixture
def eq(tmp_path, monkeypatch):
    """code_equivalence with its work folder in tmp_path and two commits' trees holding diffcli/a.py."""
    m = load_bench("code_equivalence")
    monkeypatch.setattr(m, "WORK", tmp_path / "eq")
    trees = {}
    for c in ("old", "new"):
        tree = tmp_path / f"tree-{c}"
        (tree / "diffcli").mkdir(parents=True)
        (tree / "diffcli/a.py").write_text("x = 1\n")
        trees[c] = tree
    monkeypatch.setattr(m, "tree_of", lambda c: trees[c])
    code = {"diffcli/a.py": _hash(trees["old"] / "diffcli/a.py")}

    def put(commit, name, entry, diff=b"DIFF", table="quality"):
        store = m.store_of(commit, table)
        store.mkdir(parents=True, exist_ok=True)
        (store / f"{name}.json").write_text(json.dumps({**entry, "code": entry.get("code", code)}))
        if diff is not None:
            (store / "runs" / name).mkdir(parents=True, exist_ok=True)
            (store / "runs" / name / "rte.diff").write_bytes(diff)
    return m, put, code


def test_runs_that_match_but_for_times_memory_and_paths_are_identical(eq):
    m, put, code = eq
    put("old", "r1", _entry(61.0))
    put("new", "r1", {**_entry(61.0), "train_seconds": 9.0, "peak_rss_bytes": 7, "finished": "u",
                      "history": [{"epoch": 1, "score": 61.0, "seconds": 3.0}]})
    problems, summary = m.compare("old", "new")
    assert problems == [] and summary["runs"] == 1 and summary["diff_files"] == 1


@pytest.mark.parametrize("change, says", [
    (lambda put: put("new", "r1", _entry(61.5)), "score: 61.0 → 61.5"),
    (lambda put: put("new", "r1", _entry(61.0, history=[{"epoch": 2, "score": 61.0}])), "history.0.epoch"),
    (lambda put: put("new", "r1", _entry(61.0, nnz=3)), "nnz: '<absent>' → 3"),
    (lambda put: put("new", "r1", _entry(61.0), diff=b"DIFG"), "the .diff files differ"),
    (lambda put: put("new", "r1", _entry(61.0, code={"diffcli/a.py": "1" * 16})), "did not run that commit's code"),
    (lambda put: put("new", "r2", _entry(61.0)), "only at new"),
])
def test_any_difference_in_what_a_run_computed_fails_the_check(eq, change, says):
    m, put, code = eq
    put("old", "r1", _entry(61.0))
    put("new", "r1", _entry(61.0))
    change(put)
    problems, _ = m.compare("old", "new")
    assert problems and any(says in p for p in problems), problems


def test_a_failed_run_or_no_runs_at_all_fail_the_check(eq):
    m, put, code = eq
    assert m.compare("old", "new")[0] == ["no runs to compare: run both commits first"]
    for c in ("old", "new"):
        store = m.store_of(c, "methods")
        store.mkdir(parents=True)
        (store / "r.failed.json").write_text(json.dumps({"error": "RuntimeError: boom", "code": code}))
    assert any("the run failed" in p and "boom" in p for p in m.compare("old", "new")[0])


def test_the_record_maps_every_changed_code_file_from_its_old_hash_to_its_new(tmp_path, monkeypatch):
    m = load_bench("code_equivalence")
    repo = tmp_path / "repo"
    for rel, text in {"diffcli/a.py": "a = 1\n", "diffcli/gone.py": "g = 1\n", "bench/measured.py": "m = 1\n",
                      "docs/x.md": "doc\n"}.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "x", "--allow-empty")
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "old")
    old_a = _hash(repo / "diffcli/a.py")
    for rel, text in {"diffcli/a.py": "a = 2\n", "bench/measured.py": "m = 2\n", "docs/x.md": "doc 2\n",
                      "diffcli/new.py": "n = 1\n"}.items():
        (repo / rel).write_text(text)
    (repo / "diffcli/gone.py").unlink()
    git("add", "-A")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "new")
    monkeypatch.setattr(m, "REPO", repo)
    files, added, removed = m.changed_files("HEAD~1", "HEAD")
    assert files == {"diffcli/a.py": [old_a, _hash(repo / "diffcli/a.py")]}  # not measured.py (no code), nor docs
    assert added == ["diffcli/new.py"] and removed == ["diffcli/gone.py"]


def test_record_writes_the_check_only_when_every_run_matched_and_snapshots_follow_it(eq, tmp_path, monkeypatch):
    m, put, code = eq
    root = tmp_path / "root"
    (root / "diffcli").mkdir(parents=True)
    (root / "diffcli/a.py").write_text("a = 2\n")
    monkeypatch.setattr(m, "REPO", root)
    monkeypatch.setattr(m, "changed_files", lambda old, new: ({"diffcli/a.py": ["0" * 16, _hash(root / "diffcli/a.py")]},
                                                              [], []))
    put("old", "r1", _entry(61.0))
    put("new", "r1", _entry(61.5))
    with pytest.raises(SystemExit, match="not recorded: the runs differ"):
        m.record("old", "new", "why", "rte")
    assert not (root / m.code_record.EQUIVALENCE).exists()
    put("new", "r1", _entry(61.0))
    check = m.record("old", "new", "refuses bad input only", "rte")
    assert check["result"] == "identical" and check["compared"]["runs"] == 1 and check["compared"]["diff_files"] == 1
    snap = m.code_record.Snapshot(root)
    assert snap.current("diffcli/a.py", "0" * 16) and not snap.current("diffcli/a.py", "1" * 16)
    m.record("old", "new", "again", "rte")  # the same pair again replaces its check, it does not add one
    assert len(json.loads((root / m.code_record.EQUIVALENCE).read_text())["checks"]) == 1
