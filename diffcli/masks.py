"""Fixed masks for sparse finetuning: the kept flat positions per parameter, chosen by an exact global top-k.

Every selector returns {parameter name → sorted int64 flat positions} over the named base tensors (the
shared floating-point tensors, the same N as `projection.py` counts), with exactly k = round(S·N) positions
in all. Ties in a score are broken as `projection.project` breaks them: by name (sorted), then position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from diffcli.errors import InvalidValueError
from diffcli.projection import _top_k, budget

if TYPE_CHECKING:
    import torch

METHODS = ("random", "fisher", "magnitude")
# Up to this many entries (4M) the scores are concatenated and ranked by projection's top-k; above it the k-th
# largest score is found from histograms of the float bit patterns, so no second N-sized copy is made.
CONCAT_LIMIT = 1 << 22


def sizes_of(model: "torch.nn.Module", names: Iterable[str]) -> dict[str, int]:
    """numel per named parameter: the budget's N is their sum."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise InvalidValueError(f"the model has no parameter {missing[0]!r}")
    return {n: int(params[n].numel()) for n in names}


def _split(flat_mask: "torch.Tensor", names: list[str], sizes: list[int]) -> dict[str, "torch.Tensor"]:
    import torch

    out = {}
    for name, part in zip(names, torch.split(flat_mask, sizes)):
        out[name] = torch.nonzero(part, as_tuple=True)[0].to(torch.int64)
    return out


def _largest_reaching(hist: "torch.Tensor", k: int) -> tuple[int, int]:
    """(largest bucket b with count(≥ b) ≥ k, count(> b)) of a histogram over ordered buckets."""
    import torch

    at_or_above = hist.flip(0).cumsum(0).flip(0)
    b = int(torch.nonzero(at_or_above >= k, as_tuple=True)[0][-1])
    return b, int(at_or_above[b + 1]) if b + 1 < hist.numel() else 0


def _threshold(scores: list["torch.Tensor"], k: int) -> "torch.Tensor":
    """The k-th largest value over all `scores` (non-negative, finite, one dtype; 1 ≤ k ≤ N), exactly.

    Non-negative floats order as their bit patterns, so histograms of the bits find it: one pass over the
    scores for 16-bit floats, two for float32 (the high 16 bits, then the low 16 inside the chosen bucket).
    """
    import torch

    def hist(parts) -> "torch.Tensor":
        out = torch.zeros(1 << 16, dtype=torch.int64)
        for part in parts:
            out += torch.bincount(part.reshape(-1).to(torch.int32), minlength=1 << 16).cpu()
        return out

    dtype = scores[0].dtype
    if dtype in (torch.float16, torch.bfloat16):
        b, _ = _largest_reaching(hist(s.view(torch.int16) for s in scores), k)  # sign bit 0: 0 ≤ bits < 2^15
        return torch.tensor(b, dtype=torch.int16).view(dtype)
    bits = [s.view(torch.int32) for s in scores]
    high, above = _largest_reaching(hist(x >> 16 for x in bits), k)
    low, _ = _largest_reaching(hist(x[(x >> 16) == high] & 0xFFFF for x in bits), k - above)
    return torch.tensor((high << 16) | low, dtype=torch.int32).view(torch.float32)


def top_k_positions(scores: Mapping[str, "torch.Tensor"], k: int) -> dict[str, "torch.Tensor"]:
    """Exactly min(k, N) positions with the largest scores over all tensors (scores ≥ 0, finite).

    Above CONCAT_LIMIT entries the peak extra memory is one tensor's comparison mask, not copies of all N scores
    (projection's top-k on a concatenation needs ~20 bytes per entry: the copy, |x|, masks and an int64 cumsum).
    """
    import torch

    names = sorted(scores)
    flats = [scores[n].detach().reshape(-1) for n in names]
    sizes = [int(f.numel()) for f in flats]
    for name, f in zip(names, flats):
        if not f.is_floating_point() or not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
            raise InvalidValueError(f"mask scores of {name} must be finite, non-negative floats")
    total = sum(sizes)
    if total <= CONCAT_LIMIT or k >= total or k <= 0:
        flat = torch.cat([f.float() for f in flats]) if flats else torch.zeros(0)
        return _split(_top_k(flat, k), names, sizes)
    if len({f.dtype for f in flats}) != 1:
        flats = [f.float() for f in flats]
    thr = _threshold(flats, k)
    out, need = {}, k - sum(int((f > thr).sum()) for f in flats)
    for name, f in zip(names, flats):  # ties at the threshold: earlier name, then earlier position, first
        tie = torch.nonzero(f == thr, as_tuple=True)[0]
        take = tie[:max(0, need)]
        need -= int(take.numel())
        keep = torch.nonzero(f > thr, as_tuple=True)[0]
        out[name] = torch.sort(torch.cat([keep, take]).to(torch.int64)).values
    return out


