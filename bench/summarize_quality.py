"""Summarize several seeds of `bench_quality.py` reports: per configuration and task, the mean and the worst gap to
full finetuning, and how many seeds pass each target.

    python bench/summarize_quality.py bench/results/gpu/quality-gpu-*.json --out bench/results/quality-gpu.md

Reports are grouped by their label without the trailing `-sSEED` (e.g. gpu-new3-s42, gpu-new3-s43 → gpu-new3).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

TARGETS = (("avg_within_1pt", "average within 1 pt"), ("no_task_below_2pt", "no task > 2 pts below"),
           ("ahead_of_lora_at_le_bytes", "ahead of LoRA at ≤ bytes"))


def _label(doc: dict, path: Path) -> tuple[str, int]:
    m = re.search(r"--label (\S+)", doc.get("invocation", ""))
    label = m.group(1) if m else path.stem.removeprefix("quality-")
    seed = re.search(r"--seed (\d+)", doc.get("invocation", ""))
    return re.sub(r"-s\d+$", "", label), int(seed.group(1)) if seed else 42


METHODS = ("full", "lora", "diffprune", "diffprune-matched")


def _means(results: dict, tasks: list[str]) -> dict[str, float | None]:
    """Each method's mean score over `tasks` in one report; None where any of those tasks lacks the method."""
    out = {}
    for m in METHODS:
        scores = [results[t][m]["score"] if results[t].get(m) else None for t in tasks]
        out[m] = statistics.mean(scores) if scores and None not in scores else None
    return out


def _row(name: str, per_seed: list[dict[str, float | None]]) -> tuple[str, list[float]]:
    """A table row over seeds (each method's mean; diffprune − full: mean, worst, each seed) and the gaps."""
    gaps = [s["diffprune"] - s["full"] for s in per_seed if s["diffprune"] is not None and s["full"] is not None]
    if not gaps:
        return f"| {name} | — | — | — | — | — | — | — |", gaps
    cols = [[s[m] for s in per_seed if s[m] is not None] for m in METHODS]
    means = " | ".join(f"{statistics.mean(c):.2f}" if c else "—" for c in cols)
    return (f"| {name} | {means} | {statistics.mean(gaps):+.2f} | {min(gaps):+.2f} | "
            f"{', '.join(f'{g:+.2f}' for g in gaps)} |"), gaps


def summarize(paths: list[Path]) -> str:
    groups: dict[str, list[tuple[int, dict, Path]]] = defaultdict(list)
    for p in paths:
        doc = json.loads(p.read_text())
        label, seed = _label(doc, p)
        groups[label].append((seed, doc, p))
    lines = [f"Summarized {_dt.date.today().isoformat()} from {len(paths)} reports.", ""]
    for label in sorted(groups):
        runs = sorted(groups[label], key=lambda t: t[0])
        lines += [f"## {label} (seeds {', '.join(str(s) for s, _, _ in runs)})", "",
                  f"One of them: `{runs[0][1]['invocation']}`", "",
                  "| task | full FT | LoRA | diffprune 0.5% | diffprune @ LoRA bytes | Δ vs full: mean | worst | "
                  "per seed |", "|---|---|---|---|---|---|---|---|"]
        tasks = sorted({t for _, d, _ in runs for t in d["results"]})
        for task in tasks:
            lines.append(_row(task, [_means(d["results"], [task]) for _, d, _ in runs])[0])
        row, avg_gaps = _row("**average**", [_means(d["results"], tasks) for _, d, _ in runs])
        lines += [row, ""]
        for key, text in TARGETS:
            ok = sum(1 for _, d, _ in runs if d["verdicts"].get(key))
            lines.append(f"- {text}: {ok} of {len(runs)} seeds")
        if avg_gaps:
            lines.append(f"- average gap over seeds: {statistics.mean(avg_gaps):+.2f}")
        lines += ["- reports: " + ", ".join(f"`{p.name}`" for _, _, p in runs), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, help="write the markdown here (default: print it)")
    ap.add_argument("--title", default="# Quality over seeds")
    ap.add_argument("--preamble", type=Path, help="a markdown file printed between the title and the tables")
    args = ap.parse_args()
    text = args.title + "\n\n" + (args.preamble.read_text().strip() + "\n\n" if args.preamble else "")
    text += summarize(args.reports)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
