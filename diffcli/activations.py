"""Activation checkpointing of a model's layers: keep fewer activations for backward, recompute them instead.

A sparse fixed-mask run holds the model (4P bytes) and the activations A; full finetuning adds AdamW's moments
and the gradients (12P + A). Below (4P + A)/(12P + A) only fewer saved activations help: a checkpointed layer
keeps its input (b·s·h floats) and recomputes the rest in backward, one extra forward of that layer. Checkpointing
every n-th layer trades the two: A·(1 − 1/n) stays, the step grows by about a third of a forward / n.
The recompute replays the layer's dropout with the saved RNG state, so the gradients are the same.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch


def checkpoint_activations(model: "torch.nn.Module", every: int = 1) -> int:
    """Checkpoint every `every`-th layer of a transformers model (0: none); returns how many layers are checkpointed."""
    if type(every) is not int or every < 0:
        raise InvalidValueError(f"--activation-checkpointing must be a whole number ≥ 0 (every n-th layer), got {every}")
    if every == 0:
        return 0
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InvalidValueError(f"{type(model).__name__} does not support activation checkpointing",
                                hint="train without --activation-checkpointing")
    kwargs = {"use_reentrant": False}  # the reentrant variant drops gradients of inputs that do not require grad
    enable = getattr(model, "activation_checkpointing_enable", None)
    layers = checkpointable_layers(model)
    if enable is not None and "every_n_layers" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every)
    elif every > 1 and not layers:
        raise InvalidValueError(f"checkpointing every {every}-th layer needs transformers ≥ 4.52 (per-layer "
                                "checkpointing)", hint="pass --activation-checkpointing 1, or upgrade transformers")
    else:  # older transformers: every layer, then switch off all but every n-th where layers are separate units
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % every == 0
    return sum(1 for layer in layers if layer.gradient_checkpointing) if layers else 1


def checkpointable_layers(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The layers transformers checkpoints one by one (`GradientCheckpointingLayer`), in the model's order."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52: the encoder loop checkpoints all its layers or none
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
