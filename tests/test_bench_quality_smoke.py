"""Smoke test of bench/bench_quality.py: all three methods run on a tiny model and a tiny GLUE folder, and the table lands."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import make_base

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _load_bench():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_rte(root: Path, n_train: int = 24, n_dev: int = 12) -> Path:
    """A GLUE-layout RTE folder whose label follows a word the tiny vocab knows ('not')."""
    words = ["the cat is good", "a dog is bad", "the movie is good", "a cat is not bad", "the dog is not good"]
    folder = root / "RTE"
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            s1 = words[i % len(words)]
            label = "not_entailment" if "not" in s1 else "entailment"
            lines.append(f"{i}\t{s1}\t{words[(i + 1) % len(words)]}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return root


def test_harness_runs_all_methods_and_writes_table(tmp_path: Path, monkeypatch):
    pytest.importorskip("peft")
    bench = _load_bench()
    base = make_base(tmp_path / "base", max_position_embeddings=128)  # the harness trains at --max-seq-length 128
    glue = _tiny_rte(tmp_path / "glue")
    work, results = tmp_path / "work", tmp_path / "results"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--tasks", "rte", "--methods", "full,lora,diffprune,diffprune-matched", "--model", str(base),
            "--data-dir", str(glue), "--caps", "rte=all", "--epochs", "1", "--dp-epochs", "1",
            "--dp-fixmask-epochs", "1", "--work-dir", str(work), "--results-dir", str(results)]
    assert bench.main(argv) == 0

    doc = json.loads((results / "quality.json").read_text())
    row = doc["results"]["rte"]
    for method in ("full", "lora", "diffprune"):
        assert row[method] is not None, method
        assert 0.0 <= row[method]["score"] <= 100.0
        assert row[method]["bytes"] > 0
    # Full finetuning stores every weight; the 0.5% diff and the adapter are far smaller.
    assert row["diffprune"]["bytes"] < row["full"]["bytes"]
    assert row["lora"]["bytes"] < row["full"]["bytes"]
    # The diff keeps round(0.5% of the shared entries): at most one entry over the exact fraction.
    assert row["diffprune"]["density"] * row["diffprune"]["pack_report"]["budget_numel"] <= 0.005 * row["diffprune"]["pack_report"]["budget_numel"] + 1
    table = (results / "quality.md").read_text()
    assert "| rte |" in table and "full FT" in table and "LoRA" in table and "diffprune" in table
    assert "python bench/bench_quality.py" in table

    # A rerun finds every run in the cache: nothing is retrained, the files are not touched.
    cached = sorted(work.glob("rte-*.json"))
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    assert bench.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    assert sorted(work.glob("rte-*.json")) == cached


def test_report_only_reads_cache_without_training(tmp_path: Path):
    bench = _load_bench()
    results = tmp_path / "results"
    argv = ["--tasks", "rte", "--report-only", "--work-dir", str(tmp_path / "empty"), "--results-dir", str(results)]
    assert bench.main(argv) == 0
    doc = json.loads((results / "quality.json").read_text())
    assert doc["results"]["rte"] == {"full": None, "lora": None, "diffprune": None, "diffprune-matched": None}
    assert not (tmp_path / "empty").exists()


def test_fit_bytes_finds_the_largest_diff_within_a_byte_budget(tiny_base: Path, tiny_finetune: Path, tmp_path: Path):
    from diffcli import artifact, checkpoint, projection
    from diffcli.extract import extract_diff

    bench = _load_bench()
    ckpt = tmp_path / "ckpt"
    checkpoint.save(projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff, ckpt)
    full_bytes = len(artifact.pack(checkpoint.load(ckpt)))
    target = full_bytes * 2 // 3
    diff, density = bench.fit_bytes(ckpt, target)
    size = len(artifact.pack(diff))
    assert size <= target
    assert 0.0 < density < 0.05
    assert diff.nnz == projection.budget(density, diff.budget_numel)
    # A little denser would not fit: the bisection found (nearly) the largest fitting density.
    bigger = projection.project(checkpoint.load(ckpt), density * 1.05).diff
    assert len(artifact.pack(bigger)) > target


def test_baseline_lr_grid_reports_the_best_dev_score_and_what_was_not_run(tmp_path: Path):
    bench = _load_bench()
    work, results = tmp_path / "work", tmp_path / "results"
    argv = ["--tasks", "rte", "--full-lr", "5e-5,1e-4,2e-4", "--work-dir", str(work), "--results-dir", str(results)]
    suite = bench.Suite(bench.parse_args(argv + ["--report-only"]))
    work.mkdir()
    for lr, score in ((5e-5, 55.0), (1e-4, 61.5)):  # 2e-4 not run
        s = suite.settings("rte", "full", lr=lr)
        suite.cache_path(s).write_text(json.dumps({"score": score, "bytes": 100, "settings": s}))
    best = suite.best("rte", "full")
    assert best["score"] == 61.5 and best["settings"]["lr"] == 1e-4
    assert best["lr_scores"] == {"5e-05": 55.0, "0.0001": 61.5}
    assert best["lrs_missing"] == [2e-4]
    assert suite.best("rte", "lora") is None
    assert bench.main(argv + ["--report-only"]) == 0
    table = (results / "quality.md").read_text()
    assert "| rte | accuracy |" in table and "61.50" in table and "55.00 |" not in table
    assert "- rte full FT: 5e-05 → 55.00, 0.0001 → 61.50 (not run: 0.0002)" in table


def test_a_report_of_an_empty_cache_keeps_the_committed_history(tmp_path: Path):
    """The cache behind bench/results/quality.md is gone: --report-only wrote an all-'—' table over it."""
    bench = _load_bench()
    results = tmp_path / "results"
    results.mkdir()
    (results / "quality.md").write_text("history\n")
    argv = ["--report-only", "--work-dir", str(tmp_path / "empty"), "--results-dir", str(results)]
    assert bench.main(argv) == 2
    assert (results / "quality.md").read_text() == "history\n" and not (results / "quality.json").exists()
