"""Quality benchmark: diffprune vs full finetuning vs PEFT LoRA on real GLUE with the bundled MiniLM.

Superseded by bench/quality_v2.py (issue 11: equal compute, full data, tuned baselines, seeds); kept to
reproduce the earlier results files (bench/results/quality*.md), which are history.

Every (task, method) run is cached as JSON in bench/work/ under a hash of its settings, so reruns skip finished runs
and several invocations (e.g. one per method, in parallel) can share the work; the table is always assembled from
the cache. Examples:

    python bench/bench_quality.py --tasks rte,mrpc --methods full,lora
    python bench/bench_quality.py --methods diffprune
    python bench/bench_quality.py --report-only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from run_cache import claim  # noqa: E402
from run_cache import write_json_atomic as _write_json_atomic  # noqa: E402
from run_cache import write_text_atomic as _write_text_atomic  # noqa: E402
from scoring import majority_score, score_artifact  # noqa: E402

TASKS = ("rte", "mrpc", "stsb", "cola")
METHODS = ("full", "lora", "diffprune", "diffprune-matched")
# Train-sample caps (None = the whole train set); recorded in the results.
DEFAULT_CAPS = {"rte": 2000, "mrpc": 2500, "stsb": 2000, "cola": 3000}
SCORE_NAMES = {"rte": "accuracy", "mrpc": "mean(F1, accuracy)", "stsb": "mean(Pearson, Spearman)",
               "cola": "Matthews corr."}
TARGET_AVG_GAP = 1.0
TARGET_TASK_GAP = 2.0


def _glue_dir() -> str:
    return os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "glue")


def settings_key(settings: dict) -> str:
    """A short stable hash of a run's settings: the cache key."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


