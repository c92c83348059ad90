"""Magnitude projection: exact budget, deterministic ties, zeros never kept, sparsity parsing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffcli.diff import Diff, TensorDiff
from diffcli.errors import InvalidValueError
from diffcli.projection import budget, parse_sparsity, project


def make_diff(tensors: dict[str, torch.Tensor]) -> Diff:
    tds = {n: TensorDiff(n, tuple(t.shape), "float32", "d" + n, t.float()) for n, t in tensors.items()}
    return Diff(tds, {"classifier.weight": torch.ones(2, 4)}, {"num_labels": 2}, "base", "sha256:x")


@pytest.mark.parametrize("text,value", [("0.5%", 0.005), ("0.005", 0.005), ("100%", 1.0), (" 2% ", 0.02), ("1", 1.0)])
def test_parse_sparsity_accepts_both_spellings(text, value):
    assert parse_sparsity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["0", "-1%", "150%", "abc", "nan", "", "%", "2"])
def test_parse_sparsity_rejects_nonsense(text):
    with pytest.raises(InvalidValueError):
        parse_sparsity(text)


def test_parse_sparsity_hints_at_percent():
    with pytest.raises(InvalidValueError) as err:
        parse_sparsity("5")
    assert "5%" in (err.value.hint or "")


@pytest.mark.parametrize("scope", ["global", "per-tensor"])
def test_keeps_exactly_round_s_times_n(scope):
    torch.manual_seed(0)
    diff = make_diff({"a.weight": torch.randn(37, 11), "b.bias": torch.randn(13), "c.weight": torch.randn(5, 50)})
    n = 37 * 11 + 13 + 250
    for s in (0.01, 0.033, 0.2, 0.5):
        res = project(diff, s, scope)
        assert res.n == n
        assert res.k == round(s * n)
        assert res.diff.nnz == res.k == res.kept
        assert res.diff.extras.keys() == {"classifier.weight"}  # extras never count against the budget


def test_global_keeps_the_largest_magnitudes():
    torch.manual_seed(1)
    a, b = torch.randn(100), torch.randn(40, 3) * 3
    res = project(make_diff({"a": a, "b": b}), 0.1)
    kept = torch.cat([res.diff.tensors["a"].values, res.diff.tensors["b"].values]).abs()
    dropped_max = torch.cat([a.abs(), b.abs().reshape(-1)]).sort(descending=True).values[res.k]
    assert kept.min() >= dropped_max
    # values are kept exactly, at the right positions
    td = res.diff.tensors["b"]
    assert torch.equal(b.reshape(-1)[td.indices], td.values)


def test_ties_are_broken_by_position_deterministically():
    a = torch.ones(10)
    b = torch.ones(10)
    res = project(make_diff({"b": b, "a": a}), 0.25)  # k = 5 of 20 equal magnitudes
    assert res.diff.tensors["a"].indices.tolist() == [0, 1, 2, 3, 4]
    assert res.diff.tensors["b"].nnz == 0
    again = project(make_diff({"a": a, "b": b}), 0.25)
    assert again.diff.tensors["a"].indices.tolist() == [0, 1, 2, 3, 4]


def test_zero_entries_are_never_kept():
    t = torch.zeros(100)
    t[[3, 50]] = torch.tensor([1.0, -2.0])
    res = project(make_diff({"t": t}), 0.5)  # budget 50, only 2 nonzero
    assert res.k == 50 and res.kept == 2
    assert res.diff.tensors["t"].indices.tolist() == [3, 50]


def test_non_float_tensors_are_outside_the_budget():
    diff = make_diff({"w": torch.randn(100)})
    diff.tensors["ids"] = TensorDiff.zeros("ids", (1, 64), "int64", "dig")
    res = project(diff, 0.1)
    assert res.n == 100 and res.k == 10
    assert "ids" in res.diff.tensors and res.diff.tensors["ids"].nnz == 0


def test_sparse_input_can_be_reprojected_smaller():
    torch.manual_seed(2)
    first = project(make_diff({"w": torch.randn(1000)}), 0.1).diff
    second = project(first, 0.02).diff
    assert second.nnz == 20
    assert set(second.tensors["w"].indices.tolist()) <= set(first.tensors["w"].indices.tolist())


def test_unknown_scope_is_rejected():
    with pytest.raises(InvalidValueError):
        project(make_diff({"w": torch.randn(10)}), 0.1, "per-layer")


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5), s=st.floats(0.001, 1.0),
       scope=st.sampled_from(["global", "per-tensor"]), seed=st.integers(0, 10_000))
def test_budget_property(sizes, s, scope, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randint(-3, 4, (n,), generator=g).float() for i, n in enumerate(sizes)}
    diff = make_diff(tensors)
    nonzero = sum(int((t != 0).sum()) for t in tensors.values())
    res = project(diff, s, scope)
    assert res.kept == min(budget(s, sum(sizes)), nonzero)
    for name, td in res.diff.tensors.items():
        assert bool((td.values != 0).all())
        assert bool((td.indices[1:] > td.indices[:-1]).all())
        assert torch.equal(tensors[name][td.indices], td.values)
