"""The public API: DiffPruner in a hand-written loop and DiffPruningCallback in transformers.Trainer, tiny BERT."""

from __future__ import annotations

import pytest
import torch

from diffcli import checkpoint
from diffcli.errors import InvalidValueError


def _model(base, seed=0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)


def _batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 45, (8, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids == 36).any(1).long()})
    return out


def _base_state(base, names):
    from diffcli.weights import WeightStore, match_names

    store = WeightStore(base)
    mapping = match_names(store.names(), names)
    return {n: store[mapping[n]] for n in names if n in mapping}


def _rebuilt_logits(tmp_path, base, diff, batch):
    """Save, apply to a folder, reload: the logits of the rebuilt model."""
    from transformers import AutoModelForSequenceClassification

    from diffcli.applying import apply_to_folder

    checkpoint.save(diff, tmp_path / "ckpt")
    apply_to_folder(str(base), tmp_path / "ckpt", tmp_path / "merged")
    rebuilt = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        return rebuilt(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("method", ["l0", "fisher", "random", "magnitude"])
def test_own_loop_trains_a_diff_that_rebuilds_the_model(tmp_path, tiny_base, method):
    from diffcli import DiffPruner

    model = _model(tiny_base)
    batches = _batches()
    opts = {"l0": dict(lr=1e-3), "magnitude": dict(lr=1e-3)}.get(method, {})
    pruner = DiffPruner(model, str(tiny_base), method=method, sparsity=0.02, total_steps=len(batches),
                        fixmask_lr=1e-2, **opts)
    model.train()
    if method == "l0":
        for b in batches:
            pruner.begin()
            model(**b).loss.backward()
            stats = pruner.finish()
        assert 0 < stats["expected_density"] <= 1
        info = pruner.project()
    else:
        if method == "magnitude":  # your own dense steps, then the k largest |δ|
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for b in batches:
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad()
        info = pruner.choose_mask(iter(batches[:2]) if method == "fisher" else None)
    k = round(0.02 * pruner.layout.numel)
    assert info["k"] == k and pruner.index.numel() == k
    head_params = [p for n, p in model.named_parameters() if n in pruner.tm.head]
    pruner.start_fixed(total_steps=len(batches))
    for b in batches:
        model(**b).loss.backward()
        pruner.fixed_step()
    assert all(p.grad is None or not p.grad.any() for p in head_params)
    diff = pruner.export()
    assert diff.nnz <= k and diff.meta["hyperparameters"]["method"] == method
    base = _base_state(tiny_base, list(dict(model.named_parameters())))
    params = dict(model.named_parameters())
    changed = sum(int((params[n].detach() != base[n]).sum()) for n in pruner.tm.gated)
    assert changed == diff.nnz  # the model moved exactly where the diff is stored
    model.eval()
    batch = batches[0]
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(_rebuilt_logits(tmp_path, tiny_base, diff, batch), want, atol=1e-6)


def test_api_refuses_what_it_cannot_do(tiny_base):
    from diffcli import DiffPruner

    with pytest.raises(InvalidValueError, match="unknown option 'alpha'"):
        DiffPruner(_model(tiny_base), str(tiny_base), alpha=0.1)
    with pytest.raises(InvalidValueError, match="--method random does not take --lr"):
        DiffPruner(_model(tiny_base), str(tiny_base), method="random", lr=1e-3)
    pruner = DiffPruner(_model(tiny_base), str(tiny_base), method="random", sparsity=0.02)
    with pytest.raises(InvalidValueError, match="no L0 phase"):
        pruner.begin()
    with pytest.raises(InvalidValueError, match="no mask yet"):
        pruner.start_fixed(total_steps=1)
    with pytest.raises(InvalidValueError, match="the Fisher mask needs batches"):
        DiffPruner(_model(tiny_base), str(tiny_base), method="fisher").choose_mask()
    with pytest.raises(InvalidValueError, match="sparsity must be a number"):
        DiffPruner(_model(tiny_base), str(tiny_base), method="random", sparsity="0.5%")


def test_api_misuse_is_one_clear_error_and_a_later_call_still_works(tiny_base):
    """A Fisher pass over no batch gave all-zero scores (a 'fisher' mask of the first k positions); a second
    choose_mask or start_fixed, or one retried after a bad lr, left the first engine's gradient hooks on the model,
    and the next backward failed inside them with an AttributeError."""
    from diffcli import DiffPruner

    model = _model(tiny_base)
    pruner = DiffPruner(model, str(tiny_base), method="fisher", sparsity=0.02)
    with pytest.raises(InvalidValueError, match="saw no batch"):
        pruner.choose_mask(iter([]))
    pruner.choose_mask(_batches(2))
    with pytest.raises(InvalidValueError, match="chosen already"):
        pruner.choose_mask(_batches(2))
    with pytest.raises(InvalidValueError, match="--fixmask-lr must be a finite number"):
        pruner.start_fixed(3, lr=-1.0)
    pruner.start_fixed(3)
    pruner.start_fixed(3, lr=1e-2)  # starts the fixed phase again, at the chosen entries
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for batch in _batches(3):
        model(**batch).loss.backward()
        pruner.fixed_step()
    diff = pruner.export()
    assert diff.nnz and sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters()) > 0


