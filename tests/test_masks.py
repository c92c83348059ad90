"""Mask selectors: exact global top-k budget, seeded random masks, Fisher scores vs autograd, magnitude."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffcli import masks
from diffcli.errors import InvalidValueError
from diffcli.projection import budget
from diffcli.training import build_task_model


def _spec():
    from diffcli.tasks import TaskSpec

    return TaskSpec("custom", ("sentence",), "label", ("0", "1"), ("accuracy",), "accuracy")


def _batches(n: int = 3, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(5, 90, (4, 7), generator=g),
             "attention_mask": torch.ones(4, 7, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=g)} for _ in range(n)]


def _check_mask(mask: dict, sizes: dict, k: int) -> None:
    assert set(mask) == set(sizes)
    assert sum(int(v.numel()) for v in mask.values()) == k
    for name, idx in mask.items():
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all())
        assert idx.numel() == 0 or (int(idx[0]) >= 0 and int(idx[-1]) < sizes[name])


def test_random_mask_has_exactly_k_positions_and_is_seeded(tiny_base):
    tm = build_task_model(tiny_base, _spec(), seed=0)
    sizes = masks.sizes_of(tm.model, tm.gated)
    k = budget(0.01, sum(sizes.values()))
    a = masks.random_mask(sizes, 0.01, seed=3)
    _check_mask(a, sizes, k)
    b = masks.random_mask(sizes, 0.01, seed=3)
    c = masks.random_mask(sizes, 0.01, seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # uniform: a tensor's share of the kept entries follows its size (the embeddings hold most of N here)
    big = max(sizes, key=sizes.get)
    assert abs(a[big].numel() / k - sizes[big] / sum(sizes.values())) < 0.1


def test_random_mask_can_take_everything():
    sizes = {"a": 5, "b": 3}
    full = masks.random_mask(sizes, 1.0, seed=0)
    assert full["a"].tolist() == [0, 1, 2, 3, 4] and full["b"].tolist() == [0, 1, 2]


def test_fisher_scores_match_autograd_sums(tiny_base):
    tm = build_task_model(tiny_base, _spec(), seed=0)
    params = dict(tm.model.named_parameters())
    batches = _batches()
    tm.model.train()
    flags = {n: p.requires_grad for n, p in params.items()}
    got = masks.fisher_scores(tm.model, tm.gated, iter(batches), dtype=torch.float32)
    assert tm.model.training  # mode restored, no gradient left, requires_grad as it was
    assert all(p.grad is None for p in params.values())
    assert {n: p.requires_grad for n, p in params.items()} == flags
    tm.model.eval()
    want = {n: torch.zeros(params[n].numel()) for n in tm.gated}
    for b in batches:
        grads = torch.autograd.grad(tm.model(**b).loss, [params[n] for n in tm.gated])
        for n, g in zip(tm.gated, grads):
            want[n] += g.reshape(-1) ** 2
    for n in tm.gated:
        assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-12), n
    half = masks.fisher_scores(tm.model, tm.gated, iter(batches))  # default: bfloat16 scores
    assert half[tm.gated[0]].dtype == torch.bfloat16
    for n in tm.gated:
        assert torch.allclose(half[n].float(), want[n], rtol=2e-2, atol=1e-30), n


def test_fisher_mask_keeps_the_top_k_scores(tiny_base):
    tm = build_task_model(tiny_base, _spec(), seed=0)
    batches = _batches()
    mask = masks.fisher_mask(tm.model, tm.gated, iter(batches), 0.02, dtype=torch.float32)
    sizes = masks.sizes_of(tm.model, tm.gated)
    k = budget(0.02, sum(sizes.values()))
    _check_mask(mask, sizes, k)
    scores = masks.fisher_scores(tm.model, tm.gated, iter(batches), dtype=torch.float32)
    kept = torch.cat([scores[n][mask[n]] for n in sorted(mask)])
    rest = torch.cat([scores[n][torch.isin(torch.arange(sizes[n]), mask[n], invert=True)] for n in sorted(mask)])
    assert float(kept.min()) >= float(rest.max()) and float(kept.min()) > 0


def test_magnitude_mask_keeps_the_largest_changes():
    base = {"w": torch.zeros(4, 5), "b": torch.zeros(3)}
    ft = {"w": torch.zeros(4, 5), "b": torch.tensor([0.0, -9.0, 0.5])}
    ft["w"][1, 2], ft["w"][3, 4] = 7.0, -0.1
    mask = masks.magnitude_mask(ft, base, ["w", "b"], 3 / 23)
    assert mask["b"].tolist() == [1, 2] and mask["w"].tolist() == [7]
    with pytest.raises(InvalidValueError, match="shape"):
        masks.magnitude_mask({"w": torch.zeros(2)}, {"w": torch.zeros(3)}, ["w"], 0.5)
    with pytest.raises(InvalidValueError, match="missing"):
        masks.magnitude_mask(ft, base, ["nope"], 0.5)


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_scores_must_be_finite_and_non_negative(bad):
    with pytest.raises(InvalidValueError, match="finite, non-negative"):
        masks.top_k_positions({"a": torch.tensor([1.0, bad])}, 1)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_histogram_top_k_equals_projection_top_k(data, dtype):
    """The large-model path (histograms of the float bits) picks what projection's top-k picks, ties included."""
    sizes = data.draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    vals = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 1e-3, 7.25, 65504.0])
    scores = {f"t{i}": torch.tensor(data.draw(st.lists(vals, min_size=n, max_size=n)), dtype=dtype)
              for i, n in enumerate(sizes)}
    total = sum(sizes)
    k = data.draw(st.integers(0, total))
    small = masks.top_k_positions(scores, k)
    limit = masks.CONCAT_LIMIT
    try:
        masks.CONCAT_LIMIT = 0
        large = masks.top_k_positions(scores, k)
    finally:
        masks.CONCAT_LIMIT = limit
    assert {n: v.tolist() for n, v in small.items()} == {n: v.tolist() for n, v in large.items()}
    assert sum(int(v.numel()) for v in small.values()) == k
