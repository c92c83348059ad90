"""A mask ablation over seeds from `diffprune train --json`, `diffprune eval --json` and the packed files.

    python bench/mask_ablation_table.py --task rte --out bench/results/mask-ablation-rte-seeds.md \
        l0:42=RUNS/rte fisher:42=RUNS/rte-fisher random:42=RUNS/rte-random l0:43=... ...

Each MASK:SEED=PREFIX names one run: PREFIX.json (train's summary), PREFIX.eval.json (eval of the packed file) and
PREFIX.diff (the packed file). Per run: passes, dev score at the mask's start, best epoch, the training's best dev
score and the packed file's; per mask: mean ± std over its seeds, and the gap of every mask to the first one.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_run(mask: str, seed: int, prefix: Path, metric: str) -> dict:
    """One run's figures from its three files."""
    tr = json.loads(Path(f"{prefix}.json").read_text())
    ev = json.loads(Path(f"{prefix}.eval.json").read_text())
    ep = tr["epochs"]  # the fixed phase and the method's own first phase, under its name (l0, dense, gated, basis)
    first = {phase: n for phase, n in ep.items() if phase != "fixmask" and n}
    passes = sum(first.values()) + ep["fixmask"]
    return {"mask": mask, "seed": seed, "passes": passes,
            "phases": " + ".join([f"{n} {'L0' if phase == 'l0' else phase}" for phase, n in first.items()]
                                 + [f"{ep['fixmask']} fixed"]),
            "start": 100 * tr["after_projection"]["metrics"]["validation"][metric],
            "best_epoch": tr["after_fixmask"]["epoch"], "trained": 100 * tr["after_fixmask"]["score"],
            "packed": 100 * ev["metrics"]["validation"][metric], "bytes": Path(f"{prefix}.diff").stat().st_size,
            "seconds": tr.get("seconds")}


def summarize(runs: list[dict]) -> dict:
    """Mean ± std of the packed file's score per mask, and each mask's mean gap to the first mask given."""
    masks = list(dict.fromkeys(r["mask"] for r in runs))
    seeds = {m: sorted(r["seed"] for r in runs if r["mask"] == m) for m in masks}
    if len({tuple(s) for s in seeds.values()}) != 1:
        raise SystemExit(f"error: every mask needs the same seeds, got {seeds}")
    if len({r["passes"] for r in runs}) != 1:
        raise SystemExit("error: every run needs the same passes over the data, got "
                         + ", ".join(sorted({str(r['passes']) for r in runs})))
    out = {}
    for m in masks:
        xs = [r["packed"] for r in runs if r["mask"] == m]
        out[m] = {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
                  "bytes_mean": statistics.mean(r["bytes"] for r in runs if r["mask"] == m)}
    for m in masks:
        out[m]["gap_to_" + masks[0]] = out[m]["mean"] - out[masks[0]]["mean"]
    return out


def render(task: str, runs: list[dict], summary: dict, header: str, command: str) -> str:
    first = next(iter(summary))
    L = [f"# Mask ablation on {task}: {', '.join(summary)} at equal passes over {len(runs) // len(summary)} seeds", "",
         header, "", "```", command, "```", "",
         "| mask | seed | passes | dev at the mask's start | best epoch | dev (training) | dev of the packed file | bytes |",
         "|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (list(summary).index(r["mask"]), r["seed"])):
        L.append(f"| {r['mask']} | {r['seed']} | {r['phases']} | {r['start']:.2f} | {r['best_epoch']} | "
                 f"{r['trained']:.2f} | {r['packed']:.2f} | {r['bytes']:,} |")
    L += ["", f"| mask | seeds | dev of the packed file, mean ± std | vs {first} | mean bytes |", "|---|---|---|---|---|"]
    for m, s in summary.items():
        L.append(f"| {m} | {s['n']} | {s['mean']:.2f} ± {s['std']:.2f} | {s['gap_to_' + first]:+.2f} | "
                 f"{s['bytes_mean']:,.0f} |")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="MASK:SEED=PREFIX (PREFIX.json, PREFIX.eval.json, PREFIX.diff)")
    ap.add_argument("--task", required=True)
    ap.add_argument("--metric", default="accuracy", help="the dev metric eval reports for the task")
    ap.add_argument("--header", type=Path, help="a markdown file with the table's header text (what is compared)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    runs = []
    for item in args.runs:
        spec, _, prefix = item.partition("=")
        mask, _, seed = spec.partition(":")
        if not prefix or not seed.isdigit():
            raise SystemExit(f"error: {item!r} is not MASK:SEED=PREFIX")
        runs.append(load_run(mask, int(seed), Path(prefix), args.metric))
    summary = summarize(runs)
    header = args.header.read_text().strip() if args.header else ""
    command = " ".join(["python bench/mask_ablation_table.py --task", args.task,
                        *(["--header", args.header.as_posix()] if args.header else []), "--out", args.out.as_posix(),
                        *(f"{r['mask']}:{r['seed']}=RUN" for r in runs)])
    args.out.write_text(render(args.task, runs, summary, header, command))
    args.out.with_suffix(".json").write_text(json.dumps({"runs": runs, "summary": summary, "command": command},
                                                        indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
