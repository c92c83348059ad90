"""From trained flat tensors to a `Diff`: the exact top-k projection of δ, the budget fill, the final diff."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from diffcli.taskmodel import TaskModel


def dense_diff(tm: TaskModel, flat, delta: "torch.Tensor"):
    """The deterministic δ as a Diff of dense per-tensor views (no copy), for `projection.project`."""
    from diffcli.diff import Diff, TensorDiff

    tensors = {}
    for name, seg, shape in zip(flat.names, flat.segments(delta.cpu()), flat.shapes):
        dtype, digest = tm.base_info[name]
        tensors[name] = TensorDiff(tm.base_names[name], shape, dtype, digest, seg.view(shape))
    return Diff(tensors, {}, {}, "", "")


def project(tm: TaskModel, flat, delta: "torch.Tensor", sparsity: float):
    """Exact global top-k of |δ| → sorted flat positions and their values."""
    import torch

    from diffcli.projection import project as project_diff

    proj = project_diff(dense_diff(tm, flat, delta), sparsity)
    idx, vals = [], []
    for name, a in zip(flat.names, flat.offsets):
        td = proj.diff.tensors[name]
        idx.append(td.indices + a)
        vals.append(td.values)
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    values = torch.cat(vals) if vals else torch.zeros(0)
    info = {"sparsity": sparsity, "k": proj.k, "n": proj.n, "kept": proj.kept}
    return index, values, info



def fill_budget(score: "torch.Tensor", index: "torch.Tensor", values: "torch.Tensor", need: int):
    """Add the `need` entries outside the mask with the largest positive `score` to it, starting at δ = 0.

    When the L0 phase ends below the target density, δ has fewer than k nonzeros; the fixed-mask phase then
    also trains the entries ranked next (`--fill`), so that the diff uses its whole budget. `score` is consumed.
    """
    import torch

    with torch.no_grad():
        score[index.to(score.device)] = 0
        top = torch.topk(score, min(need, score.numel()), sorted=False)
        extra = top.indices[top.values > 0].cpu()
    del score
    merged = torch.cat([index.cpu(), extra])
    order = torch.argsort(merged)
    vals = torch.cat([values.cpu(), torch.zeros(extra.numel(), dtype=values.dtype)])
    return merged[order].contiguous(), vals[order].contiguous(), int(extra.numel())


def build_diff(tm: TaskModel, flat, index: "torch.Tensor", best: dict, *, model_ref: str, meta: dict):
    """The shared Diff: sparse δ per gated tensor, zero δ for untouched shared tensors, the head as extras."""
    import torch

    from diffcli.diff import Diff, TensorDiff
    from diffcli.weights import WeightStore, dtype_name, fingerprint_of, tensor_digest

    values = best["best/values"].cpu()
    tensors: dict[str, TensorDiff] = {}
    cuts = torch.searchsorted(index.cpu(), torch.tensor(flat.offsets, dtype=torch.int64)).tolist()
    for name, shape, a, lo, hi in zip(flat.names, flat.shapes, flat.offsets, cuts, cuts[1:]):
        dtype, digest = tm.base_info[name]
        v = values[lo:hi].clone()
        i = index[lo:hi].cpu() - a
        keep = v != 0
        tensors[name] = TensorDiff(tm.base_names[name], shape, dtype, digest, v[keep].contiguous(),
                                   i[keep].contiguous())
    extras: dict[str, torch.Tensor] = {}
    store = None
    state = tm.model.state_dict()
    gated = set(flat.names)
    head = set(tm.head)
    for name, t in state.items():
        if name in gated:
            continue
        if name in head:
            extras[name] = best[f"best/head/{name}"].detach().cpu().clone().contiguous()
            continue
        bname = tm.base_names.get(name)
        t = t.detach().cpu()
        if bname is not None:
            store = store or WeightStore(tm.base_dir)
            b = store[bname]
            if tuple(b.shape) == tuple(t.shape) and torch.equal(b.to(t.dtype), t):
                tensors[name] = TensorDiff.zeros(bname, tuple(b.shape), dtype_name(b.dtype), tensor_digest(b))
                continue
        extras[name] = t.clone().contiguous()
    cfg = getattr(tm.model, "config", None)  # a transformers model's; a plain torch module has none
    config = json.loads(cfg.to_json_string(use_diff=False)) if hasattr(cfg, "to_json_string") else {}
    config["architectures"] = [type(tm.model).__name__]
    fp = fingerprint_of({td.base_name: td.digest for td in tensors.values()})
    return Diff(tensors, extras, config, model_ref, fp, meta)



def split_index(layout, index: "torch.Tensor") -> dict[str, "torch.Tensor"]:
    """Sorted flat positions → {tensor name: sorted positions within it} (every tensor of the layout, maybe empty)."""
    import torch

    index = index.cpu()
    cuts = torch.searchsorted(index, torch.tensor(layout.offsets, dtype=torch.int64)).tolist()
    return {name: index[lo:hi] - a for name, a, lo, hi in zip(layout.names, layout.offsets, cuts, cuts[1:])}


def join_index(layout, mask: dict[str, "torch.Tensor"]) -> "torch.Tensor":
    """{tensor name: positions within it} → sorted flat positions in the layout's order."""
    import torch

    parts = [mask[n].cpu().to(torch.int64) + a for n, a in zip(layout.names, layout.offsets) if n in mask]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
