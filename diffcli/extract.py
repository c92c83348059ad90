"""Extract a dense diff δ = θ − θ₀ from a full finetuned model (folder or in-memory state) and its base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping

from diffcli.diff import Diff, TensorDiff
from diffcli.errors import BaseMismatchError
from diffcli.weights import (WeightStore, dtype_name, fingerprint_of, is_float, load_config, match_names,
                             resolve_model, tensor_digest)

if TYPE_CHECKING:
    import torch


def diff_between(base: WeightStore, target: Mapping[str, "torch.Tensor"] | WeightStore, *, config: dict,
                 base_ref: str, meta: dict | None = None,
                 on_tensor: Callable[[str], None] | None = None) -> Diff:
    """δ for every target tensor the base shares (dense, float32); the rest become dense extras.

    A shared tensor whose shape changed (resized embeddings) or a non-float tensor that changed
    is stored whole as an extra: it cannot be expressed as an additive diff.
    """
    import torch

    target_names = list(target.names() if isinstance(target, WeightStore) else target.keys())
    mapping = match_names(base.names(), target_names)
    tensors: dict[str, TensorDiff] = {}
    extras: dict[str, torch.Tensor] = {}
    for name in target_names:
        value = target[name]
        if on_tensor:
            on_tensor(name)
        bname = mapping.get(name)
        if bname is None:
            extras[name] = value.detach().clone().contiguous()
            continue
        b = base[bname]
        if tuple(b.shape) != tuple(value.shape):
            extras[name] = value.detach().clone().contiguous()
            continue
        dtype = dtype_name(b.dtype)
        digest = tensor_digest(b)
        if is_float(dtype):
            delta = value.detach().to(torch.float32) - b.to(torch.float32)
            tensors[name] = TensorDiff(bname, tuple(b.shape), dtype, digest, delta.contiguous())
        elif torch.equal(value, b):
            tensors[name] = TensorDiff.zeros(bname, tuple(b.shape), dtype, digest)
        else:
            extras[name] = value.detach().clone().contiguous()
    if not tensors and target_names:  # all extras: a diff of nothing, which every base would then "verify"
        raise BaseMismatchError(f"no tensor of the finetuned model matches a tensor of base {base_ref} by name "
                                "and shape", hint="pass the base it was finetuned from as --base")
    fp = fingerprint_of({t.base_name: t.digest for t in tensors.values()})
    return Diff(tensors, extras, config, base_ref, fp, dict(meta or {}))


def extract_diff(base_ref: str, finetuned_ref: str, on_tensor: Callable[[str], None] | None = None) -> Diff:
    """Dense diff of a full finetuned Hugging Face folder against its base (`prune SOURCE --base`)."""
    base = WeightStore(resolve_model(base_ref))
    ft_dir = resolve_model(finetuned_ref)
    ft = WeightStore(ft_dir)
    return diff_between(base, ft, config=load_config(ft_dir), base_ref=base_ref,
                        meta={"source": str(finetuned_ref)}, on_tensor=on_tensor)
