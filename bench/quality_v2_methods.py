"""The methods table of quality v2 (issue 10): l0, swr and basis (alone and double-pruned) at matched .diff bytes.

Same harness as the quality table (`quality_v2.Suite`: equal compute, lr tuned on the first seed, per-run cache,
lanes, --quick); only the methods and their sizes differ. `basis` (default --keep-bases) runs first: its packed
.diff is B_basis, "basis scaling's own size". Every other run is sized to a byte target before it trains:

- `@basis` runs fit B_basis, `@lora` runs fit LoRA's adapter: the fp16 safetensors file of LoRA r=8 on query and
  value plus the head, exactly as the quality table's lora-qv run stores it (`baselines.lora_file_bytes`).
- l0 and basis+double: `--sparsity` from a bisection on synthetic diffs (the basis run's file as the template:
  its header, head and, for basis+double, its basis records; uniformly random positions, small
  random values) packed exactly as the run's file will be. Random positions compress worse than trained masks, so
  a trained file comes out under its target (l0 on the quick protocol: 56-95% of it). So l0 trains at
  L0_OVERSIZE times that sparsity and a file over the target is re-projected to fit (exact top-k by bisection, no
  retraining: `bench_size_score.fit_density`, as bench_size_score does at LoRA's bytes); the table says so.
  basis+double is not oversized: its sparse part is not cut afterwards.
- swr: `--budget` (parameters) from the same bisection, the units taken cheapest first (dense biases and
  LayerNorms before low-rank matrices: the most bytes per parameter), so the cap errs on the small side; the
  file is never cut afterwards (a low-rank record cannot be trimmed), so an overshoot is shown, not hidden.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

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
LORA_RANK = 8
L0_OVERSIZE = 1.25  # l0 trains at 1.25x the synthetic fit's sparsity, then is re-projected to its byte target
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
        with at least one scale epoch (a --quick E of 2 runs 3 passes: 0 would leave the trainer's default of 3)."""
        first = self.l0_epochs
        if method in DOUBLE:
            fixed = max(1, (self.epochs - first) // 2)
            return max(1, self.epochs - 2 * fixed), fixed
        return first, self.epochs - first


class MethodsSuite(q.Suite):
    """quality_v2.Suite with this table's methods: every sized run waits for the basis run's .diff."""

    table = "methods"
    scoring_code = q.SCORING_CODE + ("bench/bench_size_score.py",)  # fit_density trims the l0 files

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
        if trainer == "l0":  # trained masks pack smaller than the random ones: train more, trim to the target
            size = {**size, "fitted_sparsity": size["sparsity"],
                    "sparsity": f"{float(size['sparsity']) * L0_OVERSIZE:.6g}"}
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
        own = file_size(Path(hit.get("diff_path") or "")) == hit.get("bytes")
        return hit if own or kept_copy_fits(hit, lambda rel: file_size(self.store / rel)) else None

    def reference(self, task: str) -> dict | None:
        """The basis run every size refers to: first seed, middle lr (as lora-all's dp-l0 reference)."""
        g = LR_GRID["basis"]
        return self.cached(q.Run(task, "basis", g[len(g) // 2], self.p.seeds[0]))

    def lora_bytes(self, task: str) -> int:
        """LoRA r=8 on query+value + head as fp16 safetensors: the quality table's lora-qv file, computed exactly."""
        key = ("lora", task)
        if key not in self._sizes:
            self._sizes[key] = {"bytes": self._memo(f"lora-bytes-{task}-{self.p.model.replace('/', '_')}",
                                                    lambda: {"bytes": lora_adapter_bytes(task, self.p)})["bytes"]}
        return self._sizes[key]["bytes"]

    def keep(self, run: q.Run, result: dict, run_dir: Path) -> dict:
        """A basis run's .diff, kept beside the entries: the runs sized to it read it as their template, in later
        sessions too (the run folder is scratch; a basis file is ~22 kB)."""
        if METHODS[run.method][1] is not None or not Path(result.get("diff_path", "")).is_file():
            return {}
        kept = self.store / "refs" / f"{run_dir.name}.diff"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result["diff_path"], kept)
        return {"kept_diff": kept.relative_to(self.store).as_posix()}

    def size(self, task: str, method: str, target_bytes: int, ref: dict) -> dict:
        """The --sparsity (l0, basis+double) or --budget (swr) whose file fits target_bytes; memoised on disk."""
        key = (task, method, target_bytes, ref["finished"])
        if key not in self._sizes:
            name = f"size-{task}-{method}-{target_bytes}-{_digest(ref)}"
            template = ref["diff_path"]
            if not Path(template).is_file() and ref.get("kept_diff"):  # another session's scratch: the kept copy
                template = str(self.store / ref["kept_diff"])
            self._sizes[key] = self._memo(name, lambda: fit_size(Path(template), METHODS[method][0], method in DOUBLE,
                                                                  target_bytes))
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
        """An l0 diff over its byte target: re-projected (exact top-k, no retraining) to the largest density that fits."""
        target = s.get("target_bytes")
        if target is None or packed_bytes <= target or s["dp_method"] != "l0":
            return diff, {}
        from bench_size_score import fit_density

        from diffcli import artifact

        fitted, density = fit_density(diff, target, "fp16", artifact.VERSION, steps=16)
        return fitted, {"trimmed": {"from_bytes": packed_bytes, "from_nnz": diff.nnz, "to_density": density}}


def _digest(ref: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(ref.get("settings"), sort_keys=True).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------------------ sizing
def lora_adapter_bytes(task: str, p: q.Protocol) -> int:
    """The fp16 safetensors bytes of LoRA r=8 (query, value) + the head on this task's model (no training)."""
    from baselines import BaselineConfig, head_modules, load_model, lora_file_bytes, lora_shapes

    from diffcli import tasks, weights

    spec = tasks.task_spec(task)
    model = load_model(weights.resolve_model(p.model), spec)
    head = [n for n, _ in model.named_parameters() if n.startswith(("classifier", "score"))]
    cfg = BaselineConfig(method="lora", task=task, model=p.model, lora_r=LORA_RANK, store="fp16-trained")
    assert head_modules(head), "the task model has no new head"
    return lora_file_bytes(lora_shapes(model, cfg, head), LORA_RANK)


def fit_size(template: Path, trainer: str, keep_bases: bool, target_bytes: int) -> dict:
    """Bisect the size parameter whose synthetic file (the template's header and head) packs to ≤ target_bytes."""
    from diffcli import artifact

    base = artifact.load(template)
    if trainer == "swr":
        lo, hi = 0, base.budget_numel  # parameters
        while hi - lo > max(1, lo // 1000):
            mid = (lo + hi + 1) // 2
            if _packed(_synthetic_swr(base, mid)) <= target_bytes:
                lo = mid
            else:
                hi = mid - 1
        return {"budget": lo, "planned_bytes": _packed(_synthetic_swr(base, lo))}
    lo, hi = 0.0, 0.05  # fraction of N
    for _ in range(20):
        mid = (lo + hi) / 2
        if _packed(_synthetic_sparse(base, mid, keep_bases)) <= target_bytes:
            lo = mid
        else:
            hi = mid
    if lo <= 0:
        raise ValueError(f"no sparse entry fits in {target_bytes} B next to {template.name}'s header and head")
    return {"sparsity": f"{lo:.6g}", "planned_bytes": _packed(_synthetic_sparse(base, lo, keep_bases))}


def _packed(diff) -> int:
    from diffcli import artifact

    return len(artifact.pack(diff, "fp16"))


def _shared(diff, keep_bases: bool):
    """The template emptied: every shared tensor with no entry, the head and meta kept (a trained run's meta is of
    the same kind: options, history, results), basis records kept or dropped."""
    from dataclasses import replace

    from diffcli.diff import TensorDiff

    tensors = {n: TensorDiff.zeros(t.base_name, t.shape, t.dtype, t.digest) for n, t in diff.tensors.items()}
    return replace(diff, tensors=tensors, bases=dict(diff.bases) if keep_bases else {}, meta=dict(diff.meta))


def _synthetic_sparse(diff, density: float, keep_bases: bool):
    """k = round(density·N) uniformly random positions over the float tensors, values ~ N(0, 1e-3)."""
    import torch

    out = _shared(diff, keep_bases)
    names = [n for n, t in out.tensors.items() if t.is_float]
    sizes = [out.tensors[n].numel for n in names]
    n_all = sum(sizes)
    k = round(density * n_all)
    gen = torch.Generator().manual_seed(0)
    flat = torch.randperm(n_all, generator=gen)[:k].sort().values
    start = 0
    for name, size in zip(names, sizes):
        lo, hi = torch.searchsorted(flat, start), torch.searchsorted(flat, start + size)
        idx = flat[lo:hi] - start
        td = out.tensors[name]
        values = torch.randn(idx.numel(), generator=gen) * 1e-3
        out.tensors[name] = type(td)(td.base_name, td.shape, td.dtype, td.digest, values, idx)
        start += size
    return out


def _synthetic_swr(diff, budget: int):
    """swr's file at this budget: its units taken cheapest first (knapsack, never over), random factors, its meta."""
    import torch

    from diffcli import lowrank
    from diffcli.diff import TensorDiff
    from diffcli.methods.swr import choose, plan_units

    out = _shared(diff, keep_bases=False)
    units = plan_units({n: t.shape for n, t in out.tensors.items() if t.is_float}, LORA_RANK)
    chosen = choose(units, [0.5] * len(units), budget)
    gen = torch.Generator().manual_seed(0)
    for u, c in zip(units, chosen):
        if not c:
            continue
        td = out.tensors[u.name]
        if u.kind == "lowrank":
            b = torch.randn(u.shape[0], LORA_RANK, generator=gen) * 1e-2
            a = torch.randn(LORA_RANK, u.shape[1], generator=gen) * 1e-2
            out.tensors[u.name] = lowrank.make(td.base_name, td.shape, td.dtype, td.digest, b, a)
        else:
            dense = torch.randn(u.shape, generator=gen) * 1e-3
            out.tensors[u.name] = TensorDiff(td.base_name, td.shape, td.dtype, td.digest, dense).sparse()
    out.meta = {**out.meta, "units": [{"tensor": u.name, "kind": u.kind, "shape": list(u.shape), "cost": u.cost,
                                       "probability": round(0.5 + 0.4 * math.sin(i), 6), "chosen": c}
                                      for i, (u, c) in enumerate(zip(units, chosen))]}
    return out


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
          "- Learning rates (the fixed-phase `--fixmask-lr`; first-phase lrs are the trainer's defaults): "
          + "; ".join(f"{LABELS[m]} {', '.join(f'{x:g}' for x in p.grid(m))}" for m in methods)
          + f". Chosen on seed {p.seeds[0]}'s best dev score, as in the quality table.",
          "- Bytes: every size is the packed fp16 `.diff` file (`artifact.write`, header included), scored on base + "
          "that file. B_basis is the basis run's file (first seed, middle lr). LoRA's adapter bytes: LoRA r=8 on "
          "query+value plus the head as fp16 safetensors, the file the quality table's lora-qv run stores, computed "
          "exactly from the shapes (`baselines.lora_file_bytes`, no training).",
          "- Sizing: l0 and basis+double get `--sparsity` from a bisection on synthetic files (the basis file's "
          "header and head, plus its basis records for basis+double; uniformly random positions), packed like the "
          "run's own; trained masks cluster and compress better, so a file lands under the target. l0 therefore "
          f"trains at {L0_OVERSIZE}x that sparsity and a file over the target is re-projected to fit (exact top-k by "
          "bisection, no retraining; marked 'trimmed'); basis+double is not cut. "
          "swr gets `--budget` from the same bisection with its units taken cheapest first (the most bytes per "
          "parameter), so the cap errs small; an swr file is never cut (marked 'over' if above the target).",
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
                note.append(f"trimmed from {rules.fmt_bytes(r['trimmed']['from_bytes'])}")
            if s.get("target_bytes"):
                note.append(f"{r['bytes'] / s['target_bytes']:.1%} of the target"
                            + (f", over by {r['bytes'] - s['target_bytes']} B" if r["bytes"] > s["target_bytes"] else ""))
            L.append(f"| {t} | {LABELS[m]} | {s['lr']:g} | {rules.fmt_bytes(s.get('target_bytes'))} | {setting} | "
                     f"{r['bytes']:,} B | {r.get('params', r.get('nnz'))} | {r['score']:.2f} | {r.get('best_epoch')} | "
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

