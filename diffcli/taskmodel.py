"""The task model a diff is trained on: the base under a new head, split into shared (diffed) and new tensors."""

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


def build_task_model(base_dir: Path, spec, seed: int) -> TaskModel:
    """AutoModelForSequenceClassification on the base, split into gated (shared) and dense (new) parameters."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kw["problem_type"] = "regression"
    else:
        kw["problem_type"] = "single_label_classification"
        kw["id2label"] = {i: str(n) for i, n in enumerate(spec.labels)}
        kw["label2id"] = {str(n): i for i, n in enumerate(spec.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    return attach_base(model, base_dir, tokenizer)


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
    return TaskModel(model, tokenizer, Path(base_dir), gated, head, mapping, info)
