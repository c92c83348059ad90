"""Size at equal score on real trained diffs: every value format and lower densities, scored like `diffprune eval`.

Run (one process, one thread; tasks may be given one at a time as their checkpoints finish, results merge):
  OMP_NUM_THREADS=1 python bench/bench_size_score.py --data-dir GLUE_DIR rte=CKPT [mrpc=CKPT ...] \
      [--out bench/results/size_score.json]

For each task: the trained diff (a checkpoint folder) packed as today's file (format v1, fp16: the reference),
and as format v2 with every value format; then re-projected (magnitude top-k of the trained δ, no retraining)
to lower densities with the lean formats. Each file is decoded from its bytes and scored on the full dev set
through `DiffBank` + `evaluation.evaluate`, the code behind `diffprune eval`. Reported per task: the smallest
file within 0.5 point of the reference (target: at most half its bytes), and the best score at LoRA's bytes (a
fixed budget: the fp32 LoRA q,v adapter of bench/results/quality.json) against today's best there: the best v1 fp16 file that fits, among the
densities v2 gets (the trained δ re-projected to fit those bytes, and the same lower densities).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FORMATS = ("fp32", "fp16", "bf16", "int8", "int4", "ternary")
LEAN = ("int8", "int4", "ternary")
DENSITIES = (0.0025, 0.001)
# A fixed byte budget: LoRA q,v r=8 saved as the fp32 adapter of the first quality benchmark (bench/results/
# quality.json). Quality v2 stores that adapter in fp16, about half these bytes.
LORA_BYTES = {"rte": 301520, "mrpc": 301520, "stsb": 299980, "cola": 301520}
TOLERANCE = 0.5  # points of the GLUE score


def fit_density(diff, target_bytes: int, values: str, version: int, steps: int = 12):
    """The diff re-projected to the largest density whose packed size is at most target_bytes (bisection)."""
    from diffcli import artifact, projection

    lo, hi = 0.0, diff.density
    best = projection.project(diff, 0.0).diff
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = projection.project(diff, mid).diff
        if len(artifact.pack(cand, values, version=version)) <= target_bytes:
            lo, best = mid, cand
        else:
            hi = mid
    return best, lo


class Scorer:
    """Packs a diff, decodes the file and scores it on a task's full dev set (`DiffBank` + `evaluation.evaluate`,
    the code behind `diffprune eval`); `rows` collects one row per file."""

    def __init__(self, task: str, base: str, data_dir: str, max_eval_samples: int | None = None):
        import torch
        from transformers import AutoTokenizer

        from diffcli.bank import DiffBank
        from diffcli.data_sources import load_task

        torch.set_num_threads(1)
        self.task = task
        self.data = load_task(task, data_dir=data_dir, need_train=False, max_eval_samples=max_eval_samples)
        self.spec = self.data.spec
        self.bank = DiffBank(base, device="cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.bank.folder)
        self.rows: list[dict] = []

    def score(self, label: str, diff, values: str, version: int, density: float) -> dict:
        from diffcli import artifact, metrics
        from diffcli.evaluation import evaluate

        blob = artifact.pack(diff, values, version=version)
        back = artifact.loads(blob)
        header = artifact.loads_header(blob)
        _rows, described = artifact.describe(header)
        split = {"header": len(blob) - sum(described["bytes"].values()), **described["bytes"]}
        self.bank.add(label, back)
        t0 = time.perf_counter()
        with self.bank.use(label) as model:
            dev = evaluate(model, self.tokenizer, self.data, max_seq_length=128, batch_size=64)
        s = 100 * metrics.main_score(self.spec, dev[self.spec.eval_splits[0]])
        row = {"label": label, "version": version, "values": values, "density": density, "nnz": back.nnz,
               "bytes": len(blob), "split": split, "max_abs_error": described["values"]["max_abs_error"],
               "max_rel_error": described["values"]["max_rel_error"], "score": s,
               "eval_s": time.perf_counter() - t0}
        self.rows.append(row)
        print(f"{self.task:5s} {label:28s} {len(blob):>9,} B  score {s:6.2f}", flush=True)
        return row


def run_task(task: str, ckpt: Path, base: str, data_dir: str, lora_bytes: int,
             max_eval_samples: int | None = None, denser: Path | None = None) -> dict:
    from diffcli import projection
    from diffcli.sources import load_diff

    trained = load_diff(ckpt)
    scorer = Scorer(task, base, data_dir, max_eval_samples)
    spec, rows, score = scorer.spec, scorer.rows, scorer.score

    density = trained.density
    score("v1 fp16 (today)", trained, "fp16", 1, density)
    for v in FORMATS:
        score(f"v2 {v}", trained, v, 2, density)
    for d in DENSITIES:
        lower = projection.project(trained, d).diff
        for v in LEAN:
            score(f"v2 {v} @ {d:.2%}", lower, v, 2, d)
        score(f"v1 fp16 @ {d:.2%}", lower, "fp16", 1, d)  # today's format gets the same lower densities
    fitted, fit_d = fit_density(trained, lora_bytes, "fp16", 1)
    score(f"v1 fp16 @ LoRA bytes ({fit_d:.3%})", fitted, "fp16", 1, fit_d)
    today_lora = best_fitting(rows, 1, lora_bytes)  # today's best file at LoRA's bytes, chosen as v2's is
    judged = list(rows)  # the verdicts: both formats from the same diffs (the denser diff's rows are v2 only)
    if denser is not None:  # a diff trained at a higher density: leaner values fill LoRA's bytes with more entries
        dense_diff = load_diff(denser)
        for v in LEAN:
            fitted, fit_d = fit_density(dense_diff, lora_bytes, v, 2)
            score(f"v2 {v} @ LoRA bytes of the {dense_diff.density:.1%} diff ({fit_d:.3%})", fitted, v, 2, fit_d)

    ref = rows[0]
    smallest = smallest_close(judged, ref)
    best_lora = best_fitting(judged, 2, lora_bytes)
    return {"task": task, "checkpoint": str(ckpt), "denser_checkpoint": denser and str(denser),
            "training": training_of(trained),
            "denser_training": denser and f"{dense_diff.density:.1%}, " + training_of(dense_diff), "metric": spec.metrics, "trained_density": density,
            "lora_bytes": lora_bytes, "rows": rows, "reference": ref["label"],
            "smallest_within_tolerance": smallest and smallest["label"],
            "smallest_over_reference_bytes": smallest and smallest["bytes"] / ref["bytes"],
            "half_bytes_target_met": bool(smallest and smallest["bytes"] <= ref["bytes"] / 2),
            "today_at_lora_bytes": today_lora["score"], "today_at_lora_bytes_label": today_lora["label"],
            "best_at_lora_bytes": best_lora and best_lora["score"],
            "best_at_lora_bytes_label": best_lora and best_lora["label"],
            "lora_bytes_target_met": bool(best_lora and best_lora["score"] > today_lora["score"])}


def smallest_close(rows: list[dict], ref: dict) -> dict | None:
    """The smallest v2 file within TOLERANCE points of the reference's score (None when none is)."""
    close = [r for r in rows if r["version"] == 2 and r["score"] >= ref["score"] - TOLERANCE]
    return min(close, key=lambda r: r["bytes"]) if close else None


