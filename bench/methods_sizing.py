"""How the methods table sizes its runs to a byte target, and fits a trained file to it (recorded by every entry).

Every entry of the methods table records this file's hash (`MethodsSuite.scoring_code`): the sparsity or budget a run
trains at and the trim of its file come from here, so a change re-runs the runs it could change. The size memos are
keyed by this file's hash and the template's SHA-256 too.

- l0 and basis+double: `--sparsity` from a bisection on synthetic diffs (the basis run's file as the template: its
  header, head and, for basis+double, its basis records; uniformly random positions, small random values) packed
  exactly as the run's file will be. Trained masks cluster and pack smaller than random positions, so these runs
  train at OVERSIZE times that sparsity and a file over the target is re-projected to fit (exact top-k by bisection,
  no retraining: `bench_size_score.fit_density`); the table says how many entries each trim removed.
- swr: `--budget` (parameters) from the same bisection with the units taken cheapest first; the budget is the cost
  of the units that fit (the bottom of the plateau the bisection ends on: a run that fills its budget by gate
  probability then stores no more parameters than the synthetic file), and a file is never cut afterwards (a
  low-rank record cannot be trimmed): an overshoot is shown, not hidden.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

LORA_RANK = 8
# Trained files over random-position files of the same sparsity, measured on the full protocol (GPU runs of
# 2026-12-04, RTE): l0 at 1.25x packed to 1.054-1.101x its target, so 1.15x lands at ~0.97-1.01x and a trim
# removes ~1% of the entries, not 5-13%; basis+double at 1.0x packed to ~0.70x (its kept δ), so 1.4x.
OVERSIZE = {"l0": 1.15, "basis": 1.4}


def code_hash() -> str:
    """This file's content, for the size memos' names: a change to the sizing refits them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def oversized(trainer: str, sparsity: str) -> str:
    """The --sparsity a run trains at: the synthetic fit's, times OVERSIZE for its trainer."""
    return f"{float(sparsity) * OVERSIZE[trainer]:.6g}"


def fit_to_target(s: dict, diff, packed_bytes: int) -> tuple[object, dict]:
    """A sparse run's diff over its byte target, re-projected (exact top-k, no retraining) to the largest density
    that fits; what the trim did, for the entry."""
    target = s.get("target_bytes")
    if target is None or packed_bytes <= target or s["dp_method"] not in OVERSIZE:
        return diff, {}
    from bench_size_score import fit_density

    from diffcli import artifact

    fitted, density = fit_density(diff, target, "fp16", artifact.VERSION, steps=16)
    # a density above 0 was packed within the target by the bisection; only its fallback (density 0) is unchecked
    if fitted.nnz >= diff.nnz or (density <= 0 and len(artifact.pack(fitted, "fp16")) > target):
        return diff, {}  # nothing to cut (scales and head alone are over): the file stays as trained, shown 'over'
    return fitted, {"trimmed": {"from_bytes": packed_bytes, "from_nnz": diff.nnz, "to_nnz": fitted.nnz,
                                "to_density": density}}


def lora_adapter_bytes(task: str, model_ref: str) -> int:
    """The fp16 safetensors bytes of LoRA r=8 (query, value) + the head on this task's model (no training)."""
    from baselines import BaselineConfig, head_modules, load_model, lora_file_bytes, lora_shapes

    from diffcli import tasks, weights

    spec = tasks.task_spec(task)
    model = load_model(weights.resolve_model(model_ref), spec)
    head = [n for n, _ in model.named_parameters() if n.startswith(("classifier", "score"))]
    cfg = BaselineConfig(method="lora", task=task, model=model_ref, lora_r=LORA_RANK, store="fp16-trained")
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
        # the bisection ends on the top of a plateau (the next unit costs thousands): the budget is what the units
        # that fit cost, so a run that fills it by gate probability stores no more parameters than this file
        budget = _swr_cost(base, lo)
        if budget <= 0:  # `train --budget 0` is refused: say so here, before a lane saves the size
            raise ValueError(f"no swr unit fits in {target_bytes} B next to {template.name}'s header and head")
        return {"budget": budget, "planned_bytes": _packed(_synthetic_swr(base, budget))}
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


def _swr_units(diff, budget: int):
    from diffcli.methods.swr import choose, plan_units

    units = plan_units({n: t.shape for n, t in diff.tensors.items() if t.is_float}, LORA_RANK)
    return units, choose(units, [0.5] * len(units), budget)


def _swr_cost(diff, budget: int) -> int:
    """The parameters of the units the cheapest-first choice takes under `budget`."""
    units, chosen = _swr_units(diff, budget)
    return sum(u.cost for u, c in zip(units, chosen) if c)


def _synthetic_swr(diff, budget: int):
    """swr's file at this budget: its units taken cheapest first (knapsack, never over), random factors, its meta."""
    import torch

    from diffcli import lowrank
    from diffcli.diff import TensorDiff
    out = _shared(diff, keep_bases=False)
    units, chosen = _swr_units(out, budget)
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


