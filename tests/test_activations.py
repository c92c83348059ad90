"""Activation checkpointing: which layers are checkpointed, that it changes no gradient (dropout replayed), that
`train --activation-checkpointing` gives the same diff as without it, bad values, and the memory estimate."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from diffcli import checkpoint, masks
from diffcli.activations import checkpoint_activations, checkpointable_layers
from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from diffcli.memory_estimate import activation_bytes, estimate
from diffcli.sparse_training import SparseDiffTrainer
from diffcli.training import build_task_model
from tests.tiny_lms import make_gpt2, make_llama
from tests.training_data import write_task


def _spec():
    from diffcli.tasks import TaskSpec

    return TaskSpec("custom", ("sentence",), "label", ("0", "1"), ("accuracy",), "accuracy")


def _deep_bert(tmp_path):
    from tests.conftest import make_base

    return make_base(tmp_path / "deep", num_hidden_layers=4)


@pytest.mark.parametrize("every, chosen", [(0, []), (1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (9, [0])])
def test_every_nth_layer_is_checkpointed(tmp_path, every, chosen):
    tm = build_task_model(_deep_bert(tmp_path), _spec(), seed=0)
    assert checkpoint_activations(tm.model, every) == len(chosen)
    layers = checkpointable_layers(tm.model)
    assert len(layers) == 4
    assert [i for i, layer in enumerate(layers) if layer.gradient_checkpointing] == chosen


@pytest.mark.parametrize("make", [make_gpt2, make_llama])
def test_decoders_are_checkpointed_too(tmp_path, make):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make(tmp_path / "lm"))
    n_layers = model.config.num_hidden_layers
    assert checkpoint_activations(model, 1) == n_layers == len(checkpointable_layers(model))


@pytest.mark.parametrize("every", [-1, 1.5, "2", True])
def test_bad_values_are_refused(tmp_path, tiny_base, every):
    tm = build_task_model(tiny_base, _spec(), seed=0)
    with pytest.raises(InvalidValueError, match="activation-checkpointing"):
        checkpoint_activations(tm.model, every)


def test_a_model_without_checkpointing_is_refused():
    with pytest.raises(InvalidValueError, match="does not support activation checkpointing"):
        checkpoint_activations(torch.nn.Linear(3, 3), 1)


def _sparse_deltas(base, every: int) -> torch.Tensor:
    """Three steps of the k-sparse trainer in train mode (dropout on), from the same seed."""
    tm = build_task_model(base, _spec(), seed=0)
    checkpoint_activations(tm.model, every)
    tm.model.train()
    mask = masks.random_mask(masks.sizes_of(tm.model, tm.gated), 0.05, seed=3)
    trainer = SparseDiffTrainer(tm.model, mask, tm.head, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(7)
    for _ in range(3):
        batch = {"input_ids": torch.randint(5, 90, (4, 9), generator=g),
                 "attention_mask": torch.ones(4, 9, dtype=torch.long),
                 "labels": torch.randint(0, 2, (4,), generator=g)}
        tm.model(**batch).loss.backward()
        trainer.step()
        trainer.zero_grad()
    return trainer.delta.detach().clone()


def test_checkpointing_changes_no_gradient(tmp_path):
    base = _deep_bert(tmp_path)
    plain = _sparse_deltas(base, 0)
    assert plain.abs().sum() > 0
    for every in (1, 2):
        torch.testing.assert_close(_sparse_deltas(base, every), plain, rtol=0, atol=1e-7)


def _train(tmp_path, base, data, name: str, *extra: str):
    train, dev = data
    out = tmp_path / name
    result = CliRunner().invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model",
                                      str(base), "--sparsity", "2%", "--fixmask-epochs", "1", "--batch-size", "8",
                                      "-o", str(out), "--json", *extra])
    return result, out


@pytest.mark.parametrize("method", ["l0", "fisher"])
def test_train_with_checkpointing_gives_the_same_diff(tmp_path, method):
    base = _deep_bert(tmp_path)
    data = write_task(tmp_path / "data")
    own = ["--epochs", "1", "--lr", "1e-3"] if method == "l0" else []
    r0, plain = _train(tmp_path, base, data, "plain", "--method", method, *own)
    r1, ckpt = _train(tmp_path, base, data, "ckpt", "--method", method, *own, "--activation-checkpointing", "1")
    assert r0.exit_code == 0 and r1.exit_code == 0, r1.output
    a, b = checkpoint.load(plain), checkpoint.load(ckpt)
    assert b.meta["hyperparameters"]["activation_checkpointing"] == 1
    assert a.nnz == b.nnz
    for name, t in a.tensors.items():
        torch.testing.assert_close(b.tensors[name].indices, t.indices, rtol=0, atol=0)
        torch.testing.assert_close(b.tensors[name].values, t.values, rtol=0, atol=1e-6)


def test_train_refuses_a_negative_value(tmp_path, tiny_base):
    data = write_task(tmp_path / "data")
    result, out = _train(tmp_path, tiny_base, data, "bad", "--activation-checkpointing", "-1")
    assert result.exit_code == 2
    assert "--activation-checkpointing must be a whole number" in result.stderr
    assert "Traceback" not in result.output and not out.exists()


def test_estimate_counts_checkpointed_layers(tiny_base):
    from transformers import BertConfig

    cfg = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    none, every2, every1 = (activation_bytes(cfg, 8, 128, n) for n in (0, 2, 1))
    layer = (none - 4 * 4 * 8 * 128 * 1024) // 24
    kept_input = 4 * 8 * 128 * 1024
    assert every1 == 24 * kept_input + layer + 4 * 4 * 8 * 128 * 1024  # inputs kept, one layer rebuilt at a time
    assert every2 == 12 * layer + 12 * kept_input + 4 * 4 * 8 * 128 * 1024  # layer 22 rebuilt after 23 is freed
    cfg.num_hidden_layers = 2  # layer 0 checkpointed: rebuilt after layer 1's activations are freed
    assert activation_bytes(cfg, 8, 128, 2) == layer + kept_input + 4 * 4 * 8 * 128 * 1024
    assert every1 < every2 < none
    tm = build_task_model(tiny_base, _spec(), seed=0)
    full = estimate(tm.model, "sparse", batch_size=8, seq_len=128, shared=tm.gated, k=100)
    ckpt = estimate(tm.model, "sparse", batch_size=8, seq_len=128, shared=tm.gated, k=100, checkpoint_every=1)
    assert ckpt.activations < full.activations and ckpt.weights == full.weights


def test_memory_hint_names_checkpointing_when_it_fits(tmp_path, monkeypatch):
    from diffcli import training
    from diffcli.train_options import TrainOptions

    tm = build_task_model(_deep_bert(tmp_path), _spec(), seed=0)
    opts = TrainOptions(method="fisher", batch_size=64, max_seq_length=512)
    needs = training.memory_needs(tm, opts, torch.device("cpu"))
    ckpt = training.memory_needs(tm, opts, torch.device("cpu"), checkpoint_every=1)
    assert ckpt["fisher"] < needs["fisher"]
    every2 = training.memory_needs(tm, opts, torch.device("cpu"), checkpoint_every=2)
    assert ckpt["fisher"] < every2["fisher"] < needs["fisher"]
    monkeypatch.setattr(training, "_rss", lambda: 0)
    for free, named in (((ckpt["fisher"] + every2["fisher"]) // 2, "1"), ((every2["fisher"] + needs["fisher"]) // 2, "2")):
        monkeypatch.setattr("diffcli.memory_estimate.available_bytes", lambda device, free=free: free)
        with pytest.raises(InvalidValueError) as err:
            training.check_memory(tm, opts, torch.device("cpu"))
        assert f"--activation-checkpointing {named} needs about" in err.value.hint
