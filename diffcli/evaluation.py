"""Evaluation of a task model on a task's splits, scored by its task type (`task_types`); the batched forward
passes are `prediction`'s."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffcli.errors import InvalidValueError
from diffcli.prediction import forward_batches, pick_device, predict

__all__ = ["evaluate", "forward_batches", "pick_device", "predict"]  # the last three: the library's names, kept here

if TYPE_CHECKING:
    import torch

    from diffcli.tasks import TaskData


def evaluate(model, tokenizer, task_data: "TaskData", *, max_seq_length: int = 128, batch_size: int = 64,
             device: "torch.device | str | None" = None) -> dict[str, dict[str, float]]:
    """Metrics of `model` on every evaluation split of task_data, by its task type: {split: {metric: value}}."""
    from diffcli.task_types import for_spec

    if not task_data.eval:
        raise InvalidValueError("no evaluation data", hint="pass --validation-file")
    if device is not None:
        model.to(device)
    kind = for_spec(task_data.spec)
    return {split: kind.evaluate(model, tokenizer, examples, task_data.spec, max_seq_length=max_seq_length,
                                 batch_size=batch_size)
            for split, examples in task_data.eval.items()}
