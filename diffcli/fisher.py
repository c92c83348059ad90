"""The diagonal of the empirical Fisher over the shared tensors: the ranking of the Fisher mask and `--fill fisher`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from diffcli.trainloop import autocast, loader, move, zero_grads

if TYPE_CHECKING:
    import torch


def fisher_diagonal(model, flat, head: list, batches: Iterable[dict], device) -> "torch.Tensor":
    """Σ over batches of (dL/dθ)² for the flat parameters (dropout off): the empirical Fisher's diagonal.

    Batch-mean gradients, squared and summed: the ranking FISH masks use (Sung et al. 2021, eq. 2), with a
    batch in place of one example. Under DDP `model` is the wrapper, so every rank sums the same averaged
    gradients and gets the same scores.
    """
    import torch

    was_training = model.training
    model.eval()
    score = torch.zeros_like(flat.grad)
    try:
        for batch in batches:
            zero_grads(flat, head)
            with autocast(device):
                loss = model(**batch).loss
            loss.backward()
            flat.collect_grads_()
            score.addcmul_(flat.grad, flat.grad)
    finally:
        zero_grads(flat, head)
        model.train(was_training)
    return score


def fisher_scores(run, flat, head: list) -> "torch.Tensor":
    """The Fisher diagonal over `--fill-samples` training examples (all ranks together), at the model as it is now."""
    import math

    opts = run.opts
    batches = loader(run.train_set, opts.batch_size, opts.seed + 2, 0, run.dist)
    n = max(1, math.ceil(opts.fill_samples / (opts.batch_size * run.dist.world)))
    moved = (move(b, run.dev) for _, b in zip(range(n), batches))
    return fisher_diagonal(run.ddp if run.ddp is not None else run.tm.model, flat, head, moved, run.dev)
