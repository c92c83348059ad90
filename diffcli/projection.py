"""Magnitude projection: keep exactly k = round(S·N) largest-|δ| entries, globally or per tensor."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from diffcli import checkpoint
from diffcli.diff import Diff, TensorDiff, nonfinite
from diffcli.errors import FormatError, InvalidValueError, NotFoundError
from diffcli.outputs import check_output

if TYPE_CHECKING:
    import torch

SCOPES = ("global", "per-tensor")


def parse_sparsity(text: str | float) -> float:
    """'0.5%' or '0.005' → 0.005; the fraction of budget entries a diff keeps, in (0, 1]."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InvalidValueError(f"sparsity {raw!r} is not a number like 0.5% or 0.005") from None
    if not math.isfinite(value) or value <= 0 or value > 1:
        hint = f"did you mean {raw}%?" if not raw.endswith("%") and 1 < value <= 100 else None
        raise InvalidValueError(f"sparsity {raw!r} must lie in (0, 100%]", hint=hint)
    return value


@dataclass
class Allocation:
    name: str
    numel: int
    nonzero: int
    kept: int


@dataclass
class Projection:
    diff: Diff
    sparsity: float
    scope: str
    n: int
    k: int
    kept: int
    allocation: list[Allocation] = field(default_factory=list)


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise InvalidValueError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")


def budget(sparsity: float, n: int) -> int:
    """k = round(S·N), at least 1 when N > 0."""
    return max(1, int(round(sparsity * n))) if n else 0


def _largest_remainder(quotas: list[float], total: int, caps: list[int]) -> list[int]:
    """Integer allocation summing to `total` (≤ sum(caps)), as close as possible to `quotas`."""
    alloc = [min(int(math.floor(q)), c) for q, c in zip(quotas, caps)]
    rest = total - sum(alloc)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while rest > 0:
        progressed = False
        for i in order:
            if rest and alloc[i] < caps[i]:
                alloc[i] += 1
                rest -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def _top_k(values: "torch.Tensor", k: int) -> "torch.Tensor":
    """Boolean mask of the k largest |values|; ties broken by position (earlier wins)."""
    import torch

    mags = values.abs()
    if k >= mags.numel():
        return torch.ones_like(mags, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(mags, dtype=torch.bool)
    thr = torch.topk(mags, k, sorted=False).values.min()
    above = mags > thr
    tie = mags == thr
    need = k - int(above.sum())
    return above | (tie & (torch.cumsum(tie.to(torch.int64), 0) <= need))


def project(diff: Diff, sparsity: float, scope: str = "global") -> Projection:
    """Project `diff` to exactly k nonzero entries (fewer only if δ has fewer nonzeros)."""
    import torch

    _check_scope(scope)
    names = sorted(n for n, t in diff.tensors.items() if t.is_float)  # canonical order for ties
    sparse = {n: diff.tensors[n].sparse() for n in names}
    for name, s in sparse.items():  # zeros in δ are never kept
        if nonfinite(s.values):  # a NaN threshold would keep nothing (and say nothing)
            raise FormatError(f"δ of {name!r} holds NaN or infinite values", hint="the finetuned model is broken")
        keep = s.values != 0
        if not bool(keep.all()):
            s.indices, s.values = s.indices[keep], s.values[keep]
    n_total = diff.budget_numel
    k = budget(sparsity, n_total)
    if scope == "global":
        flat = torch.cat([sparse[n].values for n in names]) if names else torch.zeros(0)
        mask = _top_k(flat, k)
        parts = torch.split(mask, [sparse[n].values.numel() for n in names])
        masks = dict(zip(names, parts))
    else:
        caps = [sparse[n].values.numel() for n in names]
        quotas = [sparsity * diff.tensors[n].numel for n in names]
        scale = k / sum(quotas) if sum(quotas) else 0.0
        alloc = _largest_remainder([q * scale for q in quotas], min(k, sum(caps)), caps)
        masks = {n: _top_k(sparse[n].values, a) for n, a in zip(names, alloc)}
    tensors: dict[str, TensorDiff] = {}
    allocation: list[Allocation] = []
    for name, td in diff.tensors.items():
        if name not in masks:
            tensors[name] = td
            continue
        s, m = sparse[name], masks[name]
        tensors[name] = TensorDiff(td.base_name, td.shape, td.dtype, td.digest,
                                   s.values[m].contiguous(), s.indices[m].contiguous())
        allocation.append(Allocation(name, td.numel, int(s.values.numel()), int(m.sum())))
    meta = dict(diff.meta)
    meta["projection"] = {"sparsity": sparsity, "scope": scope, "k": k, "n": n_total}
    # basis scales (`--method basis`) are not δ entries: they stay as they are, outside k
    out = Diff(tensors, dict(diff.extras), diff.config, diff.base_ref, diff.base_fingerprint, meta, dict(diff.bases))
    kept = sum(a.kept for a in allocation)
    return Projection(out, sparsity, scope, n_total, k, kept, allocation)


def prune(source: str | Path, sparsity: float, out: str | Path, *, base: str | None = None,
          scope: str = "global", force: bool = False,
          on_tensor: Callable[[str], None] | None = None) -> Projection:
    """`diffprune prune`: read a checkpoint or a packed .diff (or a full finetune with `base`), project, save."""
    from diffcli.extract import extract_diff

    _check_scope(scope)
    check_output(Path(out), force)
    src = Path(source)  # a checkpoint, or a packed .diff (a pipe or device: load_diff refuses it, exit 4)
    if checkpoint.is_checkpoint(source) or (src.exists() and not src.is_dir()):
        if base is not None:
            raise InvalidValueError(f"{source} is a diff; --base is only for full finetuned models")
        from diffcli.sources import load_diff

        diff = load_diff(source, as_trained=False)
    else:
        if base is None:
            if not Path(source).exists():
                raise NotFoundError(f"{source} does not exist")
            raise InvalidValueError(f"{source} is not a diff checkpoint; pass --base to extract a diff "
                                    "from a full finetuned model")
        diff = extract_diff(base, str(source), on_tensor=on_tensor)
    bad = diff.nonfinite_extra
    if bad is not None:  # a diverged head: refused here as apply and pack refuse it, not kept for them to find
        raise FormatError(f"extra tensor {bad!r} of {source} has non-finite values (NaN or Inf)")
    result = project(diff, sparsity, scope)
    checkpoint.save(result.diff, out, force=force)
    return result
