"""The task model a diff is trained on: the base under a new head, split into shared (diffed) and new tensors.

Task models are built by their task type (`diffcli.task_types.get(name).build`); `attach_base` splits any model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffcli.errors import DataError


@dataclass
class TaskModel:
    """The task model with its tokenizer and how its tensors relate to the base."""

    model: Any
    tokenizer: Any
    base_dir: Path
    gated: list[str]                       # parameter names trained as θ₀ + δ
    head: list[str]                        # parameter names trained densely (not in the base)
    base_names: dict[str, str]             # target name → base name, for every shared tensor
    base_info: dict[str, tuple[str, str]] = field(default_factory=dict)  # gated name → (dtype, digest)
    tied: dict[str, str] = field(default_factory=dict)  # alias → gated name (an LM head tied to the embeddings)


def attach_base(model, base_dir: Path, tokenizer=None) -> TaskModel:
    """Split any model's parameters into shared ones (the base has a float tensor of that name and shape, copied in
    as θ₀) and new ones (trained densely); the names are matched across one leading prefix."""
    import torch

    from diffcli.weights import WeightStore, dtype_name, is_float, match_names, tensor_digest

    store = WeightStore(base_dir)
    names = list(model.state_dict().keys())
    mapping = match_names(store.names(), names)
    params = dict(model.named_parameters())
    gated, head, info = [], [], {}
    for name, p in params.items():
        bname = mapping.get(name)
        if bname is not None and store.shape(bname) == tuple(p.shape) and is_float(store.dtype(bname)):
            base_t = store[bname]
            gated.append(name)
            info[name] = (dtype_name(base_t.dtype), tensor_digest(base_t))
            with torch.no_grad():  # θ₀ is the base exactly as stored (from_pretrained may have cast it)
                p.copy_(base_t.to(p.dtype))
        else:
            head.append(name)
    if not gated:
        raise DataError(f"the model shares no parameters with the base {base_dir}",
                        hint="pass the checkpoint the model's weights were loaded from")
    first = {id(p): n for n, p in params.items()}
    tied = {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
    return TaskModel(model, tokenizer, Path(base_dir), gated, head, mapping, info, tied)
