"""The methods table of quality v2 (issue 10): l0, swr and basis (alone and double-pruned) at matched .diff bytes.

Same harness as the quality table (`quality_v2.Suite`: equal compute, lr tuned on the first seed, per-run cache,
lanes, --quick); only the methods and their sizes differ. `basis` (default --keep-bases) runs first: its packed
.diff is B_basis, "basis scaling's own size". Every other run is sized to a byte target before it trains:
`@basis` runs fit B_basis, `@lora` runs fit LoRA's adapter (the fp16 safetensors file of LoRA r=8 on query and
value plus the head, exactly as the quality table's lora-qv run stores it). How a size is found and a trained file
fitted to it: `methods_sizing` (recorded by every entry).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import methods_sizing as sizing
import quality_v2 as q
import quality_v2_rules as rules
from run_cache import file_size, kept_copy_fits

# method → (trainer method, byte target: None = its own size, "basis" = B_basis, "lora" = LoRA's adapter bytes)
METHODS = {"basis": ("basis", None), "l0@basis": ("l0", "basis"), "swr@basis": ("swr", "basis"),
           "l0@lora": ("l0", "lora"), "swr@lora": ("swr", "lora"), "basis2@lora": ("basis", "lora")}
LABELS = {"basis": "basis (own size)", "l0@basis": "l0 @ B_basis", "swr@basis": "swr @ B_basis",
          "l0@lora": "l0 @ LoRA bytes", "swr@lora": "swr @ LoRA bytes", "basis2@lora": "basis+double @ LoRA bytes"}
LR_GRID = {m: (3e-4, 1e-3, 3e-3) for m in METHODS}  # the fixed-phase lr, as for the quality table's diffprune runs
DOUBLE = {"basis2@lora"}
# --jobs threads share one lane: a size is computed once, and transformers' lazy import is not thread-safe
# (two threads importing it at once raised "cannot import name AutoModelForSequenceClassification" on a GPU lane).
_memo_lock = threading.Lock()


class MethodsProtocol(q.Protocol):
    """The quality protocol with this table's methods: E epochs in all, first phase + fixed phase(s)."""

    def grid(self, method: str) -> tuple[float, ...]:
        g = LR_GRID[method]
        return (g[len(g) // 2],) if self.quick else g

    def split(self, method: str) -> tuple[int, int]:
        """(first-phase epochs, fixed-phase epochs): l0 L0 + fixed, swr gated + fixed, basis scales + fixed;
        basis+double runs two fixed phases of --fixmask-epochs each (scales, then the sparse δ): first + 2·fixed = E,
        with at least one scale epoch (a --quick E of 2 runs 3 passes: 0 would leave the trainer's default of 5)."""
        first = self.l0_epochs
        if method in DOUBLE:
            fixed = max(1, (self.epochs - first) // 2)
            return max(1, self.epochs - 2 * fixed), fixed
        return first, self.epochs - first


class MethodsSuite(q.Suite):
    """quality_v2.Suite with this table's methods: every sized run waits for the basis run's .diff."""

    table = "methods"
    scoring_code = q.SCORING_CODE + ("bench/bench_size_score.py", "bench/methods_sizing.py")  # sizes, trims

    def __init__(self, proto: MethodsProtocol, work: Path, store: Path | None = None):
        super().__init__(proto, work, store=store)
        self._sizes: dict[tuple, dict] = {}

    def is_diffprune(self, method: str) -> bool:
        return True

    def available(self, method: str) -> bool:
        return METHODS[method][0] in q.trainer_methods()

    def settings(self, run: q.Run) -> dict | None:
        p = self.p
        trainer, target = METHODS[run.method]
        first, fix = p.split(run.method)
        s = {"task": run.task, "method": run.method, "lr": run.lr, "seed": run.seed, "model": p.model,
             "epochs": p.epochs, "batch_size": p.batch_size, "max_seq_length": p.max_seq_length,
             "max_train_samples": p.max_train_samples, "max_eval_samples": p.max_eval_samples,
             "dp_method": trainer, "first_epochs": first, "fixmask_epochs": fix, "values": "fp16",
             "sparsity": None}
        if target is None:
            return s  # basis alone: no --sparsity (it would turn double pruning on), default --keep-bases
        ref = self.reference(run.task)
        if ref is None:
            return None
        target_bytes = ref["bytes"] if target == "basis" else self.lora_bytes(run.task)
        size = self.size(run.task, run.method, target_bytes, ref)
        if trainer in sizing.OVERSIZE:  # trained masks pack smaller than random ones: train more, trim to the target
            size = {**size, "fitted_sparsity": size["sparsity"], "sparsity": sizing.oversized(trainer, size["sparsity"])}
        s.update(target=target, target_bytes=target_bytes, **size)
        return s

    def waiting(self, task: str, method: str) -> str | None:
        if METHODS.get(method, (None, None))[1] is not None and self.reference(task) is None:
            return "the basis .diff bytes"
        return None

    def cached(self, run: q.Run) -> dict | None:
        """As the quality table's, but a reference basis run whose .diff is gone (neither its run folder's nor a
        kept copy of its size: a device run that predates packing refs/, or a kept copy of an earlier run) is run
        again: every sized run is fitted to that file."""
        hit = super().cached(run)
        g = LR_GRID["basis"]
        if (hit is None or run.method != "basis" or run.lr != g[len(g) // 2] or run.seed != self.p.seeds[0]):
            return hit
        if file_size(Path(hit.get("diff_path") or "")) == hit.get("bytes"):
            return hit
        if not kept_copy_fits(hit, lambda rel: file_size(self.store / rel)):
            return None
        # files of one task's basis runs differ by tens of bytes: the kept copy is this run's by its content (entries
        # kept before the SHA-256 was recorded: by their size alone)
        sha = hit.get("kept_sha256")
        return hit if sha is None or sizing.file_sha256(self.store / hit["kept_diff"]) == sha else None

    def reference(self, task: str) -> dict | None:
        """The basis run every size refers to: first seed, middle lr (as lora-all's dp-l0 reference)."""
        g = LR_GRID["basis"]
        return self.cached(q.Run(task, "basis", g[len(g) // 2], self.p.seeds[0]))

    def lora_bytes(self, task: str) -> int:
        """LoRA r=8 on query+value + head as fp16 safetensors: the quality table's lora-qv file, computed exactly."""
        key = ("lora", task)
        if key not in self._sizes:
            name = f"lora-bytes-{task}-{self.p.model.replace('/', '_')}-r{sizing.LORA_RANK}"
            self._sizes[key] = {"bytes": self._memo(name, lambda: {"bytes": sizing.lora_adapter_bytes(
                task, self.p.model)})["bytes"]}
        return self._sizes[key]["bytes"]

    def keep(self, run: q.Run, result: dict, run_dir: Path) -> dict:
        """A basis run's .diff, kept beside the entries: the runs sized to it read it as their template, in later
        sessions too (the run folder is scratch; a basis file is ~22 kB)."""
        if METHODS[run.method][1] is not None or not Path(result.get("diff_path", "")).is_file():
            return {}
        kept = self.store / "refs" / f"{run_dir.name}.diff"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["diff_path"], kept)
        return {"kept_diff": kept.relative_to(self.store).as_posix(), "kept_sha256": sizing.file_sha256(kept)}

    def size(self, task: str, method: str, target_bytes: int, ref: dict) -> dict:
        """The --sparsity (l0, basis+double) or --budget (swr) whose file fits target_bytes; memoised on disk."""
        key = (task, method, target_bytes, ref["finished"])
        if key not in self._sizes:
            template = ref["diff_path"]
            if not Path(template).is_file() and ref.get("kept_diff"):  # another session's scratch: the kept copy
                template = str(self.store / ref["kept_diff"])
            # the name holds what the size depends on: the template file itself and the sizing code
            name = (f"size-{task}-{method}-{target_bytes}-{_digest(ref)}-{sizing.file_sha256(Path(template))[:10]}"
                    f"-{sizing.code_hash()}")
            self._sizes[key] = self._memo(name, lambda: sizing.fit_size(Path(template), METHODS[method][0],
                                                                         method in DOUBLE, target_bytes))
        return self._sizes[key]

    def _memo(self, name: str, compute) -> dict:
        path = self.store / "sizes" / f"{name}.json"  # with the entries: a later session has no .diff to refit
        with _memo_lock:
            if path.is_file():
                return json.loads(path.read_text())
            value = compute()
            path.parent.mkdir(parents=True, exist_ok=True)
            q._write_json_atomic(path, value)
            return value

    def fit(self, s: dict, diff, packed_bytes: int) -> tuple[object, dict]:
        """A sparse run's diff over its byte target, re-projected to fit (`methods_sizing.fit_to_target`)."""
        return sizing.fit_to_target(s, diff, packed_bytes)


def _digest(ref: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ref.get("settings"), sort_keys=True).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------ the results file
def render(suite: MethodsSuite, doc: dict, commands: list[str]) -> str:
    """The markdown results file of the methods table."""
    import quality_v2_report as report
    import run_machines

    p, table, cells = suite.p, doc["table"], doc["cells"]
    tasks, methods = p.tasks, p.methods
    L = report.preamble(
        p, doc, commands, "# Quality v2, methods table: l0, swr and basis (alone and double-pruned) at matched .diff bytes",
        f"What it compares (issue 10): on {report.model_name(p)} and GLUE dev, three ways to spend a task's stored "
        "bytes — diff pruning's L0 mask (`l0`), a budgeted choice of where to put low-rank updates (`swr`), and basis "
        "scaling (`basis`, alone and with double pruning) — at matched `.diff` file sizes (header included): at "
        "basis scaling's own size B_basis, and at LoRA's adapter size.")
    splits = "; ".join(f"{LABELS[m]} {p.split(m)[0]} + " + (f"{p.split(m)[1]} + {p.split(m)[1]}" if m in DOUBLE
                                                             else f"{p.split(m)[1]}") for m in methods)
    L += ["## Protocol", "",
          report.tasks_line(p),
          f"- Equal compute: {p.epochs} epochs in all, batch {p.batch_size}, max length {p.max_seq_length}; the "
          f"first phase (l0: L0 gates; swr: unit gates; basis: scales) then the fixed phase(s): {splits} "
          "(basis+double: scales, the kept scales' fixed phase, then the sparse δ's fixed phase, both "
          "`--fixmask-epochs`). Every other option is the trainer's default (basis: `--keep-bases 0.5`; swr: "
          "`--rank 8`).",
          "- Learning rates (the fixed-phase `--fixmask-lr`; first-phase lrs are the trainer's defaults, untuned: l0's "
          "δ and head and swr's factors and head at `--lr 1e-4`, basis's scales and head at `--basis-lr 1e-3`, so "
          "basis's head trains 10x faster in its first phase; basis+double chooses its δ's mask with one gradient pass "
          "over `--fill-samples` 1024 examples, 0.1-0.4 of an epoch, beyond the E epochs): "
          + "; ".join(f"{LABELS[m]} {', '.join(f'{x:g}' for x in p.grid(m))}" for m in methods)
          + f". Chosen on seed {p.seeds[0]}'s best dev score, as in the quality table.",
          "- Bytes: every size is the packed fp16 `.diff` file (`artifact.write`, header included), scored on base + "
          "that file. B_basis is the basis run's file (first seed, middle lr). LoRA's adapter bytes: LoRA r=8 on "
          "query+value plus the head as fp16 safetensors, the file the quality table's lora-qv run stores, computed "
          "exactly from the shapes (`baselines.lora_file_bytes`, no training).",
          "- Sizing (`bench/methods_sizing.py`): l0 and basis+double get `--sparsity` from a bisection on synthetic "
          "files (the basis file's header and head, plus its basis records for basis+double; uniformly random "
          "positions), packed like the run's own; trained masks cluster and compress better, so they train at "
          + " and ".join(f"{k if k == 'l0' else 'basis+double'} {v}x" for k, v in sizing.OVERSIZE.items())
          + " that sparsity and a file over the target is re-projected to fit (exact top-k by bisection, no "
          "retraining; 'trimmed', with the share of trained entries it removed). swr gets `--budget` from the same "
          "bisection with its units taken cheapest first: the cost of the units that fit, so a run that fills it by "
          "gate probability stores as many parameters as the synthetic file; an swr file is never cut ('over' if "
          "above the target). Every seed's trims, overs and dropped δ are listed under the results.",
          "- Cost: train time is the run's process wall time (load, train, per-epoch dev evaluation); memory the "
          "process's peak RSS on CPU (Python, torch and transformers included), torch's peak allocated on cuda. "
          + run_machines.CPU_LOAD, ""]
    L += ["## Results (dev score; mean ± sample std (n − 1) over seeds, (n) seeds)", "",
          "| task | ran on | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|---|" + "---|" * len(methods)]
    for t in tasks:
        L.append(f"| {t} | {run_machines.task_devices(doc, t)} | "
                 + " | ".join(report.cell_text(table[t][m]) for m in methods) + " |")
    avg = report.averages(table, tasks, methods, len(p.seeds))
    L += ["| **average** | | " + " | ".join(avg) + " |", "", run_machines.DEVICE_NOTE, "",
          "Scores: GLUE metric ×100 (rte accuracy, mrpc mean of F1 and accuracy, stsb mean of Pearson and Spearman, "
          "cola Matthews). Floors (most frequent train label; stsb the mean): "
          + ", ".join(f"{t} {v:.2f}" for t, v in doc["majority"].items() if v is not None) + ".", ""]
    L += size_flags(doc, tasks, methods, p.seeds)
    letters = run_machines.machine_letters(doc)
    L += ["## Bytes and cost (first seed, at the chosen lr)", "",
          "| task | method | lr | target bytes | size setting | stored bytes | stored params | score | best epoch "
          "| train time | machine | peak memory | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for m in methods:
            c = cells[t][m][str(p.seeds[0])]
            r = c["result"]
            if r is None:
                L.append(f"| {t} | {LABELS[m]} | | | | | | | | | | | {c['status']} |")
                continue
            s = r["settings"]
            setting = (f"--budget {s['budget']}" if s.get("budget") is not None
                       else f"--sparsity {float(s['sparsity']):.4%}" if s.get("sparsity") else "--keep-bases 0.5")
            mem = r.get("cuda_peak_allocated") or r.get("peak_rss_bytes")
            note = []
            if r.get("resumed"):
                note.append("resumed: time and memory of its last part only")
            if r.get("trimmed"):
                note.append(f"trimmed from {rules.fmt_bytes(r['trimmed']['from_bytes'])}{_removed(r)}")
            if s.get("target_bytes"):
                note.append(f"{r['bytes'] / s['target_bytes']:.1%} of the target"
                            + (f", over by {r['bytes'] - s['target_bytes']} B" if r["bytes"] > s["target_bytes"] else ""))
            L.append(f"| {t} | {LABELS[m]} | {s['lr']:g} | {rules.fmt_bytes(s.get('target_bytes'))} | {setting} | "
                     f"{r['bytes']:,} B | {r.get('params', r.get('nnz'))} | {r['score']:.2f} | {best_epoch(m, r)} | "
                     f"{r['train_seconds'] / 60:.1f} min | {letters[r.get('machine')]} | {rules.fmt_bytes(mem)} | "
                     f"{'; '.join(note)} |")
    L += [""] + run_machines.machine_legend(letters)
    L += report.tuning(p, table, LABELS, suite.available, letters)
    failed = [(t, m, suite.failed(q.Run(t, m, lr, p.seeds[0]))) for t in tasks for m in methods for lr in p.grid(m)]
    failed = [(t, m, f) for t, m, f in failed if f]
    if failed:
        L += ["", "## Failed runs", ""] + [f"- {t} {LABELS[m]}: `{f['error'].strip().splitlines()[-1][:300]}`"
                                           for t, m, f in failed]
    L += ["", "Every run's settings and command are in the JSON file next to this one (`cells`)."]
    return "\n".join(L) + "\n"



def best_epoch(method: str, r: dict):
    """The epoch the stored diff comes from; '—' for basis alone, whose entry holds only the sparse phase it skips
    (epoch 0): its scale phases' best epoch is in the run's checkpoint history, not in the entry (dp_run)."""
    return "—" if METHODS[method][0] == "basis" and method not in DOUBLE else r.get("best_epoch")


def _removed(r: dict) -> str:
    t = r["trimmed"]
    return f", {1 - t['to_nnz'] / t['from_nnz']:.1%} of its entries" if t.get("to_nnz") and t.get("from_nnz") else ""


def size_flags(doc: dict, tasks, methods, seeds) -> list[str]:
    """Every seed's finished run whose bytes are not the trained file at its target: trimmed, over, or (basis+double)
    its sparse δ dropped (the best dev epoch of its δ phase was epoch 0, δ = 0: the file holds the scales only)."""
    lines = []
    for t in tasks:
        for m in methods:
            for seed in seeds:
                r = (doc["cells"][t][m].get(str(seed)) or {}).get("result")
                s = (r or {}).get("settings") or {}
                if not r or not s.get("target_bytes"):
                    continue
                flags = []
                if r.get("trimmed"):
                    flags.append(f"trimmed from {r['trimmed']['from_bytes']:,} B{_removed(r)}")
                if r["bytes"] > s["target_bytes"]:
                    flags.append(f"over the target by {r['bytes'] - s['target_bytes']:,} B "
                                 f"({r['bytes'] / s['target_bytes']:.1%})")
                if m in DOUBLE and r.get("best_epoch") == 0:
                    flags.append(f"sparse δ dropped (scales only, {r['bytes'] / s['target_bytes']:.1%} of the target)")
                if flags:
                    lines.append(f"- {t} {LABELS[m]} seed {seed} (lr {s['lr']:g}): {'; '.join(flags)}")
    if not lines:
        return []
    return ["Size flags (every seed, at its lr):", "", *lines, ""]
