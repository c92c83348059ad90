"""bench/baselines.py: the best epoch is kept as its trained tensors on the CPU, not as a copy of the whole model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import load_bench


def test_the_best_epochs_copy_holds_the_trained_tensors_only_and_restores_them(tiny_base):
    pytest.importorskip("peft")
    from diffcli import tasks

    bl = load_bench("baselines")
    cfg = bl.BaselineConfig(method="lora", task="rte", model=str(tiny_base))
    model = bl.wrap_lora(bl.load_model(tiny_base, tasks.task_spec("rte")), cfg)
    kept = bl._trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(kept) == trainable and len(kept) < len(model.state_dict()) / 2  # LoRA factors and the head only
    assert all(t.device.type == "cpu" for t in kept.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.load_state_dict(kept, strict=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in trainable)            # the best epoch's tensors are back
    assert all(torch.equal(after[n], before[n] + 1) for n in before if n not in trainable)  # the rest never changes
