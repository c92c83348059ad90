"""swr and basis through the public API on a tiny random BERT: a hand-written loop gives the CLI's diff for the same
seed (train drives the same DiffPruner), the diff packs, verifies and rebuilds the model, and misuse is one error."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffcli import artifact, checkpoint, task_types
from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from conftest import token_rows
from tests.training_data import write_task

FAST = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--max-seq-length", "32"]
ARGS = {"swr": ["--method", "swr", "--lr", "1e-2", "--rank", "2", "--budget", "3000", "--alpha-lr", "0.2"],
        "basis": ["--method", "basis", "--basis-lr", "1e-2", "--keep-bases", "0.5"],
        "double": ["--method", "basis", "--basis-lr", "1e-2", "--sparsity", "2%", "--fill-samples", "16"]}
OPTIONS = {"swr": dict(method="swr", lr=1e-2, rank=2, budget="3000", alpha_lr=0.2),
           "basis": dict(method="basis", basis_lr=1e-2, keep_bases=0.5),
           "double": dict(method="basis", basis_lr=1e-2, sparsity=0.02, fill_samples=16)}  # sparsity: double pruning


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from conftest import make_base

    root = tmp_path_factory.mktemp("api-methods")
    train, dev = write_task(root / "data")
    return {"root": root, "base": make_base(root / "base"), "train": train, "dev": dev}


def rising(mp) -> None:
    """Every evaluation scores higher than the last: `train` keeps its last epoch, as a plain loop ends."""
    calls = iter(range(10**6))
    for where in ("diffcli.fixmask", "diffcli.trainloop", "diffcli.methods.basis", "diffcli.methods.swr"):
        mp.setattr(f"{where}.main_score", lambda spec, results: float(next(calls)))


def _cli(task, out, method: str):
    args = ["train", "--train-file", str(task["train"]), "--validation-file", str(task["dev"]), "--model",
            str(task["base"]), *FAST, *ARGS[method], "-o", str(out), "--json"]
    with pytest.MonkeyPatch.context() as mp:
        rising(mp)
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), checkpoint.load(out)


def _library(task, method: str, seed: int = 42):
    """The same run as `_cli` in a plain loop over the public API (the data in `train`'s order)."""
    from diffcli import DiffPruner

    kind = task_types.get(None)
    data = kind.load(None, train_file=str(task["train"]), validation_file=str(task["dev"]))
    tm = kind.build(task["base"], data, seed)
    ds = kind.encode(data.train, tm.tokenizer, data.spec, 32)
    model = tm.model

    def batches(data_seed: int):  # one epoch as `train` orders it (DistributedSampler on one process)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(data_seed)).tolist()
        return [ds.collate([ds[i] for i in order[j:j + 8]]) for j in range(0, len(order), 8)]

    first = batches(seed)
    pruner = DiffPruner(model, task["base"], total_steps=len(first), seed=seed, batch_size=8, max_seq_length=32,
                        **OPTIONS[method])
    torch.manual_seed(seed)  # dropout, as train seeds it
    model.train()
    for batch in first:  # swr: sampled unit gates over B·A and δ; basis: the scales and their importance
        pruner.begin()
        model(**batch).loss.backward()
        pruner.finish()
    pruner.project()  # swr: the units that fit the budget; basis: prune to --keep-bases
    fixed = batches(seed + 1)
    pruner.start_fixed(total_steps=len(fixed))
    for batch in fixed:
        model(**batch).loss.backward()
        pruner.fixed_step()
    if method == "double":  # the sparse δ on the scaled model, Fisher-ranked, then its own fixed phase
        pruner.choose_mask(batches(seed + 2)[:2])
        pruner.start_fixed(total_steps=len(fixed))
        for batch in fixed:
            model(**batch).loss.backward()
            pruner.fixed_step()
    return pruner.export(), model


def _same(cli, lib) -> None:
    assert cli.tensors.keys() == lib.tensors.keys() and cli.extras.keys() == lib.extras.keys()
    for name, td in cli.tensors.items():
        other = lib.tensors[name]
        assert td.is_lowrank == other.is_lowrank, name
        if td.is_lowrank:
            assert all(torch.equal(a, b) for a, b in zip(td.factors, other.factors)), name
        else:
            assert torch.equal(td.indices, other.indices) and torch.equal(td.values, other.values), name
    for name, t in cli.extras.items():
        assert torch.equal(t, lib.extras[name]), name
    assert cli.bases.keys() == lib.bases.keys()
    for name, bs in cli.bases.items():
        other = lib.bases[name]
        assert torch.equal(bs.kept, other.kept) and torch.equal(bs.values, other.values) and bs.probe == other.probe


@pytest.mark.parametrize("method", ["swr", "basis", "double"])
def test_library_loop_and_cli_give_the_same_diff(task, tmp_path, method):
    summary, cli = _cli(task, tmp_path / "cli", method)
    if method != "swr":  # the kept scales' fixed phase kept its trained epoch
        assert summary["bases"]["best"]["epoch"] == 1
    if method != "basis":  # the trained epoch of the (sparse δ's or the units') fixed phase is the one written
        assert summary["after_fixmask"]["epoch"] == 1
    lib, model = _library(task, method)
    _same(cli, lib)
    if method == "swr":
        assert any(td.is_lowrank for td in lib.tensors.values()) and lib.nnz <= 3000
        assert [u["chosen"] for u in lib.meta["units"]] == [u["chosen"] for u in cli.meta["units"]]
    else:
        assert lib.bases and (lib.nnz > sum(bs.nkept for bs in lib.bases.values())) == (method == "double")
    # the library's diff packs, verifies and rebuilds the model it trained
    packed = tmp_path / "lib.diff"
    artifact.write(lib, packed, values="fp32")
    result = CliRunner().invoke(app, ["verify", str(packed), "--base", str(task["base"])])
    assert result.exit_code == 0, result.output
    _rebuilds(task, tmp_path, packed, model)


def _rebuilds(task, tmp_path, packed, model) -> None:
    from transformers import AutoModelForSequenceClassification

    result = CliRunner().invoke(app, ["apply", str(task["base"]), str(packed), "-o", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    rebuilt = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    batch = {"input_ids": torch.randint(5, 40, (3, 9), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch).logits, model.eval()(**batch).logits, rtol=1e-5, atol=1e-5)


def _model(base):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)


@pytest.mark.parametrize("method, options, call, message", [
    ("swr", dict(fill="fisher"), None, "--method swr does not take --fill (taken by --method l0)"),
    ("swr", dict(rank=0), None, "--rank must be an integer ≥ 1"),
    ("swr", dict(budget="0"), None, "--budget 0 gives 0 parameters"),
    ("swr", dict(rank=40), None, "--rank 40 exceeds the smaller dimension"),
    ("basis", dict(alpha_lr=0.1), None, "--method basis does not take --alpha-lr"),
    ("basis", dict(keep_bases=1.5), None, "--keep-bases is a fraction"),
    ("basis", dict(budget="10", sparsity=0.01), None, "must exceed the"),
    ("l0", dict(rank=4), None, "--method l0 does not take --rank (taken by --method swr)"),
    ("l0", dict(keep_bases=0.5), None, "--method l0 does not take --keep-bases"),
    ("swr", {}, "choose_mask", "--method swr learns its mask: call project()"),
    ("swr", {}, "start_fixed", "no mask yet"),
    ("swr", {}, "export", "nothing to export yet"),
    ("swr", {}, "finish", "finish() before begin()"),
    ("basis", {}, "choose_mask", "the bases are not pruned yet"),
    ("basis", {}, "export", "nothing to export yet"),
    ("basis", dict(sparsity=0.02), "project+choose_mask", "needs batches of training data"),
    ("random", {}, "project", "--method random has no first phase to end: call choose_mask()"),
])
def test_misuse_is_one_clear_error(task, method, options, call, message):
    from diffcli import DiffPruner

    def go():
        pruner = DiffPruner(_model(task["base"]), task["base"], method=method, **options)
        for name in (call or "").split("+"):
            if name == "start_fixed":
                pruner.start_fixed(total_steps=1)
            elif name:
                getattr(pruner, name)()

    with pytest.raises(InvalidValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        go()


def test_swr_first_phase_ends_with_project(task):
    from diffcli import DiffPruner

    pruner = DiffPruner(_model(task["base"]), task["base"], method="swr", rank=2)
    pruner.project()
    with pytest.raises(InvalidValueError, match="project\\(\\) has ended it"):
        pruner.begin()


@pytest.mark.parametrize("method", ["swr", "basis", "double"])
def test_trainer_callback_trains_swr_and_basis_diffs_that_pack_verify_and_apply(task, tmp_path, method):
    from transformers import Trainer, TrainingArguments

    from diffcli import DiffPruningCallback

    model = _model(task["base"])
    options = {k: v for k, v in OPTIONS[method].items() if k != "method"}
    cb = DiffPruningCallback(str(task["base"]), method=OPTIONS[method]["method"], fisher_batches=2, fixmask_lr=1e-2,
                             **options)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=8, num_train_epochs=3,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0)
    Trainer(model=model, args=args, train_dataset=token_rows(), callbacks=[cb]).train()
    diff = cb.diff
    assert diff is not None and sorted(diff.extras) == ["classifier.bias", "classifier.weight"]
    if method == "swr":
        assert any(td.is_lowrank for td in diff.tensors.values()) and diff.nnz <= 3000
    else:
        kept = sum(bs.nkept for bs in diff.bases.values())
        assert kept == round(0.5 * cb.pruner.method_state.nbases)
        assert diff.nnz == kept + (round(0.02 * diff.budget_numel) if method == "double" else 0)
    packed = tmp_path / "cb.diff"
    artifact.write(diff, packed, values="fp32")
    result = CliRunner().invoke(app, ["verify", str(packed), "--base", str(task["base"])])
    assert result.exit_code == 0, result.output
    _rebuilds(task, tmp_path, packed, model)


def test_trainer_callback_refuses_a_multi_process_trainer_with_one_line(task):
    from types import SimpleNamespace

    from diffcli import DiffPruningCallback

    cb = DiffPruningCallback(str(task["base"]), method="swr")
    with pytest.raises(InvalidValueError, match="trains in one process, and this Trainer runs 2") as info:
        cb.on_train_begin(SimpleNamespace(world_size=2), SimpleNamespace(max_steps=10), None,
                          model=_model(task["base"]))
    assert "\n" not in str(info.value) and cb.pruner is None


@pytest.mark.parametrize("method", ["swr", "basis"])
def test_export_right_after_the_choice_is_the_model_as_it_is(task, tmp_path, method):
    """project() leaves the model at what it chose (swr: θ₀ + ẑ·Δ at the chosen units; basis: the pruned scales),
    so a diff exported before any fixed step rebuilds it."""
    from diffcli import DiffPruner
    from diffcli.applying import apply_to_folder
    from transformers import AutoModelForSequenceClassification

    model = _model(task["base"])
    batch = {"input_ids": torch.randint(5, 40, (8, 9), generator=torch.Generator().manual_seed(1)),
             "attention_mask": torch.ones(8, 9, dtype=torch.long), "labels": torch.tensor([0, 1] * 4)}
    options = {k: v for k, v in OPTIONS[method].items() if k != "method"}
    pruner = DiffPruner(model, task["base"], method=OPTIONS[method]["method"], total_steps=3, **options)
    model.train()
    for _ in range(3):
        pruner.begin()
        model(**batch).loss.backward()
        pruner.finish()
    pruner.project()
    diff = pruner.export()
    assert diff.nnz > 0
    apply_to_folder(str(task["base"]), diff, tmp_path / "merged")
    rebuilt = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, options, message", [
    ("swr", dict(alpha=0.1), "unknown option 'alpha'"),
    ("swr", dict(structured=False), "--method swr does not take --structured"),
    ("basis", dict(keep_bases=0), "--keep-bases is a fraction"),
    ("nope", {}, "unknown --method 'nope'"),
])
def test_trainer_callback_refuses_bad_options_when_built(task, method, options, message):
    from diffcli import DiffPruningCallback

    with pytest.raises(InvalidValueError, match=message):
        DiffPruningCallback(str(task["base"]), method=method, **options)
