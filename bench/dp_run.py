"""One diffprune run of the benchmark: the `diffprune train` command, and the dev score of its packed fp16 .diff.

Every diffprune entry records this file's hash (quality_v2.SCORING_CODE), so a change to how a run is trained or
scored here reruns the entries it made.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

from scoring import score_artifact

_score_lock = threading.Lock()  # one scoring at a time in a lane (its --jobs threads share the process)


def diffprune_args(s: dict, ckpt: Path, data_dir: str, with_method_flag: bool) -> list[str]:
    """The `diffprune train` arguments of one diffprune run: the one place to adjust for the trainer's CLI.

    l0: --epochs = L0 epochs; magnitude: --epochs = dense epochs; random/fisher take no --epochs (train refuses
    it). The tuned lr is the fixed-mask lr. Without --method in the CLI (before feat/methods) only l0 runs, as the
    trainer's default. --resume: a run whose lane was killed continues from its last finished epoch.
    """
    cmd = ["-m", "diffcli", "train", "--task", s["task"], "--data-dir", data_dir, "--model", s["model"],
           *(["--epochs", str(s["first_epochs"])] if s["first_epochs"] else []),
           "--fixmask-epochs", str(s["fixmask_epochs"]),
           "--fixmask-lr", f"{s['lr']:g}", "--batch-size", str(s["batch_size"]),
           "--max-seq-length", str(s["max_seq_length"]), "--seed", str(s["seed"]),
           *(["--sparsity", s["sparsity"]] if s.get("sparsity") else []),  # basis alone: none (it means double pruning)
           *(["--budget", str(s["budget"])] if s.get("budget") is not None else []),  # the methods table's swr
           "-o", str(ckpt), "--json", "--force", "--resume"]
    if with_method_flag:
        cmd += ["--method", s["dp_method"]]
    if s["max_train_samples"]:
        cmd += ["--max-train-samples", str(s["max_train_samples"])]
    if s["max_eval_samples"]:
        cmd += ["--max-eval-samples", str(s["max_eval_samples"])]
    return cmd


def score_diff(s: dict, ckpt: Path, summary: dict, run_dir: Path, data_dir: str,
               fit: Callable[[dict, object, int], tuple[object, dict]]) -> dict:
    """Pack the checkpoint to a fp16 .diff (refitted to a byte target by `fit`, where the table has one) and score
    base + that file; the L0 density path from its history."""
    from diffcli import artifact, checkpoint, metrics, report, tasks

    diff = checkpoint.load(ckpt)
    packed = run_dir / f"{s['task']}.diff"
    artifact.write(diff, packed, values="fp16", force=True)
    diff, fitted = fit(s, diff, packed.stat().st_size)
    if fitted:
        artifact.write(diff, packed, values="fp16", force=True)
    with _score_lock:
        dev = score_artifact(packed, s, data_dir)
    spec = tasks.task_spec(s["task"])
    path = [{"epoch": h["epoch"], "expected_density": h.get("expected_density"),
             "deterministic_density": h.get("deterministic_density"), "lambda": h.get("lambda")}
            for h in (diff.meta.get("history") or []) if h.get("phase") == "l0"]
    best = summary.get("after_fixmask") or {}
    params = report.summarize(report.rows_from_diff(diff), {})["totals"]["params"]
    return {"score": 100 * metrics.main_score(spec, dev[spec.eval_splits[0]]), "metrics": dev,
            "best_epoch": best.get("epoch"), "bytes": packed.stat().st_size, "nnz": diff.nnz, "params": params,
            "diff_path": str(packed), **fitted,
            "density": diff.density, "l0_density_path": path,
            "train_summary": {k: summary.get(k) for k in ("after_l0", "after_projection", "after_fixmask",
                                                          "epochs", "seconds")}}
