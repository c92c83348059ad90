"""The memory estimate: the methods' order, its terms, and the one-line refusal that names a method that fits."""

from __future__ import annotations

import pytest

from diffcli import memory_estimate as me
from diffcli.errors import DiffpruneError, InvalidValueError
from diffcli.training import build_task_model


def _tm(tiny_base):
    from diffcli.tasks import TaskSpec

    return build_task_model(tiny_base, TaskSpec("custom", ("sentence",), "label", ("0", "1"), ("accuracy",),
                                                "accuracy"), seed=0)


def test_counts_per_method(tiny_base):
    tm = _tm(tiny_base)
    p = sum(int(x.numel()) for x in tm.model.parameters())
    n = sum(int(x.numel()) for name, x in tm.model.named_parameters() if name in tm.gated)
    kw = dict(batch_size=8, seq_len=16, shared=tm.gated, device="cpu")
    full = me.estimate(tm.model, "full", **kw)
    l0 = me.estimate(tm.model, "l0", **kw)
    sparse = me.estimate(tm.model, "sparse", k=round(0.005 * n), **kw)
    acts = me.activation_bytes(tm.model.config, 8, 16)
    assert full.total - me.CPU_OVERHEAD == 12 * p + max(4 * p, acts)
    assert l0.total - acts - me.CPU_OVERHEAD == 56 * n + 16 * (p - n)
    assert sparse.total < full.total < l0.total
    fisher = me.estimate(tm.model, "sparse", k=round(0.005 * n), mask_batch_size=64, **kw)
    assert fisher.total > sparse.total  # a Fisher mask chosen on a larger batch than training's sets the peak
    assert me.estimate(tm.model, "sparse", k=round(0.005 * n), mask_batch_size=1, **kw).total == sparse.total
    assert sparse.activations == full.activations == acts > 0
    assert me.estimate(tm.model, "full", batch_size=8, seq_len=16, device="cuda").overhead == 0
    assert me.activation_bytes(tm.model.config, 16, 16) > acts  # grows with the batch
    assert me.activation_bytes(object(), 8, 16) == 0  # no transformer sizes known: weights only


def test_sparse_needs_k_and_methods_are_checked(tiny_base):
    tm = _tm(tiny_base)
    with pytest.raises(InvalidValueError, match="needs k"):
        me.estimate(tm.model, "sparse", batch_size=1, seq_len=8)
    with pytest.raises(InvalidValueError, match="not one of"):
        me.estimate(tm.model, "lora", batch_size=1, seq_len=8)


def test_check_fits_names_the_method_that_fits(tiny_base):
    tm = _tm(tiny_base)
    kw = dict(batch_size=8, seq_len=16, shared=tm.gated)
    est = {m: me.estimate(tm.model, m, k=100, **kw) for m in me.METHODS}
    me.check_fits(est, "l0", None, "cpu")  # unknown free memory: no refusal
    me.check_fits(est, "l0", est["l0"].total, "cpu")
    between = (est["sparse"].total + est["full"].total) // 2
    with pytest.raises(DiffpruneError, match=r"training with l0 needs about .* GiB but cpu has") as e:
        me.check_fits(est, "l0", between, "cpu")
    assert "sparse fixed-mask" in e.value.hint
    with pytest.raises(DiffpruneError) as e:
        me.check_fits(est, "l0", 1, "cuda:0")
    assert "--batch-size" in e.value.hint


def test_available_bytes_on_cpu():
    free = me.available_bytes("cpu")
    assert free is None or free > 0
