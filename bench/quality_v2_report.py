"""The quality-v2 results file: each cell's result or why it is missing, aggregates, verdicts, markdown and JSON."""

from __future__ import annotations

import re

import code_record
import quality_v2_rules as rules
import run_times
from run_machines import (CPU_LOAD, DEVICE_NOTE, machine_legend, machine_letters, machine_text, task_devices,
                          times_text, versions_text)
from quality_v2 import LABELS, REPO, Run, Suite

def cell(suite: Suite, task: str, method: str, seed: int) -> tuple[dict | None, str]:
    """A seed's result at the method's chosen lr, or why there is none."""
    if not suite.available(method):
        return None, "not run (method unavailable)"
    lr = suite.chosen_lr(task, method)
    if lr is None:
        scores = suite.grid_scores(task, method)
        if scores and all(v is None for v in scores.values()) and len(scores) == len(suite.p.grid(method)):
            return None, "failed (every lr)"
        why = suite.waiting(task, method)
        if why:
            return None, f"waiting (needs {why})"
        return None, f"lr tuning: {len(scores)}/{len(suite.p.grid(method))} done"
    run = Run(task, method, lr, seed)
    hit = suite.cached(run)
    if hit is not None:
        return hit, "ok"
    return None, "failed" if suite.failed(run) is not None else "not run yet"