class Suite:
    """The benchmark's settings and its cache of finished runs."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir)
        self.data_dir = args.data_dir or _glue_dir()
        self.caps = dict(DEFAULT_CAPS)
        for item in filter(None, (args.caps or "").split(",")):
            task, _, n = item.partition("=")
            self.caps[task.strip()] = None if n.strip() in ("", "none", "all") else int(n)

    # ------------------------------------------------------------------ settings per run
    def common(self, task: str) -> dict:
        a = self.args
        return {"task": task, "model": a.model, "seed": a.seed, "batch_size": 32, "max_seq_length": 128,
                "max_train_samples": self.caps.get(task), "max_eval_samples": a.max_eval_samples}

    def lrs(self, method: str) -> list[float]:
        """The learning rates tried for a baseline (the best dev score among them is reported)."""
        return self.args.full_lr if method == "full" else self.args.lora_lr

    def settings(self, task: str, method: str, sparsity: str | None = None, lr: float | None = None) -> dict:
        a = self.args
        s = self.common(task)
        s["method"] = method
        if method in ("full", "lora"):
            s.update(epochs=a.epochs, lr=self.lrs(method)[0] if lr is None else lr, schedule="linear decay",
                     sampler="DistributedSampler(seed), as train",
                     warmup_ratio=0.0, weight_decay=0.0, grad_clip=1.0)
            if method == "lora":
                s.update(lora_r=8, lora_alpha=16, lora_dropout=0.1, lora_targets=["query", "value"],
                         modules_to_save=["classifier"])
        else:
            s.update(epochs=a.dp_epochs, fixmask_epochs=a.dp_fixmask_epochs,
                     sparsity=sparsity or a.sparsity, extra_args=a.dp_args or "", values="fp16")
        return s

    def cache_path(self, settings: dict) -> Path:
        return self.work / f"{settings['task']}-{settings['method']}-{settings_key(settings)}.json"

    def cached(self, settings: dict) -> dict | None:
        p = self.cache_path(settings)
        return json.loads(p.read_text()) if p.is_file() else None

    # ------------------------------------------------------------------ runs
    def run(self, task: str, method: str) -> dict | None:
        if method == "diffprune-matched":
            return self.run_matched(task)
        if method in ("full", "lora"):
            done = [self.run_one(task, method, self.settings(task, method, lr=lr)) for lr in self.lrs(method)]
            return self.best(task, method) if any(done) else None
        return self.run_one(task, method, self.settings(task, method))

    def best(self, task: str, method: str) -> dict | None:
        """A baseline's cached run with the best dev score over the learning rates tried, with every lr's score."""
        found = {lr: self.cached(self.settings(task, method, lr=lr)) for lr in self.lrs(method)}
        runs = [r for r in found.values() if r]
        if not runs:
            return None
        top = dict(max(runs, key=lambda r: r["score"]))
        top["lr_scores"] = {str(r["settings"]["lr"]): r["score"] for r in runs}
        top["lrs_missing"] = [lr for lr, r in found.items() if r is None]
        return top

    def run_one(self, task: str, method: str, settings: dict) -> dict | None:
        hit = self.cached(settings)
        if hit is not None:
            print(f"cached: {task} {method} ({self.cache_path(settings).name})", flush=True)
            return hit
        lock = claim(self.cache_path(settings))
        if lock is None:
            print(f"skip: {task} {method} is being run by another process", flush=True)
            return None
        print(f"running: {task} {method}", flush=True)
        run_dir = self.work / "runs" / f"{task}-{method}-{settings_key(settings)}"
        try:
            if method in ("full", "lora"):
                result = self._run_baseline(settings, run_dir)
            else:
                result = self._run_diffprune(settings, run_dir)
        finally:
            lock.unlink(missing_ok=True)
        result["settings"] = settings
        result["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        _write_json_atomic(self.cache_path(settings), result)
        return result

    def _run_baseline(self, s: dict, run_dir: Path) -> dict:
        from baselines import BaselineConfig, run_baseline

        cfg = BaselineConfig(s["method"], s["task"], model=s["model"], data_dir=self.data_dir, epochs=s["epochs"],
                             seed=s["seed"], batch_size=s["batch_size"], max_seq_length=s["max_seq_length"],
                             lr=s["lr"], weight_decay=s["weight_decay"], warmup_ratio=s["warmup_ratio"],
                             grad_clip=s["grad_clip"], max_train_samples=s["max_train_samples"],
                             max_eval_samples=s["max_eval_samples"])
        log_path = run_dir.with_suffix(".log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as fh:
            def log(line: str) -> None:
                print(line, flush=True)
                fh.write(line + "\n")
                fh.flush()
            result = run_baseline(cfg, run_dir, log=log)
        result["command"] = self.command_line(s["task"], s["method"])
        return result

    def train_command(self, s: dict, ckpt: Path) -> list[str]:
        cmd = [sys.executable, "-m", "diffcli", "train", "--method", "l0", "--task", s["task"],  # the L0 table
               "--data-dir", self.data_dir, "--model", s["model"], "--epochs", str(s["epochs"]), "--batch-size", str(s["batch_size"]),
               "--max-seq-length", str(s["max_seq_length"]), "--seed", str(s["seed"]), "--sparsity", s["sparsity"],
               "-o", str(ckpt), "--json", "--force"]
        if s["fixmask_epochs"] is not None:
            cmd += ["--fixmask-epochs", str(s["fixmask_epochs"])]
        if s["max_train_samples"]:
            cmd += ["--max-train-samples", str(s["max_train_samples"])]
        if s["max_eval_samples"]:
            cmd += ["--max-eval-samples", str(s["max_eval_samples"])]
        cmd += shlex.split(s["extra_args"])
        return cmd

    def _run_diffprune(self, s: dict, run_dir: Path) -> dict:
        """`diffprune train` as a subprocess (--json), then pack to .diff (fp16) and re-score the packed artifact."""
        from diffcli import artifact, checkpoint

        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt = run_dir / "ckpt"
        cmd = self.train_command(s, ckpt)
        log_path = run_dir.with_suffix(".log")
        summary_path = run_dir / "train_summary.json"
        if checkpoint.is_checkpoint(ckpt) and not (run_dir / "ckpt.partial").exists():
            # Training finished earlier (e.g. a later step failed): reuse it, no retraining.
            summary = _summary_from_checkpoint(ckpt, summary_path)
            seconds = summary.get("seconds", 0.0)
        else:
            code = code_version()
            t0 = time.perf_counter()
            with log_path.open("w") as err:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = log_path.read_text()[-2000:]
                raise RuntimeError(f"diffprune train failed (exit {proc.returncode}): {tail}")
            summary = json.loads(proc.stdout)
            summary["code"] = code
            _write_json_atomic(summary_path, summary)
        diff = checkpoint.load(ckpt)
        packed = run_dir / f"{s['task']}.diff"
        report = artifact.write(diff, packed, values=s["values"], force=True)
        dev = score_artifact(packed, s, self.data_dir)
        from diffcli import metrics, tasks

        spec = tasks.task_spec(s["task"])
        split = spec.eval_splits[0]
        return {"method": s["method"], "task": s["task"], "score": 100 * metrics.main_score(spec, dev[split]),
                "metrics": dev, "train_summary": summary, "artifact": str(packed), "checkpoint": str(ckpt),
                "bytes": packed.stat().st_size, "nnz": diff.nnz, "density": diff.density,
                "pack_report": _jsonable(report), "seconds": seconds,
                "command": " ".join(shlex.quote(c) for c in cmd)}

    def run_matched(self, task: str) -> dict | None:
        """The trained 0.5% diff re-projected (exact global top-k, no retraining) to the largest density whose packed
        artifact is no larger than LoRA's adapter; only when the 0.5% artifact is larger. A lower bound on what a
        run trained at that density would give."""
        dp = self.cached(self.settings(task, "diffprune"))
        lora = self.best(task, "lora")  # the adapter the table compares against
        if dp is None or lora is None:
            print(f"skip: {task} diffprune-matched needs the diffprune and lora runs first", flush=True)
            return None
        if dp["bytes"] <= lora["bytes"]:
            print(f"skip: {task} diffprune at {self.args.sparsity} is already within LoRA's bytes", flush=True)
            return None
        settings = self.matched_settings(task, dp, lora)
        hit = self.cached(settings)
        if hit is not None:
            print(f"cached: {task} diffprune-matched", flush=True)
            return hit
        print(f"running: {task} diffprune-matched (LoRA adapter {lora['bytes']} B)", flush=True)
        from diffcli import artifact, metrics, tasks

        run_dir = self.work / "runs" / f"{task}-diffprune-matched-{settings_key(settings)}"
        run_dir.mkdir(parents=True, exist_ok=True)
        diff, density = fit_bytes(Path(dp["checkpoint"]), lora["bytes"], dp["settings"]["values"])
        packed = run_dir / f"{task}.diff"
        report = artifact.write(diff, packed, values=dp["settings"]["values"], force=True)
        dev = score_artifact(packed, dp["settings"], self.data_dir)
        spec = tasks.task_spec(task)
        result = {"method": "diffprune-matched", "task": task,
                  "score": 100 * metrics.main_score(spec, dev[spec.eval_splits[0]]), "metrics": dev,
                  "artifact": str(packed), "bytes": packed.stat().st_size, "nnz": diff.nnz,
                  "density": diff.density, "sparsity": f"{100 * density:.4f}%", "lora_bytes": lora["bytes"],
                  "pack_report": _jsonable(report), "settings": settings,
                  "finished": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json_atomic(self.cache_path(settings), result)
        return result

    def matched_settings(self, task: str, dp: dict, lora: dict) -> dict:
        return {"task": task, "method": "diffprune-matched", "from": settings_key(dp["settings"]),
                "lora": settings_key(lora["settings"]), "how": "re-projection of the trained diff, no retraining"}

    def command_line(self, task: str, method: str) -> str:
        argv = ["python", "bench/bench_quality.py", "--tasks", task, "--methods", method]
        return " ".join(argv + self.args.passthrough)

    # ------------------------------------------------------------------ report
    def collect(self, tasks: list[str]) -> dict:
        rows = {}
        for task in tasks:
            row = {m: self.best(task, m) for m in ("full", "lora")}
            row["diffprune"] = self.cached(self.settings(task, "diffprune"))
            dp, lora = row["diffprune"], row["lora"]
            row["diffprune-matched"] = None
            if dp is not None and lora is not None and dp["bytes"] > lora["bytes"]:
                row["diffprune-matched"] = self.cached(self.matched_settings(task, dp, lora))
            rows[task] = row
        return rows


def _lr_text(lrs: list[float]) -> str:
    if len(lrs) == 1:
        return f"{lrs[0]:g}"
    return "each of " + ", ".join(f"{x:g}" for x in lrs) + " (the best dev score per task is reported; see 'lr')"


def _summary_from_checkpoint(ckpt: Path, saved: Path) -> dict:
    """The train summary of a finished run: the saved `--json` output, else rebuilt from the checkpoint's meta."""
    if saved.is_file():
        return json.loads(saved.read_text())
    from diffcli import checkpoint

    meta = checkpoint.load(ckpt).meta
    res = meta.get("results") or {}
    return {"after_l0": res.get("after_l0"), "after_projection": res.get("projection"),
            "after_fixmask": res.get("best"), "rebuilt_from_checkpoint_meta": True,
            "code": {"commit": None, "note": "rebuilt from the checkpoint meta; trainer version not recorded"}}


