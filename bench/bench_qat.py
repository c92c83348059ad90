"""Quantization-aware fixed phase (`train --values Q`) against quantizing after training, on real GLUE data.

Two checkpoints of one `diffprune train` command, identical but for `--values Q` on one of them (same mask
method, seed, data, epochs). Each is packed (format v2) and the file is decoded and scored on the full dev set
(`bench_size_score.Scorer`: `DiffBank` + `evaluation.evaluate`, the code behind `diffprune eval`): the plain
diff in fp16 and in Q (post-training quantization), the QAT diff in Q (what `pack` writes for it by default).

    OMP_NUM_THREADS=1 python bench/bench_qat.py --data-dir GLUE_DIR --task cola plain=CKPT qat=CKPT \\
        [--command "the train command"] [--out bench/results/qat.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_size_score import Scorer, training_of  # noqa: E402


def run(task: str, plain: Path, qat: Path, base: str, data_dir: str, max_eval: int | None) -> dict:
    from diffcli.packing import trained_values
    from diffcli.sources import load_diff

    a, b = load_diff(plain), load_diff(qat)
    q = trained_values(b)
    if q is None or trained_values(a) is not None:
        raise SystemExit("error: qat= must be trained with --values and plain= without it")
    scorer = Scorer(task, base, data_dir, max_eval)
    rows = [dict(scorer.score("plain, fp16", a, "fp16", 2, a.density), kind="plain"),
            dict(scorer.score(f"plain, {q} after training", a, q, 2, a.density), kind="ptq"),
            dict(scorer.score(f"QAT ({q}), {q}", b, q, 2, b.density), kind="qat")]
    return {"task": task, "values": q, "plain": str(plain), "qat": str(qat), "training": training_of(a),
            "rows": rows}


def markdown(doc: dict) -> str:
    r = doc["result"]
    ref = r["rows"][0]["score"]
    lines = [f"# Quantization-aware fixed phase vs quantizing after training ({doc['date']})", "",
             "Machine: CPU only (2 cores shared with other jobs), one torch thread.", "", "## Commands", "", "```",
             *doc["commands"], "```", "",
             f"Both checkpoints: {r['training']}; the QAT one adds `--values {r['values']}`. Every file is decoded "
             "from its bytes and scored on the full dev set (the code behind `diffprune eval`). Score: GLUE metric "
             "x100.", "", f"## {r['task']}", "", "| file | bytes | score | Δ vs plain fp16 |", "|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | {row['bytes']:,} | {row['score']:.2f} | {row['score'] - ref:+.2f} |")
    ptq, qat = r["rows"][1]["score"], r["rows"][2]["score"]
    lines += ["", f"QAT minus quantizing after training: {qat - ptq:+.2f} points at {r['values']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs=2, help="plain=CKPT qat=CKPT")
    ap.add_argument("--task", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--base", default="minilm")
    ap.add_argument("--command", default="", help="the train command of the checkpoints, recorded in the results")
    ap.add_argument("--max-eval-samples", type=int, help="score only N dev examples (a smoke test, not a result)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qat.json")
    args = ap.parse_args()
    if args.max_eval_samples and args.out == ap.get_default("out"):
        raise SystemExit("error: --max-eval-samples is a smoke run; pass --out elsewhere, not over the committed "
                         "results")
    ckpts = dict(c.split("=", 1) for c in args.checkpoints)
    result = run(args.task, Path(ckpts["plain"]), Path(ckpts["qat"]), args.base, args.data_dir,
                 args.max_eval_samples)
    commands = [c for c in (args.command,) if c] + [
        "OMP_NUM_THREADS=1 python bench/bench_qat.py --data-dir GLUE_DIR "
        + (f"--base {args.base} " if args.base != "minilm" else "")
        + (f"--max-eval-samples {args.max_eval_samples} " if args.max_eval_samples else "")
        + f"--task {args.task} plain=CKPT qat=CKPT"]
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commands": commands, "result": result}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