def best_fitting(rows: list[dict], version: int, max_bytes: int) -> dict | None:
    """The best-scoring file of one format version within `max_bytes` (of equal scores, the larger file)."""
    fits = [r for r in rows if r["version"] == version and r["bytes"] <= max_bytes]
    return max(fits, key=lambda r: (r["score"], r["bytes"])) if fits else None


def training_of(diff) -> str:
    """How the checkpoint was trained, from its meta: train examples, method and epochs, seed."""
    meta = diff.meta or {}
    data, hp = meta.get("data") or {}, meta.get("hyperparameters") or {}
    n = data.get("train_examples")
    cap = data.get("max_train_samples")
    rows = f"{n:,} train examples" + (f" (capped at {cap:,})" if cap else " (the full train set)") if n else "?"
    method = hp.get("method", "l0")
    first = f" --epochs {hp.get('epochs')}" if method not in ("fisher", "random") else ""  # they have no first phase
    return f"{rows}, --method {method}{first} --fixmask-epochs {hp.get('fixmask_epochs')} --seed {hp.get('seed')}"


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# Size at equal score: format v2 value formats on trained MiniLM diffs (GLUE dev)", "",
             f"Date: {result['date']}. Machine: CPU only (2 cores shared with other jobs), one torch thread.", "",
             "## Command", "", "```", *result["commands"], "```", "",
             "Checkpoints at 0.5%; how each was trained (train examples, epochs, seed) is under its task. "
             "Every file is decoded from its bytes and scored on the full dev set with `DiffBank` + "
             "`evaluation.evaluate` (the code behind `diffprune eval`). Lower densities: the trained δ "
             "re-projected by magnitude, no retraining; today's format (v1 fp16) gets the same lower densities, and at "
             "LoRA's bytes each format's best file that fits is compared (a denser diff's rows, v2 only, are shown "
             "but judge nothing). LoRA's bytes: a fixed budget, LoRA q,v r=8 as the fp32 adapter of the first "
             "quality benchmark (bench/results/quality.json); quality v2 stores it in fp16, about half. "
             "Score: GLUE metric x100.", ""]
    for task, t in result["tasks"].items():
        ref = next(r for r in t["rows"] if r["label"] == t["reference"])
        lines += [f"## {task} (LoRA's bytes: {t['lora_bytes']:,} B, the fp32 adapter)", "",
                  f"Trained on {t.get('training') or 'capped GLUE (before this field was recorded)'}.", "",
                  *([f"The denser diff (rows \"of the ... diff\"): {t['denser_training']}.", ""]
                    if t.get("denser_training") else []),
                  "| file | density | bytes | / today | header | positions | values | dense | max rel err | score | Δ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            s = r["split"]
            rel = "—" if r["max_rel_error"] is None else f"{r['max_rel_error']:.3g}"
            lines.append(f"| {r['label']} | {r['density']:.3%} | {r['bytes']:,} | {r['bytes'] / ref['bytes']:.3f} | "
                         f"{s['header']:,} | {s['positions']:,} | {s['values']:,} | {s['dense']:,} | {rel} | "
                         f"{r['score']:.2f} | {r['score'] - ref['score']:+.2f} |")
        lines += ["", f"- smallest file within {TOLERANCE} point of today's: **{t['smallest_within_tolerance']}**, "
                      f"{t['smallest_over_reference_bytes']:.3f}x today's bytes "
                      f"(target ≤ 0.5: {'met' if t['half_bytes_target_met'] else 'MISSED'})"
                  if t["smallest_within_tolerance"] else f"- no file within {TOLERANCE} point of today's",
                  f"- at LoRA's bytes: best {t['best_at_lora_bytes_label']} {t['best_at_lora_bytes']:.2f} vs today's "
                  f"best {t.get('today_at_lora_bytes_label', 'v1 fp16 @ LoRA bytes')} {t['today_at_lora_bytes']:.2f} "
                  f"(target: higher: "
                  f"{'met' if t['lora_bytes_target_met'] else 'MISSED'})" if t["best_at_lora_bytes"] is not None
                  else "- nothing fits LoRA's bytes", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="TASK=CHECKPOINT_FOLDER, e.g. rte=runs/rte/ckpt")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--max-eval-samples", type=int, help="score only N dev examples (a smoke test, not a result)")
    ap.add_argument("--denser", action="append", default=[], metavar="TASK=CHECKPOINT_FOLDER",
                    help="a diff of TASK trained at a higher density: re-projected to LoRA's bytes in each lean format")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "size_score.json")
    args = ap.parse_args()
    if args.max_eval_samples and args.out == ap.get_default("out"):
        raise SystemExit("error: --max-eval-samples is a smoke run; pass --out elsewhere, not over the committed "
                         "results")
    result = json.loads(args.out.read_text()) if args.out.exists() else {"tasks": {}, "commands": []}
    denser = {t: Path(c) for t, _, c in (d.partition("=") for d in args.denser)}
    command = "OMP_NUM_THREADS=1 python bench/bench_size_score.py --data-dir GLUE_DIR " + " ".join(
        ([f"--base {args.base}"] if args.base != "minilm" else [])
        + ([f"--max-eval-samples {args.max_eval_samples}"] if args.max_eval_samples else [])
        + [f"--denser {t}=CKPT" for t in denser] + [f"{c.split('=', 1)[0]}=CKPT" for c in args.checkpoints])
    for item in args.checkpoints:
        task, _, ckpt = item.partition("=")
        result["tasks"][task] = run_task(task, Path(ckpt), args.base, args.data_dir, LORA_BYTES[task],
                                      args.max_eval_samples, denser.get(task))
        result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if command not in result["commands"]:
            result["commands"].append(command)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        write_markdown(result, args.out.with_suffix(".md"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
