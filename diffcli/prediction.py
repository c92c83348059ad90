"""Batched, no-grad forward passes of a model over encoded examples, sorted by length (the primitives that every
task type scores with; `evaluation.evaluate` picks the task type)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from diffcli.tasks import Example


def pick_device() -> "torch.device":
    """cuda when a GPU is visible, else cpu."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model) -> "torch.device":
    import torch

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def predict(model, tokenizer, examples: Sequence["Example"], *, max_seq_length: int = 128, batch_size: int = 64,
            device: "torch.device | str | None" = None) -> tuple["np.ndarray", "np.ndarray"]:
    """Logits (n, num_labels) and labels (n,) for examples, in their order.

    Examples are batched by similar length (less padding on CPU) and put back in input order. `device`
    moves the model there; None keeps the model where it is.
    """
    import numpy as np

    from diffcli.tasks import encode, padding_id

    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is not None:
        model.to(device)
    data = encode(examples, tokenizer, max_seq_length, padding_id(getattr(model, "config", None)))
    rows: list[int] = []
    chunks: list[np.ndarray] = []
    for idx, _batch, logits in forward_batches(model, data, batch_size):
        rows += idx
        chunks.append(logits.float().cpu().numpy())
    labels = data.labels.numpy()
    if not chunks:
        return np.zeros((0, getattr(getattr(model, "config", None), "num_labels", 1)), np.float32), labels
    sorted_logits = np.concatenate(chunks)
    logits = np.empty_like(sorted_logits)
    logits[rows] = sorted_logits
    return logits, labels


def forward_batches(model, dataset, batch_size: int) -> Iterator[tuple[list[int], dict, "torch.Tensor"]]:
    """(dataset indices, batch on the model's device, logits) over length-sorted batches, without gradients."""
    import numpy as np
    import torch

    if batch_size < 1:
        raise InvalidValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _model_device(model)
    order = np.argsort(np.asarray(dataset.lengths, dtype=np.int64), kind="stable").tolist()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                batch = {k: v.to(device) for k, v in dataset.collate([dataset[i] for i in rows]).items()}
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                yield rows, batch, model(**inputs).logits
    finally:
        model.train(was_training)
