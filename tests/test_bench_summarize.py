"""bench/summarize_quality.py: seeds of one configuration are grouped, averaged and their verdicts counted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("summarize_quality", REPO / "bench" / "summarize_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(path: Path, label: str, seed: int, full: dict, dp: dict, ahead: bool) -> Path:
    results = {t: {"full": {"score": full[t]}, "lora": {"score": 1.0}, "diffprune": {"score": dp[t]},
                   "diffprune-matched": None} for t in full}
    doc = {"invocation": f"python bench/bench_quality.py --label {label}-s{seed} --seed {seed}",
           "results": results, "verdicts": {"avg_within_1pt": True, "no_task_below_2pt": True,
                                            "ahead_of_lora_at_le_bytes": ahead}}
    path.write_text(json.dumps(doc))
    return path


def test_seeds_are_grouped_averaged_and_counted(tmp_path):
    paths = [_report(tmp_path / "a.json", "cfg", 42, {"rte": 60.0, "cola": 10.0}, {"rte": 61.0, "cola": 7.0}, True),
             _report(tmp_path / "b.json", "cfg", 43, {"rte": 50.0, "cola": 20.0}, {"rte": 53.0, "cola": 19.0}, False),
             _report(tmp_path / "c.json", "other", 42, {"rte": 1.0}, {"rte": 2.0}, True)]
    text = _module().summarize(paths)
    assert "## cfg (seeds 42, 43)" in text and "## other (seeds 42)" in text
    cfg = text.split("## cfg")[1].split("## other")[0]
    rows = {line.split("|")[1].strip(): line for line in cfg.splitlines() if line.startswith("| ")}
    # rte: gaps +1 and +3 (mean +2.00, worst +1.00); cola: −3 and −1 (mean −2.00, worst −3.00)
    assert "| +2.00 | +1.00 | +1.00, +3.00 |" in rows["rte"]
    assert "| -2.00 | -3.00 | -3.00, -1.00 |" in rows["cola"]
    assert rows["rte"].split("|")[2].strip() == "55.00"  # full FT mean over seeds
    assert "| **average** |" in rows["**average**"] and "| +0.00 | -1.00 | -1.00, +1.00 |" in rows["**average**"]
    assert "- ahead of LoRA at ≤ bytes: 1 of 2 seeds" in cfg
