"""Merging diffs: sparse weighted sum and TIES against dense references, overlap counts, base and extras rules."""

from __future__ import annotations

import pytest
import torch

from diffcli.diff import Diff, TensorDiff
from diffcli.errors import BaseMismatchError, InvalidValueError
from diffcli.merging import merge, parse_weights

SHAPES = {"encoder.layer.0.w": (12, 10), "encoder.layer.1.w": (40,), "embeddings.e": (7, 5)}


def synth(seed: int, density: float = 0.3, prefix: str = "", fingerprint: str = "sha256:base",
          head_labels: int = 2, shapes=SHAPES) -> Diff:
    """A random sparse diff over fixed 'base' tensors, with a classifier head extra."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        mask = torch.rand(n, generator=g) < density
        idx = torch.nonzero(mask).reshape(-1)
        # Values on a coarse grid, so that sums cancel exactly sometimes and signs often clash.
        vals = (torch.randint(-3, 4, (idx.numel(),), generator=g).float() * 0.25)
        keep = vals != 0
        tensors[prefix + name] = TensorDiff(name, shape, "float32", f"digest-{name}", vals[keep], idx[keep])
    extras = {"classifier.weight": torch.randn(head_labels, 4, generator=g),
              "classifier.bias": torch.randn(head_labels, generator=g)}
    return Diff(tensors, extras, {"model_type": "bert", "num_labels": head_labels}, "base", fingerprint,
                {"task": f"task{seed}"})


def dense_of(diff: Diff, base_name: str) -> torch.Tensor:
    for td in diff.tensors.values():
        if td.base_name == base_name:
            return td.dense().double()
    raise KeyError(base_name)


def test_sum_equals_dense_weighted_sum_and_stays_sparse():
    a, b, c = synth(1), synth(2), synth(3)
    w = [1.0, -0.5, 2.0]
    res = merge([a, b, c], w, method="sum")
    for name in SHAPES:
        td = res.diff.tensors[name]
        assert not td.is_dense
        expect = sum(wi * dense_of(d, name) for wi, d in zip(w, (a, b, c)))
        torch.testing.assert_close(td.dense().double(), expect.float().double(), rtol=0, atol=1e-6)
        # sorted, unique positions; no stored zeros
        assert bool((td.indices[1:] > td.indices[:-1]).all())
        assert bool((td.values != 0).all())
        assert td.nnz == int((expect != 0).sum())


def test_overlap_counts_match_dense_reference():
    a, b = synth(4), synth(5)
    res = merge([a, b], [1.0, 1.0])
    shared = conflicts = union = 0
    for name in SHAPES:
        da, db = dense_of(a, name).reshape(-1), dense_of(b, name).reshape(-1)
        union += int(((da != 0) | (db != 0)).sum())
        shared += int(((da != 0) & (db != 0)).sum())
        conflicts += int((da * db < 0).sum())
    t = res.report["totals"]
    assert (t["union"], t["shared"], t["conflicts"]) == (union, shared, conflicts)
    assert shared > 0 and conflicts > 0  # the fixture really exercises both
    assert sum(g["shared"] for g in res.report["layers"]) == shared
    assert {g["layer"] for g in res.report["layers"]} == {"layer 00", "layer 01", "embeddings"}
    assert [i["nnz"] for i in res.report["inputs"]] == [a.nnz, b.nnz]


def test_ties_elects_sign_and_takes_disjoint_mean():
    diffs = [synth(6), synth(7), synth(8)]
    w = [1.0, 0.5, 1.5]
    res = merge(diffs, w, method="ties")
    for name in SHAPES:
        v = torch.stack([wi * dense_of(d, name).reshape(-1) for wi, d in zip(w, diffs)])
        sign = torch.sign(v.sum(0))
        agree = (torch.sign(v) == sign) & (sign != 0)
        cnt = agree.sum(0)
        expect = torch.where(cnt > 0, (v * agree).sum(0) / cnt.clamp(min=1), torch.zeros(()))
        got = res.diff.tensors[name].dense().reshape(-1).double()
        torch.testing.assert_close(got, expect.float().double(), rtol=0, atol=1e-6)
    assert res.report["totals"]["dropped"] > 0


def test_ties_never_mixes_signs_at_a_position():
    a, b = synth(9, density=0.9), synth(10, density=0.9)
    res = merge([a, b], method="ties")
    for name in SHAPES:
        da, db, m = dense_of(a, name), dense_of(b, name), res.diff.tensors[name].dense().double()
        clash = (da * db < 0)
        # where inputs clash, the result is exactly the input whose sign won (never an average across signs)
        winner = torch.where((da + db) > 0, torch.maximum(da, db), torch.minimum(da, db))
        assert torch.equal(m[clash & ((da + db) != 0)], winner[clash & ((da + db) != 0)].float().double())


def test_prefixed_and_bare_target_names_merge_by_base_tensor():
    a, b = synth(11, prefix="bert."), synth(12)
    res = merge([a, b])
    assert set(res.diff.tensors) == {"bert." + n for n in SHAPES}  # first input's spelling
    for name in SHAPES:
        expect = dense_of(a, name) + dense_of(b, name)
        torch.testing.assert_close(res.diff.tensors["bert." + name].dense().double(), expect)


def test_different_base_is_refused():
    with pytest.raises(BaseMismatchError, match="another base"):
        merge([synth(1), synth(2, fingerprint="sha256:other")], names=["a.diff", "b.diff"])


def test_same_fingerprint_but_different_tensor_digest_is_refused():
    a, b = synth(1), synth(2)
    td = b.tensors["embeddings.e"]
    b.tensors["embeddings.e"] = TensorDiff(td.base_name, td.shape, td.dtype, "other", td.values, td.indices)
    with pytest.raises(BaseMismatchError, match="embeddings.e"):
        merge([a, b])


def test_extras_first_takes_first_head_and_config():
    a, b = synth(1, head_labels=2), synth(2, head_labels=3)
    res = merge([a, b], extras="first", names=["a", "b"])
    assert set(res.diff.extras) == set(a.extras)
    for k, t in a.extras.items():
        assert torch.equal(res.diff.extras[k], t)
    assert res.diff.config["num_labels"] == 2
    assert res.diff.meta["task"] == "task1"
    assert res.report["extras_dropped"] == ["b:classifier.bias", "b:classifier.weight"]


def test_extras_mean_averages_equal_shapes_and_refuses_different_heads():
    a, b = synth(1), synth(2)
    res = merge([a, b], extras="mean")
    for k in a.extras:
        torch.testing.assert_close(res.diff.extras[k], (a.extras[k] + b.extras[k]) / 2)
    assert "task" not in res.diff.meta  # two tasks averaged: no single task any more
    with pytest.raises(InvalidValueError, match="cannot average extra"):
        merge([a, synth(3, head_labels=3)], extras="mean")


def test_bad_options():
    a, b = synth(1), synth(2)
    with pytest.raises(InvalidValueError, match="at least two"):
        merge([a])
    with pytest.raises(InvalidValueError, match="weights for 2 diffs"):
        merge([a, b], [1.0])
    with pytest.raises(InvalidValueError, match="method"):
        merge([a, b], method="avg")
    with pytest.raises(InvalidValueError, match="density"):
        merge([a, b], method="ties", density=0)
    assert parse_weights(["0.5,1"], 2) == [0.5, 1.0]
    assert parse_weights(["0.5", "-1"], 2) == [0.5, -1.0]
    assert parse_weights(None, 3) is None
    with pytest.raises(InvalidValueError, match="not a number"):
        parse_weights(["x"], 1)
    with pytest.raises(InvalidValueError, match="3 weights for 2"):
        parse_weights(["1,2,3"], 2)


def test_density_trims_each_input_before_merging():
    a, b = synth(13, density=0.8), synth(14, density=0.8)
    full = merge([a, b], method="ties")
    trimmed = merge([a, b], method="ties", density=0.2)
    assert trimmed.report["totals"]["union"] < full.report["totals"]["union"]
    assert sum(i["nnz"] for i in trimmed.report["inputs"]) == round(0.2 * a.nnz) + round(0.2 * b.nnz)


def test_merge_of_real_diffs_roundtrips_through_a_checkpoint(tiny_base, tmp_path):
    from conftest import make_finetune

    from diffcli import checkpoint
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    d1 = project(extract_diff(str(tiny_base), str(make_finetune(tiny_base, tmp_path / "f1", seed=1))), 0.05).diff
    d2 = project(extract_diff(str(tiny_base), str(make_finetune(tiny_base, tmp_path / "f2", seed=2))), 0.05).diff
    res = merge([d1, d2], [0.5, 0.5])
    checkpoint.save(res.diff, tmp_path / "merged")
    back = checkpoint.load(tmp_path / "merged")
    assert back.base_fingerprint == d1.base_fingerprint
    for name, td in res.diff.tensors.items():
        assert torch.equal(back.tensors[name].dense(), td.dense())
        expect = 0.5 * d1.tensors[name].dense() + 0.5 * d2.tensors[name].dense()
        torch.testing.assert_close(td.dense(), expect)
