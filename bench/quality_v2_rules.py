"""The quality-v2 rules: lr tuning on the first seed, mean ± std over seeds, the targets checked per seed.

Pure functions on plain dicts (no torch), so the rules are unit-tested without training anything.
"""

from __future__ import annotations

import math
import statistics

# Targets of issue 11 (equal compute, mean over seeds).
AVG_GAP_MAX = 0.5      # diffprune 0.5% within 0.5 point of full finetuning on the task average
TASK_GAP_MAX = 1.5     # and no task more than 1.5 points below
L0_OVER_RANDOM = 1.0   # the L0 mask at least 1 point ahead of the random mask on average
MAIN = "dp-l0"
TARGETS = (
    ("avg_within_0.5_of_full", f"dp-l0 within {AVG_GAP_MAX} pt of full finetuning on the average"),
    ("no_task_below_1.5", f"no task more than {TASK_GAP_MAX} pts below full finetuning"),
    ("ahead_of_better_lora", "ahead of the better LoRA on the average and on ≥ 3/4 of tasks"),
    ("ahead_of_bitfit", "ahead of BitFit on the average and on ≥ 3/4 of tasks"),
    ("l0_1pt_over_random", f"L0 mask ≥ {L0_OVER_RANDOM} pt ahead of the random mask on the average"),
)


def choose_lr(grid, scores: dict) -> float | None:
    """The lr with the best first-seed dev score, once every lr of `grid` is done; None while any is missing.

    `scores` maps lr → score, or → None for a run that failed (done, but never chosen). Ties go to the lr listed
    first, so the choice does not depend on dict order. None too when every lr failed.
    """
    if any(lr not in scores for lr in grid):
        return None
    best, best_score = None, -math.inf
    for lr in grid:
        s = scores[lr]
        if s is not None and s > best_score:
            best, best_score = lr, s
    return best


def mean_std(values) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None below two values) and count of the non-missing values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _ahead(scores: dict, tasks: list[str], other: str) -> bool:
    """dp-l0 ahead of `other` on the task average and on at least three quarters of the tasks."""
    wins = sum(1 for t in tasks if scores[t][MAIN] > scores[t][other])
    avg = statistics.mean(scores[t][MAIN] for t in tasks) - statistics.mean(scores[t][other] for t in tasks)
    return avg > 0 and wins >= math.ceil(0.75 * len(tasks))


def verdicts(scores: dict, tasks: list[str]) -> dict:
    """Each target's verdict for one seed (or for the means): True/False, None where a needed cell is missing.

    `scores[task][method]` is a score or None. The better LoRA is the one with the higher task average.
    """
    def have(*methods) -> bool:
        return bool(tasks) and all(scores.get(t, {}).get(m) is not None for t in tasks for m in methods)

    def avg(m: str) -> float:
        return statistics.mean(scores[t][m] for t in tasks)

    out: dict = {key: None for key, _ in TARGETS}
    if have(MAIN, "full"):
        gaps = [scores[t][MAIN] - scores[t]["full"] for t in tasks]
        out["avg_within_0.5_of_full"] = statistics.mean(gaps) >= -AVG_GAP_MAX
        out["no_task_below_1.5"] = min(gaps) >= -TASK_GAP_MAX
    if have(MAIN, "lora-qv", "lora-all"):
        better = "lora-qv" if avg("lora-qv") >= avg("lora-all") else "lora-all"
        out["ahead_of_better_lora"] = _ahead(scores, tasks, better)
    if have(MAIN, "bitfit"):
        out["ahead_of_bitfit"] = _ahead(scores, tasks, "bitfit")
    if have(MAIN, "dp-random"):
        out["l0_1pt_over_random"] = avg(MAIN) - avg("dp-random") >= L0_OVER_RANDOM
    return out


def pass_counts(per_seed: dict) -> dict:
    """For each target: seeds that pass, and seeds whose cells are all there ({key: (passed, complete)})."""
    out = {}
    for key, _ in TARGETS:
        done = [v[key] for v in per_seed.values() if v[key] is not None]
        out[key] = (sum(1 for x in done if x), len(done))
    return out


def cheaper_masks(means: dict, tasks: list[str]) -> dict:
    """Each ablation mask's task-average gap to the L0 mask (means over seeds); None where a cell is missing."""
    out = {}
    for m in ("dp-random", "dp-magnitude", "dp-fisher"):
        if tasks and all(means.get(t, {}).get(x) is not None for t in tasks for x in (m, MAIN)):
            out[m] = statistics.mean(means[t][m] - means[t][MAIN] for t in tasks)
        else:
            out[m] = None
    return out


# ---------------------------------------------------------------------------------------------- formatting
def fmt_score(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f} ({n})" if std is not None else f"{mean:.2f} ({n})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def fmt_verdict(v: bool | None) -> str:
    return "—" if v is None else ("PASS" if v else "FAIL")