def assemble(suite: Suite) -> dict:
    """Every cell, aggregate, tuning record and verdict of the cached runs, as one JSON-able document."""
    p = suite.p
    cells, table = {}, {}
    per_seed_scores, per_seed_sizes = {s: {} for s in p.seeds}, {s: {} for s in p.seeds}
    progress = {"finished": 0, "failed": 0, "planned": 0}
    times = suite.finished_times()
    other = [(t, m, sec, 2) for t, m, sec, near in times if near == 0]  # the other kind of machine's runs only
    by_task = {}
    for task in p.tasks:
        cells[task], table[task] = {}, {}
        by_task[task] = {"runs_left": 0, "seconds": [0.0, 0.0], "seconds_other_kind": [0.0, 0.0]}
        for m in p.methods:
            got = {seed: cell(suite, task, m, seed) for seed in p.seeds}
            cells[task][m] = {str(seed): {"status": st, "result": _brief(r)} for seed, (r, st) in got.items()}
            runs = [r for r, _ in got.values() if r is not None]
            whole = [r for r in runs if not r.get("resumed")]  # a resumed run timed and measured its last part only
            mean, std, n = rules.mean_std([r["score"] for r in runs])
            table[task][m] = {"mean": mean, "std": std, "n": n, "lr": suite.chosen_lr(task, m),
                              "grid": {f"{lr:g}": s for lr, s in suite.grid_scores(task, m).items()},
                              "bytes": _avg([r.get("bytes") for r in runs]),
                              "entries": _avg([_entries(r) for r in runs]),
                              "density": _avg([r.get("density") for r in runs]),
                              "train_seconds": _avg([r.get("train_seconds") for r in whole]),
                              "peak_rss_bytes": _max([r.get("peak_rss_bytes") for r in whole]),
                              "cuda_peak_allocated": _max([r.get("cuda_peak_allocated") for r in whole]),
                              "machines": sorted({machine_text(r.get("machine")) for r in whole}, key=str),
                              "train_seconds_by_machine": _by_machine(whole, "train_seconds"),
                              "resumed_runs": len(runs) - len(whole),
                              "status": sorted({st for _, st in got.values() if st != "ok"}),
                              "grid_cost": grid_cost(suite, task, m)}
            for seed, (r, _) in got.items():
                per_seed_scores[seed].setdefault(task, {})[m] = r["score"] if r else None
                per_seed_sizes[seed].setdefault(task, {})[m] = r.get("bytes") if r else None
            if suite.available(m):  # the first seed's grid, then one run per other seed
                grid = table[task][m]["grid"].values()
                later = [got[seed][1] for seed in p.seeds[1:]]
                progress["planned"] += len(p.grid(m)) + len(p.seeds) - 1
                progress["finished"] += sum(v is not None for v in grid) + later.count("ok")
                progress["failed"] += sum(v is None for v in grid) + later.count("failed")
                left = len(p.grid(m)) + len(p.seeds) - 1 - len(grid) - later.count("ok") - later.count("failed")
                if left:  # (low, high) seconds of one lane for the runs left, by the finished runs' times
                    mine = by_task[task]
                    mine["runs_left"] += left
                    for key, done in (("seconds", times), ("seconds_other_kind", other)):
                        est = suite.expected_range(Run(task, m, 0.0, 0), done) if mine[key] is not None else None
                        mine[key] = None if est is None else [mine[key][0] + left * est[0],
                                                              mine[key][1] + left * est[1]]
    spans = [v["seconds"] for v in by_task.values()]
    total = None if None in spans else [sum(lo for lo, _ in spans), sum(hi for _, hi in spans)]
    progress["hours_left"] = None if total is None else round(total[1] / 3600, 1)
    progress["hours_left_low"] = None if total is None else round(total[0] / 3600, 1)
    progress["by_task"] = {t: {"runs_left": v["runs_left"],
                               "hours": _hours(v["seconds"]) if v["runs_left"] else None,
                               "hours_other_kind": _hours(v["seconds_other_kind"]) if v["runs_left"] else None}
                           for t, v in by_task.items()}
    here = run_times.this_machine()
    progress["other_kind"] = "CPU" if here and here[2] else "GPU"
    progress["stale"] = suite.stale_entries()
    progress["attested"] = suite.attested_entries()
    progress["unmatched"] = suite.unmatched_entries()
    progress["retired"] = suite.retired_entries()
    if progress["retired"]:
        progress["retired_to"] = suite.retired_dir().name
    # The targets, averages and the default are judged on means over every seed (issue 11): a cell short of a seed
    # counts as missing there, so no verdict or default comes from one seed, or from seeds that differ by method.
    means = {t: {m: complete_mean(table[t][m], len(p.seeds)) for m in p.methods} for t in p.tasks}
    sizes = {t: {m: table[t][m]["bytes"] if means[t][m] is not None else None for m in p.methods} for t in p.tasks}
    budgets = matched_budgets(suite, cells)
    per_seed = {seed: rules.verdicts(sc, p.tasks, sizes=per_seed_sizes[seed], budgets=budgets)
                for seed, sc in per_seed_scores.items()}
    return {"progress": progress, "table": table, "cells": cells, "per_seed_verdicts": {str(k): v for k, v in per_seed.items()},
            "pass_counts": rules.pass_counts(per_seed),
            "verdicts_on_means": rules.verdicts(means, p.tasks, sizes=sizes, budgets=budgets),
            "verdicts_on_score_alone": rules.verdicts(means, p.tasks), "budgets": budgets,
            "bytes_ratios": rules.bytes_ratios(means, sizes, p.tasks, budgets=budgets),
            "cheaper_masks_vs_l0": rules.cheaper_masks(means, p.tasks),
            "default_mask": rules.default_mask(means, p.tasks, sizes, budgets), "run_versions": run_versions(suite),
            "interim": interim(means, p.tasks, [m for m in p.methods if suite.available(m)])}


def interim(means: dict, tasks: list[str], methods: list[str]) -> dict | None:
    """Averages over the tasks whose every cell (of the methods the trainer has) has all its seeds, while other
    tasks are short: shown, never judged."""
    done = [t for t in tasks if all(means[t][m] is not None for m in methods)]
    if not done or len(done) == len(tasks):
        return None
    return {"tasks": done, "averages": {m: sum(means[t][m] for t in done) / len(done) for m in methods},
            "cheaper_masks_vs_l0": rules.cheaper_masks(means, done)}


def matched_budgets(suite: Suite, cells: dict) -> dict:
    """{task: {method: bytes}} of each matched baseline (rules.MATCHED) with a finished run: the largest .diff that
    buys it no higher rank than it trained at, its equal bytes."""
    out: dict = {}
    for task, by_method in cells.items():
        for m in rules.MATCHED:
            ranks = {c["result"].get("lora_rank") for c in by_method.get(m, {}).values() if c["result"]} - {None}
            if len(ranks) == 1:
                out.setdefault(task, {})[m] = suite.lora_all_budget(task, ranks.pop())
    return out


