"""bench/size_score_seeds.py: the same candidates for every seed, means over seeds, the verdicts on the means."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_bench

sss = load_bench("size_score_seeds")


def _row(label, version, nbytes, score):
    return {"label": label, "version": version, "bytes": nbytes, "score": score}


def _entry(seed, today, best_v2, fp16, denser=None, v1_lower=50.0):
    rows = [_row("v1 fp16 (today)", 1, 340, 60.0), _row("v2 fp16", 2, 290, fp16), _row("v2 int4", 2, 140, best_v2),
            _row("v2 ternary", 2, 80, 59.0), _row("v2 int8 @ 0.25%", 2, 110, 50.0),
            _row("v1 fp16 @ 0.25%", 1, 160, v1_lower), _row("v1 fp16 @ LoRA bytes (0.433%)", 1, 300, today)]
    if denser is not None:  # only some seeds have a denser diff: never a candidate
        rows.append(_row("v2 int4 @ LoRA bytes of the 1.0% diff (1.000%)", 2, 259, denser))
    return {"task": "rte", "training": f"2,490 train examples, --method l0 --epochs 5 --fixmask-epochs 3 --seed {seed}",
            "reference": "v1 fp16 (today)", "lora_bytes": 301, "rows": rows}


def test_means_over_seeds_and_verdicts_on_the_means_with_the_same_candidates_for_every_seed(tmp_path):
    entries = [_entry(42, 62.0, 61.0, 60.0, denser=99.0), _entry(43, 60.0, 63.0, 61.0), _entry(44, 61.0, 62.0, 59.0)]
    s = sss.summarize("rte", entries)
    assert [r["seed"] for r in s["seeds"]] == ["42", "43", "44"]
    assert s["seeds"][0]["best"] == 61.0 and s["seeds"][0]["best_label"] == "v2 int4"  # the denser row left out
    assert s["today_mean_std"] == pytest.approx((61.0, 1.0))
    assert s["best_mean_std"] == pytest.approx((62.0, 1.0))
    assert s["fixed_mean_std"][0] == pytest.approx(60.0)
    assert s["best_over_today"] and not s["fixed_over_refit"]
    assert s["half_bytes_every_seed"]  # ternary at 80/340 keeps within 0.5 point of 60.0 on every seed
    text = sss.render(s, "cmd")
    assert "| mean ± std | | 60.00 ± 0.00 | 61.00 ± 1.00 | 62.00 ± 1.00 | 61.00 ± 1.00 | 60.00 ± 1.00 | |" in text
    assert "target: higher: met" in text


def test_today_gets_its_best_file_at_the_same_densities_as_v2():
    # a lower-density v1 file that scores above the re-projected one is today's best at LoRA's bytes
    s = sss.summarize("rte", [_entry(42, 61.0, 62.0, 61.0, v1_lower=63.0), _entry(43, 61.0, 62.0, 61.0)])
    assert s["seeds"][0]["today"] == 63.0 and s["seeds"][0]["today_label"] == "v1 fp16 @ 0.25%"
    assert s["seeds"][1]["today_label"] == "v1 fp16 @ LoRA bytes (0.433%)" and s["refit_mean_std"][0] == 61.0
    assert s["today_mean_std"][0] == 62.0 and not s["best_over_today"]  # a tie is not higher


def test_a_seed_whose_lean_files_lose_score_misses_half_bytes_and_ties_are_not_higher():
    bad = _entry(43, 61.0, 61.0, 61.0)
    bad["rows"] = [r if r["label"] != "v2 ternary" else {**r, "score": 50.0} for r in bad["rows"]]
    bad["rows"] = [r if r["label"] != "v2 int4" else {**r, "score": 59.0} for r in bad["rows"]]
    s = sss.summarize("rte", [_entry(42, 61.0, 61.0, 61.0), bad])
    assert not s["half_bytes_every_seed"] and not s["best_over_today"]


def test_the_cli_refuses_a_seed_twice_and_a_file_without_the_task(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"tasks": {"rte": _entry(42, 61.0, 62.0, 61.0)}}))
    with pytest.raises(SystemExit, match="same seed"):
        sss.main(["rte", str(a), str(a), "--out", str(tmp_path / "o.md")])
    with pytest.raises(SystemExit, match="no result for mrpc"):
        sss.main(["mrpc", str(a), "--out", str(tmp_path / "o.md")])
    assert not (tmp_path / "o.md").exists()
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"tasks": {"rte": _entry(43, 60.0, 61.0, 60.0)}}))
    assert sss.main(["rte", str(a), str(b), "--out", str(tmp_path / "o.md")]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["best_mean_std"][0] == pytest.approx(61.5)
