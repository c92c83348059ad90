"""bench/mask_ablation_table.py: per-run rows from train/eval JSON, means over seeds, refusals of unequal runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_bench

mat = load_bench("mask_ablation_table")


def _run(folder: Path, name: str, l0: int, fixmask: int, packed: float, nbytes: int, phase: str = "l0") -> str:
    prefix = folder / name
    epochs = {phase: l0, "fixmask": fixmask} if l0 else {"fixmask": fixmask}
    Path(f"{prefix}.json").write_text(json.dumps({
        "epochs": epochs, "seconds": 10.0, "after_projection": {"metrics": {"validation": {"accuracy": 0.5}}},
        "after_fixmask": {"epoch": 2, "score": packed / 100 + 0.001}}))
    Path(f"{prefix}.eval.json").write_text(json.dumps({"metrics": {"validation": {"accuracy": packed / 100}}}))
    Path(f"{prefix}.diff").write_bytes(b"x" * nbytes)
    return str(prefix)


def test_means_and_gaps_over_seeds(tmp_path):
    args = [f"l0:{s}=" + _run(tmp_path, f"l0-{s}", 5, 3, score, 300) for s, score in ((42, 60.0), (43, 62.0))]
    args += [f"random:{s}=" + _run(tmp_path, f"r-{s}", 0, 8, score, 200) for s, score in ((42, 55.0), (43, 57.0))]
    out = tmp_path / "t.md"
    assert mat.main(["--task", "rte", "--out", str(out), *args]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["summary"]["l0"]["mean"] == pytest.approx(61.0) and doc["summary"]["l0"]["std"] == pytest.approx(2 ** 0.5)
    assert doc["summary"]["random"]["gap_to_l0"] == pytest.approx(-5.0)
    text = out.read_text()
    assert "| random | 2 | 56.00 ± 1.41 | -5.00 | 200 |" in text and "| l0 | 43 | 5 L0 + 3 fixed |" in text


def test_unequal_passes_or_seeds_are_refused(tmp_path):
    a = "l0:42=" + _run(tmp_path, "a", 5, 3, 60.0, 1)
    with pytest.raises(SystemExit, match="same passes"):
        mat.main(["--task", "rte", "--out", str(tmp_path / "o.md"), a, "random:42=" + _run(tmp_path, "b", 0, 6, 1, 1)])
    with pytest.raises(SystemExit, match="same seeds"):
        mat.main(["--task", "rte", "--out", str(tmp_path / "o.md"), a, "random:43=" + _run(tmp_path, "c", 0, 8, 1, 1)])
    with pytest.raises(SystemExit, match="MASK:SEED=PREFIX"):
        mat.main(["--task", "rte", "--out", str(tmp_path / "o.md"), "l0=" + str(tmp_path / "a")])
    assert not (tmp_path / "o.md").exists()


def test_a_methods_first_phase_counts_under_its_own_name(tmp_path):
    """train --json files magnitude's dense epochs under 'dense' (swr 'gated', basis 'basis'), not 'l0': they were
    dropped, so 5 dense + 3 fixed was refused beside 5 L0 + 3 fixed, and 5 + 8 passed beside 8 fixed."""
    l0 = "l0:42=" + _run(tmp_path, "a", 5, 3, 60.0, 1)
    mag = "magnitude:42=" + _run(tmp_path, "m", 5, 3, 61.0, 1, phase="dense")
    out = tmp_path / "t.md"
    assert mat.main(["--task", "rte", "--out", str(out), l0, mag]) == 0
    assert "| magnitude | 42 | 5 dense + 3 fixed |" in out.read_text()
    over = "magnitude:42=" + _run(tmp_path, "m2", 5, 8, 61.0, 1, phase="dense")
    with pytest.raises(SystemExit, match="same passes"):
        mat.main(["--task", "rte", "--out", str(out), "fisher:42=" + _run(tmp_path, "f", 0, 8, 60.0, 1), over])