@pytest.mark.parametrize("method", ["l0", "random", "magnitude"])
def test_trainer_callback_trains_a_diff_with_the_users_training_arguments(tmp_path, tiny_base, method):
    from transformers import Trainer, TrainingArguments

    from diffcli import DiffPruningCallback

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = [{k: v[i] for k, v in b.items()} for b in _batches(4) for i in range(8)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = _model(tiny_base)
    opts = {"l0": dict(lr=1e-3), "magnitude": dict(lr=1e-3)}.get(method, {})
    cb = DiffPruningCallback(str(tiny_base), method=method, sparsity=0.02, fixmask_lr=1e-2, **opts)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb]).train()
    diff = cb.diff
    k = round(0.02 * diff.budget_numel)
    assert diff is not None and diff.nnz <= k and cb.pruner.index.numel() == k
    base = _base_state(tiny_base, list(dict(model.named_parameters())))
    params = dict(model.named_parameters())
    changed = sum(int((params[n].detach() != base[n]).sum()) for n in cb.pruner.tm.gated)
    assert changed == diff.nnz
    model.eval()
    batch = _batches(1, seed=3)[0]
    with torch.no_grad():
        want = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert torch.allclose(_rebuilt_logits(tmp_path, tiny_base, diff, batch), want, atol=1e-6)


def test_checked_options_refuses_a_foreign_option_even_at_its_default():
    """`train --method random --epochs 5` is refused; the library let epochs=5 (its default) through."""
    from diffcli.api import checked_options
    from diffcli.train_options import TrainOptions

    defaults = TrainOptions()
    for method, name in (("random", "epochs"), ("random", "lr"), ("magnitude", "alpha_lr"), ("l0", "basis_lr"),
                         ("basis", "rank")):
        for value in (getattr(defaults, name), getattr(defaults, name) * 2):
            with pytest.raises(InvalidValueError, match=f"--method {method} does not take --{name.replace('_', '-')}"):
                checked_options(method, {name: value})
    assert checked_options("random", {"sparsity": 0.02, "seed": 1, "fixmask_lr": 1e-3}).method == "random"
    assert checked_options("l0", {"epochs": 3, "lr": 1e-4}).epochs == 3
    with pytest.raises(InvalidValueError, match="unknown option 'alpha'"):
        checked_options("random", {"alpha": 0.1})


def test_steps_past_the_planned_total_warn_once_per_phase(tiny_base):
    """Past total_steps the linear decay has reached 0 and nothing trains: your loop is told, once per phase."""
    import warnings

    from diffcli import DiffPruner

    model = _model(tiny_base)
    batches = _batches(4)
    pruner = DiffPruner(model, str(tiny_base), method="l0", sparsity=0.02, total_steps=2, lr=1e-3, fixmask_lr=1e-2)
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            pruner.begin()
            model(**b).loss.backward()
            pruner.finish()
    assert [str(w.message)[:60] for w in caught] == ["step 3 of the first phase is past its DiffPruner(total_steps"]
    pruner.project()
    pruner.start_fixed(total_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in batches:
            model(**b).loss.backward()
            pruner.fixed_step()
    assert len(caught) == 1 and "step 4 of the fixed phase is past its start_fixed(total_steps=...) of 3" in str(
        caught[0].message)


def test_saving_no_diff_is_one_clear_error(tmp_path):
    with pytest.raises(InvalidValueError, match="nothing to save .* got NoneType"):
        checkpoint.save(None, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
