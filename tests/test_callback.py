"""DiffPruningCallback in transformers.Trainer: the head trains in both phases, and the Trainer settings the diff
cannot honour (resume, load_best_model_at_end, a phase without steps) are refused; a stop before the switch warns."""

from __future__ import annotations

import pytest
import torch

from conftest import token_rows

from diffcli.errors import InvalidValueError

METHODS = {"l0": dict(lr=1e-3, sparsity=0.02), "random": dict(sparsity=0.02), "fisher": dict(sparsity=0.02),
           "magnitude": dict(lr=1e-3, sparsity=0.02), "swr": dict(rank=2, budget="2%"),
           "basis": dict(keep_bases=0.5), "double": dict(keep_bases=0.5, sparsity=0.02)}


def _model(base):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, max_steps=8, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def _callback(base, method, **kw):
    from diffcli import DiffPruningCallback

    name = "basis" if method == "double" else method
    return DiffPruningCallback(str(base), method=name, fixmask_lr=1e-2, fisher_batches=2, **METHODS[method], **kw)


class _HeadLog:
    """Records the head's weight after every step."""

    def __init__(self):
        from transformers import TrainerCallback

        log = self.log = []

        class Watch(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kw):
                log.append(model.classifier.weight.detach().clone())

        self.callback = Watch()


@pytest.mark.parametrize("method", list(METHODS))
def test_the_trainers_optimizer_trains_the_head_after_the_switch_too(tmp_path, tiny_base, method):
    from transformers import Trainer

    model = _model(tiny_base)
    cb, watch = _callback(tiny_base, method), _HeadLog()
    Trainer(model=model, args=_args(tmp_path), train_dataset=token_rows(), callbacks=[cb, watch.callback]).train()
    steps = watch.log
    last_two = [s for s in range(cb.switch_step, len(steps)) if s > 0]  # steps after the choice (fisher/random: all)
    assert last_two and all(not torch.equal(steps[s], steps[s - 1]) for s in last_two), method
    assert torch.equal(cb.diff.extras["classifier.weight"].float(), model.classifier.weight.detach().float())


def test_resuming_a_trainer_checkpoint_is_refused(tmp_path, tiny_base):
    from transformers import Trainer

    Trainer(model=_model(tiny_base), args=_args(tmp_path, save_strategy="steps", save_steps=4),
            train_dataset=token_rows(), callbacks=[_callback(tiny_base, "l0")]).train()
    checkpoint = tmp_path / "hf" / "checkpoint-4"
    assert checkpoint.is_dir()
    cb = _callback(tiny_base, "l0")
    trainer = Trainer(model=_model(tiny_base), args=_args(tmp_path, save_strategy="steps", save_steps=4),
                      train_dataset=token_rows(), callbacks=[cb])
    with pytest.raises(InvalidValueError, match="cannot resume a Trainer checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert cb.diff is None


def test_a_trainer_on_several_gpus_of_one_process_is_refused_before_a_step(tmp_path, tiny_base):
    """With n_gpu > 1 and no torchrun the Trainer wraps the model in DataParallel: refused, not trained wrongly."""
    from transformers import Trainer

    args = _args(tmp_path)
    args._n_gpu = 2  # what a machine with two visible GPUs gives (DataParallel passes through on CPU)
    cb, watch = _callback(tiny_base, "l0"), _HeadLog()
    trainer = Trainer(model=_model(tiny_base), args=args, train_dataset=token_rows(), callbacks=[cb, watch.callback])
    with pytest.raises(InvalidValueError, match=r"splits each batch over 2 GPUs \(DataParallel\)") as err:
        trainer.train()
    assert "CUDA_VISIBLE_DEVICES=0" in err.value.hint and watch.log == [] and cb.pruner is None


def test_load_best_model_at_end_is_refused_before_a_step(tmp_path, tiny_base):
    from transformers import Trainer

    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="loss")
    cb, watch = _callback(tiny_base, "l0"), _HeadLog()
    trainer = Trainer(model=_model(tiny_base), args=args, train_dataset=token_rows(), eval_dataset=token_rows(8),
                      callbacks=[cb, watch.callback])
    with pytest.raises(InvalidValueError, match="load_best_model_at_end"):
        trainer.train()
    assert watch.log == []