def random_mask(sizes: Mapping[str, int], sparsity: float, seed: int) -> dict[str, "torch.Tensor"]:
    """k = round(S·N) positions drawn uniformly without replacement (seeded), in O(k) memory."""
    import torch

    names = sorted(sizes)
    offsets = torch.tensor([0] + [int(sizes[n]) for n in names], dtype=torch.int64).cumsum(0)
    n = int(offsets[-1])
    k = budget(sparsity, n)
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.zeros(0, dtype=torch.int64)
    while chosen.numel() < k:  # draw, keep first occurrences in draw order: a uniform k-subset
        draws = torch.cat([chosen, torch.randint(0, n, (k - chosen.numel() + 64,), generator=g)])
        uniq, inverse = torch.unique(draws, return_inverse=True)
        first = torch.full((uniq.numel(),), draws.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(draws.numel()), reduce="amin")
        chosen = uniq[torch.argsort(first)][:k]
    chosen = torch.sort(chosen).values
    cuts = torch.searchsorted(chosen, offsets).tolist()
    return {name: chosen[lo:hi] - offsets[i] for i, (name, lo, hi) in enumerate(zip(names, cuts, cuts[1:]))}


def fisher_scores(model: "torch.nn.Module", names: Iterable[str], batches: Iterable[Mapping],
                  device: "torch.device | None" = None, dtype: "torch.dtype | None" = None
                  ) -> dict[str, "torch.Tensor"]:
    """Σ over batches of (dL/dθ)² per named tensor (dropout off): the empirical Fisher as `--fill fisher` ranks.

    Batch-mean gradients, squared and summed (Sung et al. 2021, eq. 2, a batch in place of one example), as
    `training.fisher_diagonal`. A post-accumulate hook folds each tensor's gradient into its score and frees
    it at once, so the peak is the model, the activations, the scores (N entries of `dtype`: bfloat16 by
    default, half of float32) and one tensor's dense gradient and its square, never an N-sized gradient.
    """
    import torch

    from diffcli.dist import autocast

    dtype = dtype or torch.bfloat16
    names = list(names)
    params = dict(model.named_parameters())
    sizes_of(model, names)
    dev = device or next(iter(params.values())).device
    scores = {n: torch.zeros(params[n].numel(), dtype=dtype, device=params[n].device) for n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    wanted = set(names)

    def fold(p: "torch.Tensor", name: str) -> None:
        g = p.grad.reshape(-1).float()
        scores[name].addcmul_(g, g)  # in float32, rounded once into the score's dtype
        p.grad = None

    handles = []
    was_training = model.training
    seen = 0
    model.eval()
    try:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(n in wanted)
            if n in wanted:
                handles.append(p.register_post_accumulate_grad_hook(lambda p, n=n: fold(p, n)))
        for batch in batches:
            with autocast(dev):
                loss = model(**{k: v.to(dev) for k, v in batch.items()}).loss
            loss.backward()
            seen += 1
    finally:
        for h in handles:
            h.remove()
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    if not seen:  # all-zero scores: every position would tie, and the mask would be the first k, not a Fisher mask
        raise InvalidValueError("the Fisher scores saw no batch of training data",
                                hint="pass an iterable that yields at least one batch (a used-up generator has none)")
    return scores


def fisher_mask(model: "torch.nn.Module", names: Iterable[str], batches: Iterable[Mapping], sparsity: float,
                device: "torch.device | None" = None, dtype: "torch.dtype | None" = None
                ) -> dict[str, "torch.Tensor"]:
    """The k = round(S·N) positions with the largest empirical Fisher over `batches`."""
    names = list(names)
    scores = fisher_scores(model, names, batches, device, dtype)
    return top_k_positions(scores, budget(sparsity, sum(int(s.numel()) for s in scores.values())))


def magnitude_mask(finetuned: Mapping[str, "torch.Tensor"], base: Mapping[str, "torch.Tensor"],
                   names: Iterable[str], sparsity: float) -> dict[str, "torch.Tensor"]:
    """The k = round(S·N) positions with the largest |θ_finetuned − θ₀| (e.g. after a short dense run)."""
    import torch

    scores = {}
    for n in names:
        if n not in finetuned or n not in base:
            raise InvalidValueError(f"tensor {n!r} is missing from the finetuned or the base weights")
        a, b = finetuned[n].detach(), base[n].detach()
        if tuple(a.shape) != tuple(b.shape):
            raise InvalidValueError(f"tensor {n!r} has shape {tuple(a.shape)} finetuned but {tuple(b.shape)} in the base")
        scores[n] = (a.to(torch.float32) - b.to(device=a.device, dtype=torch.float32)).abs_().reshape(-1)
    return top_k_positions(scores, budget(sparsity, sum(int(s.numel()) for s in scores.values())))
