"""The empirical Fisher over the shared tensors, for `--fill fisher` and the Fisher mask: one implementation.

`masks.fisher_scores` sums the squared batch gradients through per-tensor hooks; this module feeds it the
run's batches and, under DDP, sums every rank's scores so that all ranks rank the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from diffcli.trainloop import loader, move

if TYPE_CHECKING:
    import torch


def fisher_diagonal(model, flat, head: list, batches: Iterable[dict], device, world: int = 1) -> "torch.Tensor":
    """Σ over batches of (dL/dθ)² for the flat parameters (dropout off), in float32, in the flat order.

    Batch-mean gradients, squared and summed: the ranking FISH masks use (Sung et al. 2021, eq. 2), with a
    batch in place of one example (`masks.fisher_scores`). `head` keeps no gradient afterwards. Under DDP
    (`world` > 1) each rank sums its own batches and the sums are added over the ranks.
    """
    import torch

    from diffcli.masks import fisher_scores

    scores = fisher_scores(model, flat.names, batches, device, dtype=torch.float32)
    out = torch.cat([scores.pop(n) for n in flat.names])
    for p in head:
        p.grad = None
    return _sum_ranks(out, world)


def _sum_ranks(t: "torch.Tensor", world: int) -> "torch.Tensor":
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def fisher_batches(run) -> Iterator[dict]:
    """This rank's share of the first `--fill-samples` training examples, in batches on the run's device."""
    import math

    opts = run.opts
    batches = loader(run.train_set, opts.batch_size, opts.seed + 2, 0, run.dist)
    n = max(1, math.ceil(opts.fill_samples / (opts.batch_size * run.dist.world)))
    return (move(b, run.dev) for _, b in zip(range(n), batches))


def fisher_scores(run, flat, head: list) -> "torch.Tensor":
    """The Fisher diagonal over `--fill-samples` training examples (all ranks together), at the model as it is now."""
    return fisher_diagonal(run.tm.model, flat, head, fisher_batches(run), run.dev, run.dist.world)