@pytest.mark.parametrize("method", ["l0", "magnitude", "swr", "basis"])
def test_a_first_phase_without_steps_is_refused(tmp_path, tiny_base, method):
    from transformers import Trainer

    with pytest.raises(InvalidValueError, match=r"switch is a fraction of the steps in \(0, 1\)"):
        _callback(tiny_base, method, switch=0.0)
    cb = _callback(tiny_base, method, switch=0.4)  # round(0.4 × 1) = 0 steps before the switch
    with pytest.raises(InvalidValueError, match="leaves the first phase no step"):
        Trainer(model=_model(tiny_base), args=_args(tmp_path, max_steps=1), train_dataset=token_rows(),
                callbacks=[cb]).train()
    cb = _callback(tiny_base, method, switch=0.9)  # round(0.9 × 2) = 2: nothing after the switch
    with pytest.raises(InvalidValueError, match="leaves the fixed phase no step"):
        Trainer(model=_model(tiny_base), args=_args(tmp_path, max_steps=2), train_dataset=token_rows(),
                callbacks=[cb]).train()


def test_double_pruning_needs_a_step_for_each_of_its_two_fixed_phases(tmp_path, tiny_base):
    from transformers import Trainer

    cb = _callback(tiny_base, "double", switch=0.5)  # 4 steps: scales 2, kept scales 1, sparse δ 1
    Trainer(model=_model(tiny_base), args=_args(tmp_path, max_steps=4), train_dataset=token_rows(),
            callbacks=[cb]).train()
    assert cb.diff.nnz > sum(bs.nkept for bs in cb.diff.bases.values())  # the sparse δ was chosen and stored
    cb = _callback(tiny_base, "double", switch=0.6)  # 2 steps: scales 1, then one step for two phases
    with pytest.raises(InvalidValueError, match="leaves double pruning's sparse phase no step"):
        Trainer(model=_model(tiny_base), args=_args(tmp_path, max_steps=2), train_dataset=token_rows(),
                callbacks=[cb]).train()


def test_a_stop_before_the_switch_warns_that_there_is_no_diff(tmp_path, tiny_base):
    from transformers import Trainer, TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 2

    cb = _callback(tiny_base, "l0")
    with pytest.warns(UserWarning, match="before the switch at step 4: no diff was chosen"):
        Trainer(model=_model(tiny_base), args=_args(tmp_path), train_dataset=token_rows(),
                callbacks=[cb, Stop()]).train()
    assert cb.diff is None


@pytest.mark.parametrize("method", ["l0", "double"])
def test_one_callback_serves_two_trainings_each_from_the_start(tmp_path, tiny_base, method):
    """hyperparameter_search reuses callbacks: the second train() found the first's fixed phase still on and
    failed ('the fixed phase has not started'); now each run starts afresh and gives the same diff."""
    from transformers import Trainer

    cb = _callback(tiny_base, method)
    diffs = []
    for _ in range(2):
        Trainer(model=_model(tiny_base), args=_args(tmp_path), train_dataset=token_rows(), callbacks=[cb]).train()
        diffs.append(cb.diff)
    assert diffs[0] is not diffs[1] and set(diffs[0].tensors) == set(diffs[1].tensors)
    for name, td in diffs[0].tensors.items():
        assert torch.equal(td.dense(), diffs[1].tensors[name].dense()), name


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_fisher_batches_below_one_are_refused_at_construction(tiny_base, bad):
    from diffcli import DiffPruningCallback

    with pytest.raises(InvalidValueError, match="fisher_batches"):
        DiffPruningCallback(str(tiny_base), method="fisher", sparsity=0.02, fisher_batches=bad)
