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


def _rebased(d: Diff, digest: str, fingerprint: str, drop: tuple[str, ...] = ()) -> Diff:
    """`d` as if made on another base (every tensor digest `digest`+name), less the tensors in `drop`."""
    tensors = {n: TensorDiff(td.base_name, td.shape, td.dtype, f"{digest}-{td.base_name}", td.values, td.indices)
               for n, td in d.tensors.items() if n not in drop}
    return Diff(tensors, d.extras, d.config, d.base_ref, fingerprint, d.meta)


def test_different_base_is_refused():
    other = _rebased(synth(2), "other", "sha256:other")
    with pytest.raises(BaseMismatchError, match="b.diff was made on another base than a.diff"):
        merge([synth(1), other], names=["a.diff", "b.diff"])


def test_diffs_of_one_base_that_cover_different_tensors_merge_under_the_unions_fingerprint():
    """A classifier's diff holds the pooler, a tagger's does not: their fingerprints (over their own tensors'
    digests) differ, the tensors they share agree, so they merge; the merged diff's fingerprint is its own."""
    from diffcli.weights import fingerprint

    a = synth(1, fingerprint=fingerprint(f"digest-{n}" for n in SHAPES))
    b = _rebased(synth(2), "digest", fingerprint(f"digest-{n}" for n in SHAPES if n != "embeddings.e"),
                 drop=("embeddings.e",))
    assert a.base_fingerprint != b.base_fingerprint
    out = merge([b, a], names=["b", "a"]).diff
    assert sorted(td.base_name for td in out.tensors.values()) == sorted(SHAPES)
    assert out.base_fingerprint == a.base_fingerprint  # the union is a's tensors
    for name in SHAPES:
        want = dense_of(a, name) + (dense_of(b, name) if name != "embeddings.e" else 0)
        assert torch.equal(dense_of(out, name), want.float().double()), name
    # no tensor in common and other fingerprints: nothing says they share a base, so merge asks for it
    lone = _rebased(synth(3), "digest", "sha256:lone", drop=("encoder.layer.0.w", "encoder.layer.1.w"))
    c = _rebased(synth(4), "digest", "sha256:c", drop=("embeddings.e",))
    with pytest.raises(BaseMismatchError, match="lone and c share no base tensor") as refused:
        merge([c, lone], names=["c", "lone"])
    assert "pass --base" in refused.value.hint


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


def test_density_trims_a_low_rank_input_by_the_entries_of_its_product():
    """FORMAT.md §10: `--density` trims the densified δ = B·A as it trims a sparse one (a fraction of B·A's
    nonzeros, not of the factors' entries), and the report still names the input as densified."""
    g = torch.Generator().manual_seed(0)
    lowrank = TensorDiff("w", (16, 16), "float32", "dg", torch.zeros(0),
                         factors=(torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)))
    sparse = TensorDiff("w", (16, 16), "float32", "dg", torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0, 5, 9]))
    d1 = Diff({"w": lowrank}, {}, {"model_type": "bert"}, "b", "sha256:fp")
    d2 = Diff({"w": sparse}, {}, {"model_type": "bert"}, "b", "sha256:fp")
    product = lowrank.dense()
    for density, kept in ((None, 256), (1.0, 256), (0.5, 128)):
        r = merge([d1, d2], density=density, names=["lr", "sp"])
        assert [i["nnz"] for i in r.report["inputs"]] == [kept, 3 if density != 0.5 else 2], density
        assert r.report["densified"] == ["lr:w"]
    empty = Diff({"w": TensorDiff("w", (16, 16), "float32", "dg", torch.zeros(0), torch.zeros(0, dtype=torch.int64))},
                 {}, {"model_type": "bert"}, "b", "sha256:fp")
    half = merge([d1, empty], density=0.5).diff.tensors["w"].dense()
    top = product.abs().reshape(-1).topk(128).indices
    assert torch.equal(half.reshape(-1)[top], product.reshape(-1)[top])  # the largest |B·A| kept, exactly
    assert int((half != 0).sum()) == 128


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