def _entries(r: dict) -> int | None:
    """Stored entries of a run: a diff's nonzero δ entries (its new head apart), a baseline's trained parameters."""
    return r.get("nnz") if r.get("nnz") is not None else r.get("trainable_params")


def grid_cost(suite: Suite, task: str, method: str) -> dict:
    """Train time, peak memory and machine of each first-seed run of the lr grid (the cost of the tuning too)."""
    out = {}
    for lr in suite.p.grid(method):
        hit = suite.cached(Run(task, method, lr, suite.p.seeds[0]))
        if hit is not None:
            out[f"{lr:g}"] = {"train_seconds": hit.get("train_seconds"), "peak_rss_bytes": hit.get("peak_rss_bytes"),
                              "cuda_peak_allocated": hit.get("cuda_peak_allocated"),
                              "machine": machine_text(hit.get("machine")), "device": hit.get("device"),
                              "finished": hit.get("finished"), "resumed": bool(hit.get("resumed"))}
    return out


def _hours(seconds: list | None) -> list | None:
    return None if seconds is None else [round(seconds[0] / 3600, 1), round(seconds[1] / 3600, 1)]


def _span(hours: list | None) -> str:
    return "?" if hours is None else (f"{hours[1]:g}" if hours[0] == hours[1] else f"{hours[0]:g}–{hours[1]:g}")


def left_by_task(progress: dict) -> str:
    """'rte 13 runs (9.1–11.9 h here; GPU 0.3–0.4 h), ...': each task's runs left and one lane's hours for them,
    here and at the pace of the other kind of machine's runs (where it has some)."""
    other, parts = progress.get("other_kind", "GPU"), []
    for task, v in (progress.get("by_task") or {}).items():
        if v["runs_left"]:
            there = f"; {other} {_span(v['hours_other_kind'])} h" if v.get("hours_other_kind") else ""
            parts.append(f"{task} {v['runs_left']} runs ({_span(v['hours'])} h here{there})")
    return ", ".join(parts)


def _hours_left(progress: dict) -> str:
    """'40–70' (a range where tasks are estimated from others), or '55'."""
    lo, hi = progress.get("hours_left_low"), progress["hours_left"]
    return f"{hi:g}" if lo is None or lo == hi else f"{lo:g}–{hi:g}"


def _brief(r: dict | None) -> dict | None:
    if r is None:
        return None
    keep = ("score", "best_epoch", "bytes", "train_seconds", "resumed", "peak_rss_bytes", "cuda_peak_allocated",
            "device", "density", "nnz", "params", "trainable_params", "versions", "trimmed", "lora_rank", "score_before_fp16", "l0_density_path", "metrics", "command",
            "settings", "finished")
    out = {k: r[k] for k in keep if k in r}
    out["machine"] = machine_text(r.get("machine"))
    out["code"] = code_record.digest_of(r.get("code"))  # the full record (file: hash) stays in the cache entry
    if "command" in out:  # paths relative to the repository (whichever checkout ran it), as a reader would type them
        out["command"] = re.sub(r"(?<!\S)/\S*?/(bench|diffcli)/", r"\1/", out["command"].replace(f"{REPO}/", ""))
    return out


INTERIM_NOTE = ("*Interim* (the row in italics above, and here): the same means averaged over the tasks whose every "
                "cell has all its seeds ({tasks}), while the others ({left}) are short of runs. It judges nothing: "
                "the targets, the averages and the default mask wait for every task. Cheaper masks vs the L0 mask "
                "on those tasks: {gaps}.")
def _by_machine(runs: list[dict], key: str) -> list:
    """[machine_text, mean of key] for each machine that ran some of `runs` (times do not average across machines)."""
    machines = sorted({machine_text(r.get("machine")) for r in runs}, key=str)
    return [[mt, _avg([r.get(key) for r in runs if machine_text(r.get("machine")) == mt])] for mt in machines]


