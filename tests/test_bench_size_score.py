"""bench/bench_size_score.py on a tiny model: every candidate file is scored, and each format's best at LoRA's bytes
is chosen among the same densities."""

from __future__ import annotations

import pytest

from tests.conftest import load_bench


def test_both_formats_get_the_same_densities_and_their_best_file_that_fits(tmp_path, tiny_base, tiny_finetune):
    from diffcli import checkpoint, projection
    from diffcli.extract import extract_diff
    from tests.test_bench_quality_smoke import _tiny_rte

    bss = load_bench("bench_size_score")
    ckpt = tmp_path / "ckpt"
    checkpoint.save(projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff, ckpt)
    glue = _tiny_rte(tmp_path / "glue")
    full = bss.run_task("rte", ckpt, str(tiny_base), str(glue), lora_bytes=10**9, max_eval_samples=8)
    labels = [r["label"] for r in full["rows"]]
    for d in bss.DENSITIES:  # today's format at every lower density v2 gets
        assert f"v1 fp16 @ {d:.2%}" in labels and f"v2 int8 @ {d:.2%}" in labels
    v1 = [r for r in full["rows"] if r["version"] == 1]
    assert full["today_at_lora_bytes"] == max(r["score"] for r in v1)  # every v1 file fits 1 GB
    assert full["best_at_lora_bytes"] == max(r["score"] for r in full["rows"] if r["version"] == 2)
    assert full["lora_bytes_target_met"] == (full["best_at_lora_bytes"] > full["today_at_lora_bytes"])

    # a byte limit under the 0.5% v1 file: today's candidates are the re-projected and the lower-density files
    limit = next(r for r in v1 if r["label"] == "v1 fp16 (today)")["bytes"] - 1
    tight = bss.run_task("rte", ckpt, str(tiny_base), str(glue), lora_bytes=limit, max_eval_samples=8)
    fits = [r for r in tight["rows"] if r["version"] == 1 and r["bytes"] <= limit]
    assert {r["label"].split(" (")[0] for r in fits} >= {"v1 fp16 @ LoRA bytes"}
    assert tight["today_at_lora_bytes_label"] in [r["label"] for r in fits]
    assert tight["today_at_lora_bytes"] == max(r["score"] for r in fits)

    # a denser diff adds v2 rows only: they are shown but judge nothing (v1 gets no such candidates)
    dense = tmp_path / "dense"
    checkpoint.save(projection.project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.2).diff, dense)
    both = bss.run_task("rte", ckpt, str(tiny_base), str(glue), lora_bytes=10**9, max_eval_samples=8, denser=dense)
    extra = [r for r in both["rows"] if "of the" in r["label"]]
    own = [r for r in both["rows"] if r["version"] == 2 and r not in extra]
    assert extra and both["best_at_lora_bytes"] == max(r["score"] for r in own)
    assert both["best_at_lora_bytes_label"] in [r["label"] for r in own]


@pytest.mark.parametrize("name, args", [("bench_size_score", ["rte=ck"]),
                                        ("bench_qat", ["--task", "rte", "plain=a", "qat=b"])])
def test_a_smoke_run_does_not_write_over_the_committed_results(monkeypatch, name, args):
    """--max-eval-samples scored a few dev examples and wrote them over the committed full-dev results."""
    module = load_bench(name)
    monkeypatch.setattr("sys.argv", [f"{name}.py", "--data-dir", "x", "--max-eval-samples", "8", *args])
    with pytest.raises(SystemExit, match="smoke run"):
        module.main()
