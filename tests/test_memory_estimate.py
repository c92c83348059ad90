"""The memory estimate: the methods' order, its terms, and `train`'s one-line refusal when a run does not fit."""

from __future__ import annotations

import pytest
import torch

from diffcli import memory_estimate as me
from diffcli.errors import InvalidValueError
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


def test_check_memory_refuses_only_what_does_not_fit(tiny_base, monkeypatch):
    from diffcli import training
    from diffcli.train_options import TrainOptions

    tm = _tm(tiny_base)
    opts = TrainOptions(method="l0", sparsity=0.02, batch_size=8, max_seq_length=16)
    need = training.memory_needs(tm, opts, torch.device("cpu"))["l0"]
    monkeypatch.setattr(training, "_rss", lambda: 0)
    for free in (None, need):  # unknown free memory, or exactly enough: no refusal
        monkeypatch.setattr(me, "available_bytes", lambda device, free=free: free)
        training.check_memory(tm, opts, torch.device("cpu"))
    monkeypatch.setattr(me, "available_bytes", lambda device: 1)  # nothing fits: the hint says what to lower
    with pytest.raises(InvalidValueError, match=r"--method l0 needs about .* GiB on cpu but only") as e:
        training.check_memory(tm, opts, torch.device("cpu"))
    assert "--batch-size" in e.value.hint and "--method" not in e.value.hint


def test_available_bytes_on_cpu():
    free = me.available_bytes("cpu")
    assert free is None or free > 0