def _avg(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _max(xs):
    xs = [x for x in xs if x is not None]
    return max(xs) if xs else None


def model_name(p) -> str:
    return "the bundled MiniLM (all-MiniLM-L6-v2)" if p.model == "minilm" else f"`{p.model}`"


def _retired(retired: dict) -> str:
    """'11 GPU runs of cola' from retired_entries()."""
    return ", ".join(f"{n} {kind} run{'s' * (n != 1)} of {task}" for task, kinds in sorted(retired.items())
                     for kind, n in sorted(kinds.items()))


def preamble(p, doc: dict, commands: list[str], title: str, what: str) -> list[str]:
    """Title (QUICK-labelled), what the table compares, progress, date and machine, and the commands."""
    env, left = doc["environment"], left_by_task(doc["progress"])
    L = [title + (" — QUICK PROTOCOL (smoke check, not a result)" if p.quick else ""), ""]
    if p.quick:
        L += [f"**Quick protocol**: train sets capped at {p.max_train_samples}, dev at {p.max_eval_samples}, "
              f"seed {p.seeds[0]} only, one lr per method, {p.epochs} epochs. It checks the pipeline; its numbers "
              "say nothing about quality.", ""]
    return L + [what, "",
                f"Progress: {doc['progress']['finished']} of {doc['progress']['planned']} runs finished, "
                f"{doc['progress']['failed']} failed (methods the trainer lacks are not counted)"
                + (f"; {doc['progress']['stale']} cached runs left out: code they imported has changed since (those the "
                   "protocol still names are trained again)" if doc["progress"].get("stale") else "")
                + (f"; {doc['progress']['attested']} cached runs count although code they imported has changed since: "
                   "only in ways a check showed compute the same runs (bench/results/code-equivalence.json)"
                   if doc["progress"].get("attested") else "")
                + (f"; {doc['progress']['unmatched']} cached runs of current code match no run as the protocol "
                   "stands (sized from a reference .diff that is gone or was retrained): they count again if it "
                   "returns" if doc["progress"].get("unmatched") else "")
                + (f"; {_retired(doc['progress']['retired'])} retired to bench/results/{doc['progress']['retired_to']}/ "
                   "(`--retire-gpu-runs`, `--retire-cpu-runs`): the row restarted on the "
                   "other kind of machine, so its methods share one" if doc["progress"].get("retired") else "")
                + (f"; the runs left need about {_hours_left(doc['progress'])} hours of one lane at the run times "
                   "measured so far (each task and method's longest run on this machine, else on any of its kind, "
                   "CPU or GPU; where a task has none, the method's runs on other tasks scaled between the tasks by "
                   "the least (low end) and 1.25x the greatest (high end) ratio of the longest runs of the methods "
                   "both tasks ran on this machine, else by the ratios of their training steps and of their padded "
                   "tokens per epoch "
                   "(bench/task_work.py); else the task's longest run)"
                   if doc["progress"].get("hours_left") else "") + ".", "",
                ] + ([f"Runs left per task, with one lane's hours at this machine's pace and at the pace of the "
                      f"{doc['progress'].get('other_kind', 'GPU')} runs alone (the kind a task's row keeps to): "
                      f"{left}.", ""] if left else []) + [
                f"Date: {doc['date']}. Machine: {env['machine']}. Python {env['python']}; "
                + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v) + f"; commit {env['commit']}.", "",
                versions_text(doc), "",
                "## Commands", "", "```"] + commands + ["```", ""]


def run_versions(suite: Suite) -> list:
    """[versions text or None, run count] over every finished run of the table (lr grids and later seeds)."""
    p, counts = suite.p, {}
    for t in p.tasks:
        for m in p.methods:
            lr = suite.chosen_lr(t, m)
            runs = [Run(t, m, x, p.seeds[0]) for x in p.grid(m)] + ([Run(t, m, lr, s) for s in p.seeds[1:]]
                                                                     if lr is not None else [])
            for run in runs:
                hit = suite.cached(run)
                if hit is not None:
                    v = hit.get("versions")
                    key = ", ".join(f"{k} {x}" for k, x in v.items() if x) if v else None
                    counts[key] = counts.get(key, 0) + 1
    return sorted(([k, n] for k, n in counts.items()), key=lambda kn: (kn[0] is not None, -kn[1]))