def code_version() -> dict:
    """The commit and the trainer files' hashes a diffprune run used (the trainer may change between runs)."""
    out = {}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out["commit"] = None
    for name in ("training.py", "gates.py", "diffmodel.py"):
        f = REPO / "diffcli" / name
        if f.is_file():
            out[name] = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    return out


def _jsonable(obj):
    from dataclasses import asdict, is_dataclass

    if is_dataclass(obj):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def fit_bytes(ckpt: Path, target_bytes: int, values: str = "fp16", steps: int = 14):
    """The diff of checkpoint `ckpt` projected to the largest density whose packed size is <= target_bytes.

    Bisection on the density (packing is deterministic and size grows with nnz); returns (diff, density).
    """
    from diffcli import artifact, checkpoint, projection

    diff = checkpoint.load(ckpt)
    lo, hi = 0.0, diff.density
    best = projection.project(diff, 0.0).diff
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = projection.project(diff, mid).diff
        if len(artifact.pack(cand, values)) <= target_bytes:
            lo, best = mid, cand
        else:
            hi = mid
    return best, lo


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def build_report(suite: Suite, tasks: list[str], invocation: str) -> tuple[str, dict]:
    """The markdown table and the JSON document of every cached result for `tasks`."""
    rows = suite.collect(tasks)
    a = suite.args
    lines: list[str] = []
    table_rows = []
    gaps, full_scores, dp_scores, lora_scores = [], [], [], []
    ahead = []  # (task, dp variant score, lora score, dp bytes, lora bytes)
    for task in tasks:
        r = rows[task]
        f, l, d, m = (r[k] for k in ("full", "lora", "diffprune", "diffprune-matched"))
        gap = None if f is None or d is None else d["score"] - f["score"]
        if gap is not None:
            gaps.append(gap)
        table_rows.append((task, f, l, d, m, gap))
        if f and l and d:
            full_scores.append(f["score"]); lora_scores.append(l["score"]); dp_scores.append(d["score"])
        # The LoRA comparison is at equal or fewer bytes: the 0.5% diff if it fits, else the matched run.
        cmp = d if d is not None and l is not None and d["bytes"] <= l["bytes"] else m
        if cmp is not None and l is not None:
            ahead.append((task, cmp["score"], l["score"], cmp["bytes"], l["bytes"],
                          cmp.get("sparsity") or cmp["settings"]["sparsity"]))
    today = _dt.date.today().isoformat()
    lines += ["# Quality: diffprune vs full finetuning vs PEFT LoRA (bundled MiniLM, GLUE dev)", "",
              f"Date: {today}. Machine: CPU only ({os.cpu_count()} cores, shared with other jobs), torch threads 1 per run.",
              "", "## Commands", "", "```", invocation, "```", "",
              "Run here as parallel lanes (`OMP_NUM_THREADS=1 nice -n 10`, one invocation per method with "
              "`--methods full`, `--methods lora`, `--methods diffprune` and `--no-report`, the same other flags), "
              "then the same command with `--report-only`. "
              "Each (task, method) is cached in `bench/work/` (gitignored) under a hash of its settings; "
              "the table is assembled from that cache (`python bench/bench_quality.py --report-only` with the same flags).", ""]
    lines += ["## Settings", "",
              f"- Model: `{a.model}`{' (all-MiniLM-L6-v2, bundled)' if a.model == 'minilm' else ''}, seed {a.seed}, batch 32, max length 128, dynamic padding "
              "(`tasks.collate`), same data loading/tokenisation/evaluation/metrics (`diffcli.data_sources`, `diffcli.tasks`, `diffcli.evaluation`, "
              "`diffcli.metrics`) for every method; dev sets in full"
              + (f" (capped at {a.max_eval_samples})" if a.max_eval_samples else "") + ".",
              "- Train-sample caps (first N rows): " + ", ".join(
                  f"{t}: {suite.caps.get(t) or 'all'}" for t in tasks) + ".",
              f"- Full finetuning: {a.epochs} epochs, AdamW lr {_lr_text(a.full_lr)}, linear decay, no warmup, no weight decay, "
              "grad-norm clip 1; best dev epoch kept. Bytes: `model.safetensors` of `save_pretrained` (fp32).",
              f"- LoRA (PEFT): r=8, alpha 16, dropout 0.1 on query and value, classifier head trained "
              f"(`modules_to_save`), {a.epochs} epochs, AdamW lr {_lr_text(a.lora_lr)}, otherwise as full finetuning. "
              "Bytes: `adapter_model.safetensors`.",
              f"- diffprune: `diffprune train` ({a.dp_epochs} L0 epochs + {a.dp_fixmask_epochs} fixed-mask epochs, "
              f"sparsity {a.sparsity}, trainer defaults otherwise{'; extra: ' + a.dp_args if a.dp_args else ''}), "
              "packed with `artifact.write` (fp16 values); the score is re-measured on base + the packed .diff. "
              "Bytes: the `.diff` file.",
              "- diffprune @ LoRA bytes: when the 0.5% artifact is larger than LoRA's adapter, the same trained diff "
              "re-projected (exact global top-k, no retraining, no fixed-mask phase) to the largest density whose "
              ".diff is no larger than the adapter (`fit_bytes`): a lower bound for a run trained at that density.",
              "- Score: GLUE metric ×100 (rte accuracy; mrpc mean of F1 and accuracy; stsb mean of Pearson and "
              "Spearman; cola Matthews).", ""]
    lines += ["## Results", "",
              "| task | metric | majority | full FT | LoRA | diffprune 0.5% | Δ vs full | diffprune @ LoRA bytes | bytes full | bytes LoRA | bytes diffprune 0.5% | bytes diffprune matched |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    majority: dict[str, float | None] = {}
    for task, f, l, d, m, gap in table_rows:
        mm = "—" if m is None else f"{m['score']:.2f} ({m['sparsity']})"
        try:
            floor = majority_score(task, suite.data_dir, suite.caps.get(task), a.max_eval_samples)
        except Exception:  # noqa: BLE001 - the floor is informative only
            floor = None
        majority[task] = floor
        lines.append(f"| {task} | {SCORE_NAMES.get(task, '')} | {_fmt(floor)} | {_fmt(f and f['score'])} | {_fmt(l and l['score'])} | "
                     f"{_fmt(d and d['score'])} | {'—' if gap is None else f'{gap:+.2f}'} | {mm} | "
                     f"{_fmt_bytes(f and f['bytes'])} | {_fmt_bytes(l and l['bytes'])} | {_fmt_bytes(d and d['bytes'])} | "
                     f"{_fmt_bytes(m and m['bytes'])} |")
    complete = len(full_scores) == len(tasks)
    if full_scores:
        n = len(full_scores)
        lines.append(f"| **average** ({n} task{'s' if n > 1 else ''}) | | | {sum(full_scores) / n:.2f} | "
                     f"{sum(lora_scores) / n:.2f} | {sum(dp_scores) / n:.2f} | {sum(dp_scores) / n - sum(full_scores) / n:+.2f} | | | | | |")
    lines += ["", "`majority`: the score of always predicting the most frequent train label (stsb: the mean); "
              "a run at this value has not learned the task."]
    if len(a.full_lr) > 1 or len(a.lora_lr) > 1:
        lines += ["", "Baselines' learning rates (dev score per lr; the table shows the best):", ""]
        for task, f, l, _d, _m, _gap in table_rows:
            for label, r in (("full FT", f), ("LoRA", l)):
                if r is None:
                    continue
                tried = ", ".join(f"{float(k):g} → {v:.2f}" for k, v in r["lr_scores"].items())
                missing = f" (not run: {', '.join(f'{x:g}' for x in r['lrs_missing'])})" if r["lrs_missing"] else ""
                lines.append(f"- {task} {label}: {tried}{missing}")
    lines.append("")
    verdicts = {}
    if gaps:
        avg_gap = sum(gaps) / len(gaps)
        worst = min(gaps)
        verdicts["avg_within_1pt"] = avg_gap >= -TARGET_AVG_GAP
        verdicts["no_task_below_2pt"] = worst >= -TARGET_TASK_GAP
        verdicts["ahead_of_lora_at_le_bytes"] = bool(ahead) and all(s > ls and b <= lb for _, s, ls, b, lb, _ in ahead)
        lines += ["## Targets", "",
                  f"- Within {TARGET_AVG_GAP} point of full finetuning on average: Δ = {avg_gap:+.2f} → "
                  f"**{'PASS' if verdicts['avg_within_1pt'] else 'FAIL'}**",
                  f"- No task more than {TARGET_TASK_GAP} points below: worst Δ = {worst:+.2f} → "
                  f"**{'PASS' if verdicts['no_task_below_2pt'] else 'FAIL'}**",
                  "- Ahead of LoRA at equal or fewer stored bytes: " + "; ".join(
                      f"{t}: {s:.2f} vs {ls:.2f} at {_fmt_bytes(b)} ({sp}) vs {_fmt_bytes(lb)}"
                      for t, s, ls, b, lb, sp in ahead) + f" → **{'PASS' if verdicts['ahead_of_lora_at_le_bytes'] else 'FAIL'}**"]
        if not complete:
            lines.append(f"- (incomplete: {len(tasks) - len(full_scores)} task(s) lack a run; verdicts cover finished tasks)")
        lines.append("")
    diag = []
    for task in tasks:
        d = rows[task]["diffprune"]
        if d is None:
            continue
        diag.append(f"- {task}: " + _diagnostics(d))
    if diag:
        lines += ["## diffprune diagnostics (from `train --json`)", ""] + diag + [""]
    doc = {"date": today, "invocation": invocation, "caps": {t: suite.caps.get(t) for t in tasks},
           "targets": {"avg_gap_max": TARGET_AVG_GAP, "task_gap_max": TARGET_TASK_GAP}, "verdicts": verdicts,
           "results": {t: {m: (_strip(v) if v else None) for m, v in rows[t].items()} for t in tasks}}
    return "\n".join(lines), doc


def _diagnostics(d: dict) -> str:
    """One line: density after the L0 phase, score after L0 / projection / fixed mask, time, trainer version."""
    from diffcli import metrics, tasks

    summ = d.get("train_summary", {})
    spec = tasks.task_spec(d["task"])
    split = spec.eval_splits[0]

    def score(entry) -> str:
        try:
            return f"{100 * metrics.main_score(spec, entry['metrics'][split]):.2f}"
        except (KeyError, TypeError):
            return "?"

    l0 = summ.get("after_l0") or {}
    fix = summ.get("after_fixmask") or {}
    code = summ.get("code") or {}
    return (f"after L0: deterministic-gate density {100 * l0.get('deterministic_density', float('nan')):.3f}%, "
            f"expected density {100 * l0.get('expected_density', float('nan')):.2f}%, λ {l0.get('lambda', float('nan')):.3g}, "
            f"score {score(l0)}; after projection to {100 * d.get('density', 0):.3f}% (nnz {d.get('nnz')}): "
            f"{score(summ.get('after_projection'))}; after fixed mask (best epoch {fix.get('epoch')}): {score(fix)}; "
            f"packed .diff re-scored: {d['score']:.2f}; {d.get('seconds', 0) / 60:.1f} min; "
            f"trainer commit {code.get('commit')} training.py {code.get('training.py')}")


def _brief_summary(summary: dict) -> dict:
    keep = {}
    for k, v in summary.items():
        if isinstance(v, (int, float, str)) or (isinstance(v, dict) and len(json.dumps(v)) < 400):
            keep[k] = v
    return keep


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("artifact",)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default="full,lora,diffprune,diffprune-matched")
    ap.add_argument("--report-only", action="store_true", help="only assemble the table from the cache")
    ap.add_argument("--no-report", action="store_true", help="run, but do not rewrite bench/results")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--data-dir")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=1, help="epochs of full finetuning and LoRA")
    ap.add_argument("--full-lr", type=_floats, default=[5e-5],
                    help="learning rate(s) of full finetuning, comma-separated; the best dev score is reported")
    ap.add_argument("--lora-lr", type=_floats, default=[5e-4], help="learning rate(s) of LoRA, as --full-lr")
    ap.add_argument("--dp-epochs", type=int, default=1, help="diffprune L0-phase epochs")
    ap.add_argument("--dp-fixmask-epochs", type=int, default=1, help="diffprune fixed-mask epochs")
    ap.add_argument("--dp-args", default="", help="extra `diffprune train` flags (quoted)")
    ap.add_argument("--sparsity", default="0.5%")
    ap.add_argument("--caps", help="train-sample caps, e.g. stsb=2500,cola=4000,rte=all")
    ap.add_argument("--max-eval-samples", type=int)
    ap.add_argument("--notes", help="a markdown file whose text is added to the report under 'Notes'")
    ap.add_argument("--label", help="write bench/results/quality-LABEL.md/json (an extra configuration)")
    ap.add_argument("--work-dir", default=str(REPO / "bench" / "work"))
    ap.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Flags that change settings, for the per-run command lines (without --tasks/--methods).
    skip = {"--tasks", "--methods", "--report-only", "--no-report", "--work-dir", "--results-dir", "--label",
            "--notes"}
    passthrough, i = [], 0
    while i < len(argv):
        tok = argv[i]
        name = tok.split("=", 1)[0]
        takes_value = name not in ("--report-only", "--no-report") and "=" not in tok
        if name not in skip:
            passthrough.append(tok)
            if takes_value and i + 1 < len(argv):
                passthrough.append(shlex.quote(argv[i + 1]))
        i += 2 if takes_value else 1
    args.passthrough = passthrough
    return args


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    suite = Suite(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            print(f"unknown method {m!r}; known: {', '.join(METHODS)}", file=sys.stderr)
            return 2
    failures = 0
    if not args.report_only:
        for task in tasks:
            for method in methods:
                try:
                    suite.run(task, method)
                except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
                    failures += 1
                    print(f"FAILED: {task} {method}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if not args.no_report:
        report_tasks = tasks
        head = []
        if tasks != list(TASKS):
            head += ["--tasks", ",".join(tasks)]
        if args.label:
            head += ["--label", args.label]
        invocation = "python bench/bench_quality.py " + " ".join(head + args.passthrough)
        text, doc = build_report(suite, report_tasks, invocation.strip())
        results = Path(args.results_dir)
        stem = f"quality-{args.label}" if args.label else "quality"
        if not any(suite.work.glob("*-*-*.json")) and (results / f"{stem}.md").exists():
            print(f"error: no cached run in {suite.work} to report; {results / stem}.md (history) is kept",
                  file=sys.stderr)  # the cache of the committed tables is gone: an empty table must not replace them
            return 2
        if args.notes:
            text += "\n## Notes\n\n" + Path(args.notes).read_text().strip() + "\n"
        if not args.label:
            extra = sorted(p.name for p in results.glob("quality-*.md"))
            if extra:
                text += "\n## Other configurations\n\n" + "".join(f"- [{n}]({n})\n" for n in extra)
        _write_text_atomic(results / f"{stem}.md", text + "\n")
        _write_json_atomic(results / f"{stem}.json", doc)
        print(text)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