def tasks_line(p) -> str:
    train = f"capped at {p.max_train_samples}" if p.max_train_samples else "in full"
    dev = f"capped at {p.max_eval_samples}" if p.max_eval_samples else "in full"
    return f"- Tasks: {', '.join(p.tasks)}; train sets {train}, dev sets {dev}. Seeds {p.seeds}."


def tuning(p, table: dict, labels: dict, available=lambda m: True, letters: dict | None = None) -> list[str]:
    """The first seed's dev score per lr of every (task, method), the chosen one starred, with each run's cost."""
    L = ["", f"## Learning-rate tuning (seed {p.seeds[0]}: dev score per lr; * = chosen; "
             "train time (machine), peak memory)", ""]
    for t in p.tasks:
        for m in p.methods:
            c = table[t][m]
            tried = ", ".join(f"{lr} → {'failed' if s is None else f'{s:.2f}'}"
                              + ("*" if c["lr"] is not None and float(lr) == c["lr"] else "")
                              + _run_cost((c.get("grid_cost") or {}).get(lr), letters)
                              for lr, s in c["grid"].items())
            none = "not run (method unavailable)" if not available(m) else "nothing yet"
            L.append(f"- {t} {labels[m]}: {tried or none}")
    edges = grid_edges(p, table, labels)
    if edges:
        L += ["", "Chosen at an end of its grid (a better lr may lie beyond it; every method gets the same number of "
              "lrs, so none gets another): " + "; ".join(edges) + "."]
    return L


def grid_edges(p, table: dict, labels: dict) -> list[str]:
    """'task method (lr, lowest|highest tried)' for every chosen lr that is the first or last of its grid."""
    out = []
    for t in p.tasks:
        for m in p.methods:
            lr, grid = table[t][m]["lr"], list(p.grid(m))
            if lr is not None and len(grid) > 1 and lr in (grid[0], grid[-1]):
                out.append(f"{t} {labels[m]} ({lr:g}, {'lowest' if lr == grid[0] else 'highest'} tried)")
    return out


def render(suite: Suite, doc: dict, commands: list[str]) -> str:
    """The markdown results file."""
    p, table = suite.p, doc["table"]
    tasks, methods = p.tasks, p.methods
    title = "# Quality v2: diffprune 0.5% vs full finetuning, LoRA, BitFit and a linear probe at equal compute"
    L = preamble(p, doc, commands, title,
                 f"What it compares: on {model_name(p)} and GLUE dev, a diffprune {p.sparsity} diff "
                 "under four masks (L0, the paper's; random, magnitude and Fisher, the cheaper masks the default may go "
                 "to) against full finetuning, LoRA r=8 "
                 "on query+value, LoRA on every linear layer at the .diff's bytes, BitFit and the head alone, every "
                 f"method with {p.epochs} epochs over the train set, its best dev epoch, and {len(p.grid('full'))} "
                 f"learning rate(s) tuned on seed {p.seeds[0]}.")
    L += ["## Protocol", "",
          tasks_line(p),
          f"- Equal compute: {p.epochs} epochs in all, batch {p.batch_size}, max length {p.max_seq_length}. "
          f"diffprune L0: {p.split('dp-l0')[0]} L0 + {p.split('dp-l0')[1]} fixed-mask epochs; magnitude: "
          f"{p.split('dp-magnitude')[0]} dense + {p.split('dp-magnitude')[1]} fixed-mask epochs; random and Fisher: "
          f"{p.split('dp-random')[1]} fixed-mask epochs (their masks cost no epoch; Fisher's costs one pass over "
          "`--fill-samples` examples). Sparsity " + p.sparsity + ". So the masks share the total passes, not one "
          "fixed-mask phase: random and Fisher train at their mask for every epoch, L0 and magnitude for the last "
          f"{p.split('dp-l0')[1]}; that favours the cheap masks, so it is conservative for the L0-over-random target.",
          "- Learning rates (diffprune: the fixed-mask lr; its other lrs are the trainer's defaults, untuned: "
          "`--lr 1e-4` for the L0 phase's δ and the magnitude mask's dense epochs, `--alpha-lr 0.05` for the "
          "gates): "
          + "; ".join(f"{LABELS[m]} {', '.join(f'{x:g}' for x in p.grid(m))}" for m in methods)
          + f". The best dev score at seed {p.seeds[0]} picks the lr (ties: the first listed; a run that failed is "
          "shown as failed in the tuning table and is not a candidate); the other seeds "
          "use it. Model selection is on dev for every method alike (best epoch and lr), so all scores are "
          "optimistic by the same rule.",
          "- Stored bytes are file sizes: diffprune the fp16 `.diff` (`artifact.write`), scored on base + that "
          "file; baselines the trained tensors as fp16 safetensors (full FT: every weight; LoRA: adapter + head; "
          "BitFit: biases + head; head: the head), scored after that fp16 rounding. LoRA all-linear takes the "
          f"largest rank whose file fits in the dp-l0 .diff of seed {p.seeds[0]} at the middle lr of dp-l0's grid "
          "(alpha = 2 r).",
          "- Cost: train time is the run's process wall time (load, train, per-epoch dev evaluation); memory is "
          "the process's peak RSS on CPU (it includes the Python, torch and transformers runtime: the head-only run "
          "shows that floor), torch's peak allocated memory on cuda. LoRA all-linear's rank is in the JSON (`lora_rank`). "
          "Known bias against the baselines, to go when they are next rerun: `bench/baselines.py` keeps its best "
          "epoch as a copy of every weight on the training device (about 91 MB for MiniLM in fp32; two copies for "
          "a moment when a later epoch is better), so a baseline's peak is up to about 0.18 GB above what its "
          "training needs; diffprune's best epoch keeps its k values and the head. " + CPU_LOAD,
          "- Baselines: AdamW, linear decay, no warmup or weight decay, gradient norm clipped to 1, the head "
          "initialised as `train` does; LoRA via PEFT (dropout 0.1), BitFit and the head by freezing.", ""]
    # main table
    L += ["## Results (mean ± sample std (n − 1) over seeds, (n) seeds)", "",
          "| task | ran on | metric floor | " + " | ".join(LABELS[m] for m in methods) + " |",
          "|---|---|---|" + "---|" * len(methods)]
    for t in tasks:
        row = [cell_text(table[t][m]) for m in methods]
        floor = doc["majority"].get(t)
        L.append(f"| {t} | {task_devices(doc, t)} | {'—' if floor is None else f'{floor:.2f}'} | "
                 + " | ".join(row) + " |")
    L += ["| **average** | | | " + " | ".join(averages(table, tasks, methods, len(p.seeds))) + " |"]
    part = doc.get("interim")
    if part:
        L += [f"| *interim: {', '.join(part['tasks'])}* | | | "
              + " | ".join(f"{part['averages'][m]:.2f}" if m in part["averages"] else "—" for m in methods) + " |"]
    L += ["", DEVICE_NOTE, "",
          "`metric floor`: always predicting the most frequent train label (stsb: the mean). Scores: GLUE metric ×100 "
          "(rte accuracy, mrpc mean of F1 and accuracy, stsb mean of Pearson and Spearman, cola Matthews).", ""]
    letters = machine_letters(doc)
    L += ["## Bytes and cost (per run, at the chosen lr; mean over seeds, memory the maximum)", "",
          "Train time is the mean over the seeds that ran on one machine, a figure per machine (letters below). A "
          "resumed run timed and measured only its last part, so time and memory leave it out.", "",
          "Stored entries: a diff's nonzero δ entries (its density of N in brackets; the new head apart), a "
          "baseline's trained parameters (its head included).", "",
          "| task | method | lr | stored bytes | stored entries | train time (machine) | peak memory |",
          "|---|---|---|---|---|---|---|"]
    for t in tasks:
        for m in methods:
            c = table[t][m]
            if c["n"] == 0:
                continue
            L.append(f"| {t} | {LABELS[m]} | {c['lr']:g} | {rules.fmt_bytes(c['bytes'])} | {entries_text(c)} | "
                     f"{times_text(c, letters)} | {memory_text(c)} |")
    L.append("")
    L += random_mask_note(p, table)
    L += machine_legend(letters)
    # targets
    L += ["## Targets (issue 11)", "",
          "| target | on the means | on score alone | stored bytes, dp-l0 / theirs | seeds passing |",
          "|---|---|---|---|---|"]
    for key, text in rules.TARGETS:
        ok, done = doc["pass_counts"][key]
        L.append(f"| {text} | {rules.fmt_verdict(doc['verdicts_on_means'][key])} | "
                 f"{rules.fmt_verdict(doc['verdicts_on_score_alone'][key])} | "
                 f"{ratio_text(doc['bytes_ratios'], key)} | {ok} of {done} complete (of {len(p.seeds)}) |")
    L += ["", "The issue asks diffprune to be ahead of LoRA and BitFit at equal or fewer stored bytes: those targets "
          "pass only when dp-l0 is ahead on score and its .diff is no larger than the other method's file on every "
          "task (per seed for the seed counts). LoRA all-linear is matched to a dp-l0 .diff (the largest rank "
          "whose file fits in it), so its equal bytes are its budget: the largest file that buys it no higher rank "
          "than it trained at (one byte under the next rank's file; `budgets` in the JSON). A mask passes when its "
          ".diff is no larger than that. LoRA q,v and BitFit are not matched, so where dp-l0 stores more, a win on score alone is not a "
          "win at equal bytes. A target is '—' while a cell it needs lacks a seed's run: targets, averages and the "
          "default are judged on means over all seeds only.", ""]
    cm = doc["cheaper_masks_vs_l0"]
    L += ["Cheaper masks vs the L0 mask (task average of the means): " + gaps_text(cm), ""]
    if part:
        left = ", ".join(t for t in tasks if t not in part["tasks"])
        L += [INTERIM_NOTE.format(tasks=", ".join(part["tasks"]), left=left,
                                  gaps=gaps_text(part["cheaper_masks_vs_l0"])), ""]
    L += default_mask_text(doc["default_mask"])
    # per seed
    L += ["## Per seed", "", "Best epoch of diffprune: the fixed-mask epoch (0: the projected diff before it).", "",
          "| task | method | seed | lr | score | best epoch | bytes | train time | peak memory | machine | status |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for m in methods:
            for seed, c in doc["cells"][t][m].items():
                r = c["result"]
                if r is None:
                    L.append(f"| {t} | {LABELS[m]} | {seed} | | | | | | | | {c['status']} |")
                else:
                    L.append(f"| {t} | {LABELS[m]} | {seed} | {r['settings']['lr']:g} | {r['score']:.2f} | "
                             f"{r.get('best_epoch')} | {rules.fmt_bytes(r.get('bytes'))} | "
                             f"{r['train_seconds'] / 60:.1f} min{' (resumed: last part only)' if r.get('resumed') else ''}"
                             f" | {memory_text(r)} | {letters[r.get('machine')]} | ok |")
    L += tuning(p, table, LABELS, suite.available, letters)
    L += ["", "## L0 phase: density path (expected / deterministic-gate density after each L0 epoch)", ""]
    for t in tasks:
        for seed, c in doc["cells"][t].get("dp-l0", {}).items():
            r = c["result"]
            if r and r.get("l0_density_path"):
                L.append(f"- {t} seed {seed}: " + ", ".join(
                    f"ep{h['epoch']} {100 * (h['expected_density'] or 0):.2f}% / "
                    f"{100 * (h['deterministic_density'] or 0):.2f}%" for h in r["l0_density_path"]))
    L += ["", "Every run's settings and command are in the JSON file next to this one (`cells`)."]
    return "\n".join(L) + "\n"


def gaps_text(gaps: dict) -> str:
    """'random mask -3.96; ...' from rules.cheaper_masks ('—' where a cell is missing)."""
    return "; ".join(f"{LABELS[m]} {'—' if v is None else f'{v:+.2f}'}" for m, v in gaps.items())


def ratio_text(ratios: dict, key: str) -> str:
    """'1.94x LoRA q,v' for an "ahead of" target, '—' while unknown; '' for the other targets."""
    if key not in ratios:
        return ""
    other, ratio = ratios[key] or (None, None)
    if ratio is None:
        return "—"
    return f"{ratio:.2f}x {LABELS[other]}" + (" (of its budget)" if other in rules.MATCHED else "")


def default_mask_text(d: dict) -> list[str]:
    """The mask the table makes the default, and why (issue 11's rule, `rules.default_mask`)."""
    order = " < ".join(LABELS[m] for m in rules.MASKS_BY_COST)
    head = (f"**Default mask by this table:** {LABELS[d['mask']]} ({d['why']})." if d["mask"]
            else f"**Default mask by this table:** not decided yet ({d['why']}).")
    meets = "; ".join(f"{LABELS[m]} {rules.fmt_verdict(v)}" for m, v in d["meets_targets"].items())
    return [head + f" The rule (issue 11): L0 stays unless it is not ≥ {rules.L0_OVER_RANDOM:g} pt ahead of the "
            f"random mask or a cheaper mask is as good (within {rules.AS_GOOD} pt of L0's task average, or above "
            "it); then the contenders are L0, the cheaper masks as good as L0 and, when L0 is not 1 pt ahead of it, "
            "the random mask: the cheapest contender that meets the four diffprune targets (each judged in dp-l0's "
            f"place) wins, and when none does, the cheapest mask within {rules.AS_GOOD} pt of the best mask's task "
            "average (what wins on score, at the lowest cost). "
            f"Cost order (what runs before the fixed phase): {order}. Meets the targets: {meets}.", ""]


def _run_cost(cost: dict | None, letters: dict | None) -> str:
    """' (25.1 min A, 2.3 GB RSS)' for one run of the grid; '' when unknown."""
    if not cost or cost.get("train_seconds") is None:
        return ""
    where = f" {letters.get(cost.get('machine'), '?')}" if letters is not None else ""
    part = ", resumed: last part only" if cost.get("resumed") else ""
    return f" ({cost['train_seconds'] / 60:.1f} min{where}, {memory_text(cost)}{part})"


def memory_text(c: dict) -> str:
    """Peak memory of a run or cell: torch's peak allocated on cuda, else the process's peak RSS."""
    if c.get("cuda_peak_allocated"):
        return f"{rules.fmt_bytes(c['cuda_peak_allocated'])} cuda alloc"
    if c.get("peak_rss_bytes") is None:
        return "—"
    return f"{rules.fmt_bytes(c['peak_rss_bytes'])} RSS"


def entries_text(c: dict) -> str:
    """'113,566 (0.50%)' for a diff, '74,498' for a baseline, '—' when the entries recorded none."""
    if c.get("entries") is None:
        return "—"
    return f"{c['entries']:,.0f}" + (f" ({100 * c['density']:.2f}%)" if c.get("density") is not None else "")


def random_mask_note(p, table: dict) -> list[str]:
    """Why the random mask stores fewer than k entries, with each task's figures (k = round(S·N))."""
    parts = []
    for t in p.tasks:
        c = table[t].get("dp-random")
        if c and c.get("entries") and c.get("density"):
            n = c["entries"] / c["density"]
            k = round(float(p.sparsity.rstrip("%")) / 100 * n)
            if c["entries"] < k:
                parts.append(f"{t} {c['entries']:,.0f} of k = {k:,} ({100 * c['density']:.2f}%)")
    if not parts:
        return []
    return ["The random mask draws k = round(S·N) positions uniformly over all N entries, as specified. Entries "
            "that get no gradient stay 0 and are not stored: mostly rows of the word embedding for tokens absent "
            "from the train set, which hold half of N. So its file holds fewer entries than the other masks': "
            + "; ".join(parts) + ". It is the plain uniform random mask; one drawn only over entries that receive "
            "gradient would spend the whole budget.", ""]


def complete_mean(c: dict, seeds: int) -> float | None:
    """A cell's mean once every seed has its run, else None: partial means are shown, never judged or averaged."""
    return c["mean"] if c["n"] == seeds else None


def averages(table: dict, tasks: list[str], methods: list[str], seeds: int) -> list[str]:
    """Each method's task average of the means ('—' while a task lacks a seed's run)."""
    out = []
    for m in methods:
        vals = [complete_mean(table[t][m], seeds) for t in tasks]
        out.append("—" if None in vals or not vals else f"{sum(vals) / len(vals):.2f}")
    return out


def cell_text(c: dict) -> str:
    if c["n"]:
        return rules.fmt_score(c["mean"], c["std"], c["n"])
    return c["status"][0] if c["status"] else "—"
