"""`diffprune train` through the CLI: a real run with --json, and every documented error exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcli import checkpoint
from diffcli.cli.app import app
from tests.training_data import write_task

FAST = ["--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--lr", "1e-3"]


def _invoke(*args: str):
    return CliRunner().invoke(app, ["train", *args])


@pytest.fixture
def data(tmp_path):
    return write_task(tmp_path / "data")


def test_train_json_summary_and_checkpoint(tmp_path, tiny_base, data):
    train, dev = data
    out = tmp_path / "ckpt"
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--method", "l0", "--sparsity", "2%", "--no-structured", "--l0-lambda", "1e-6", *FAST,
                     "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    diff = checkpoint.load(out)
    assert summary["nnz"] == diff.nnz == round(0.02 * diff.budget_numel)
    assert summary["output"] == str(out)
    for key in ("after_l0", "after_projection", "after_fixmask"):
        assert "validation" in summary[key]["metrics"]
    hp = diff.meta["hyperparameters"]
    assert hp["structured"] is False and hp["l0_lambda"] == 1e-6 and hp["sparsity"] == 0.02


def test_the_default_method_is_the_magnitude_mask_after_5_dense_epochs(tmp_path, tiny_base, data):
    """What the equal-compute table made the default (README: Quality at equal compute): 5 dense, 3 fixed epochs."""
    from diffcli.train_options import TrainOptions

    train, dev = data
    out = tmp_path / "ckpt"
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--sparsity", "2%", "--batch-size", "8", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == "magnitude" and summary["epochs"] == {"dense": 5, "fixmask": 3}
    assert summary["after_l0"] is None and "L0 epoch" not in result.stderr
    diff = checkpoint.load(out)
    assert diff.meta["method"] == "magnitude-mask" and diff.nnz <= round(0.02 * diff.budget_numel)
    assert (TrainOptions().method, TrainOptions().epochs, TrainOptions().fixmask_epochs) == ("magnitude", 5, 3)
    import inspect

    from diffcli import DiffPruner, DiffPruningCallback
    for api in (DiffPruner.__init__, DiffPruningCallback.__init__):  # the library's default is train's
        assert inspect.signature(api).parameters["method"].default == "magnitude"
    refused = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                      "--alpha-lr", "0.1", "-o", str(tmp_path / "c"))  # an L0 flag names the default it meets
    assert refused.exit_code == 2 and "--method magnitude does not take --alpha-lr" in refused.stderr
    assert "--method magnitude is the default" in refused.stderr  # said only when --method was not typed
    named = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                    "--method", "random", "--alpha-lr", "0.1", "-o", str(tmp_path / "c"))
    assert named.exit_code == 2 and "is the default" not in named.stderr


def test_train_human_output_has_epoch_lines(tmp_path, tiny_base, data):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--method", "l0", "--sparsity", "0.02", *FAST, "-o", str(tmp_path / "ckpt"))
    assert result.exit_code == 0, result.output
    assert "L0 epoch 1/1" in result.stderr and "fixed-mask epoch 1/1" in result.stderr
    diff = checkpoint.load(tmp_path / "ckpt")
    assert "after projection" in result.stdout and "after fixed mask" in result.stdout
    assert f"nnz {diff.nnz} of {diff.budget_numel}" in result.stdout


@pytest.mark.parametrize("sparsity", ["150%", "0", "abc", "-1%"])
def test_bad_sparsity_exits_2(tmp_path, tiny_base, data, sparsity):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--sparsity", sparsity, "-o", str(tmp_path / "ckpt"))
    assert result.exit_code == 2
    assert "sparsity" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "ckpt").exists()


def test_unknown_task_exits_2(tmp_path, tiny_base):
    result = _invoke("--task", "glu", "--data-dir", str(tmp_path), "--model", str(tiny_base), "-o", str(tmp_path / "c"))
    assert result.exit_code == 2
    assert "unknown task" in result.stderr


def test_missing_data_folder_exits_3(tmp_path, tiny_base):
    result = _invoke("--task", "mrpc", "--data-dir", str(tmp_path / "nowhere"), "--model", str(tiny_base),
                     "-o", str(tmp_path / "c"))
    assert result.exit_code == 3
    assert "not found" in result.stderr


def test_missing_column_exits_7(tmp_path, tiny_base, data):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--label-field", "nope", "-o", str(tmp_path / "c"))
    assert result.exit_code == 7
    assert "nope" in result.stderr


def test_bad_option_value_exits_2(tmp_path, tiny_base, data):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--method", "l0", "--gate-l", "0.5", "-o", str(tmp_path / "c"))
    assert result.exit_code == 2
    assert "l < 0" in result.stderr


def test_bad_device_exits_2(tmp_path, tiny_base, data):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--device", "tpu", "-o", str(tmp_path / "c"))
    assert result.exit_code == 2
    assert "device" in result.stderr


def test_existing_output_exits_6_before_any_work(tmp_path, tiny_base, data):
    train, dev = data
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "-o", str(out))
    assert result.exit_code == 6
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_leftover_partial_run_needs_resume_or_force(tmp_path, tiny_base, data):
    train, dev = data
    out = tmp_path / "ckpt"
    (tmp_path / "ckpt.partial").mkdir()
    (tmp_path / "ckpt.partial" / "state.json").write_text("{}")
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "-o", str(out))
    assert result.exit_code == 6
    assert "--resume" in result.stderr
    broken = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "-o", str(out), "--resume")
    assert broken.exit_code == 4  # an unreadable work folder is reported, not trusted
    assert not out.exists()


def test_no_l0_epochs_warns_that_the_budget_is_not_filled(tmp_path, tiny_base, data):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--method", "l0", "--epochs", "0", "--fixmask-epochs", "1", "-o", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert "fewer than the budget" in result.stderr
    assert checkpoint.load(tmp_path / "c").nnz == 0


@pytest.mark.parametrize("method, args", [("l0", ["--epochs", "0"]), ("random", [])])
def test_a_run_that_trains_nothing_is_refused_before_it_starts(tmp_path, tiny_base, data, method, args):
    """No epoch in any phase: the diff would be empty (it was written, exit 0)."""
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--method", method, *args, "--fixmask-epochs", "0", "-o", str(tmp_path / "c"))
    assert result.exit_code == 2 and "trains nothing" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_output_folder_problems_are_found_before_training(tmp_path, tiny_base, data, monkeypatch):
    """A missing folder is 'not found' (exit 3, as documented); one that cannot be written is refused before the
    first epoch, not after it (the message named a temporary path)."""
    import os

    train, dev = data
    common = ["--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base)]
    result = _invoke(*common, "-o", str(tmp_path / "nope" / "c"))
    assert result.exit_code == 3 and "output folder" in result.stderr and "does not exist" in result.stderr
    (tmp_path / "file").write_text("x")
    result = _invoke(*common, "-o", str(tmp_path / "file" / "c"))
    assert result.exit_code == 2 and "is not a folder" in result.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro else real(p, mode, **kw))
    result = _invoke(*common, *FAST, "-o", str(ro / "c"))
    assert result.exit_code == 1 and f"cannot write {ro / 'c'}" in result.stderr
    assert "epoch" not in result.stderr and "Traceback" not in result.output


def test_a_max_seq_length_above_the_models_positions_is_refused_before_training(tmp_path, tiny_base, data):
    """Long inputs crashed mid-training (exit 70); the default is cut to the tiny model's 64 positions."""
    train, dev = data
    common = ["--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base)]
    result = _invoke(*common, *FAST, "--max-seq-length", "512", "-o", str(tmp_path / "c"))
    assert result.exit_code == 2 and "--max-seq-length 512 is above the 64 positions" in result.stderr
    assert not (tmp_path / "c").exists() and "epoch" not in result.stderr
    result = _invoke(*common, *FAST, "-o", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    assert checkpoint.load(tmp_path / "c").meta["hyperparameters"]["max_seq_length"] == 64


def test_cli_defaults_are_the_library_defaults():
    """Every TrainOptions field is a `train` flag with the same default (no drift between the two)."""
    import dataclasses
    import inspect

    from diffcli.cli.cmd_train import train
    from diffcli.training import TrainOptions

    cli = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    missing = [f.name for f in dataclasses.fields(TrainOptions) if f.name not in cli]
    assert not missing, f"TrainOptions fields without a train flag: {missing}"  # every default is a flag
    checked = 0
    for f in dataclasses.fields(TrainOptions):
        want, got = f.default, cli[f.name]
        if f.name == "sparsity":  # the CLI takes "0.5%"
            got = float(got.rstrip("%")) / 100
        assert got == want, f"--{f.name.replace('_', '-')}: CLI default {got!r}, TrainOptions default {want!r}"
        checked += 1
    assert checked >= 20


def _train_help() -> dict[str, str]:
    import click
    import typer

    top = typer.main.get_command(app)
    train = top.get_command(click.Context(top), "train")
    return {p.name: p.help or "" for p in train.params}


def test_shared_phase_options_name_every_method_that_reads_them():
    """--epochs said 'of the L0 phase', --lr 'of w', --fill-samples named --fill only: each also drives other
    methods' phases; --weight-decay said 'of w and the head', which for basis is the head only."""
    from diffcli.methods import all_methods

    helps = _train_help()
    for option in ("epochs", "lr", "fill_samples"):
        takers = [name for name, m in all_methods().items() if option in m.options]
        assert len(takers) > 1 and all(name in helps[option] for name in takers), (option, takers, helps[option])
    assert "basis: the head only" in helps["weight_decay"]
    assert "of w" not in helps["lr"] + helps["weight_decay"] and "L0 phase" not in helps["epochs"]
    assert all(len(helps[o]) <= 100 for o in ("epochs", "lr", "fill_samples", "weight_decay")), helps


def test_regression_reads_whole_number_scores_as_scores(tmp_path, tiny_base):
    """1..5 ratings are classes unless --regression says they are scores: then a one-output head and pearson."""
    rows = ["sentence,score", *(f"w{i} good x{i % 3},{1 + i % 5}" for i in range(30))]
    for name in ("train.csv", "dev.csv"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    files = ["--train-file", str(tmp_path / "train.csv"), "--validation-file", str(tmp_path / "dev.csv"),
             "--label-field", "score", "--model", str(tiny_base), *FAST]
    as_classes = _invoke(*files, "-o", str(tmp_path / "cls"), "--json")
    assert as_classes.exit_code == 0, as_classes.output
    assert "accuracy" in json.loads(as_classes.stdout)["after_fixmask"]["metrics"]["validation"]
    scored = _invoke(*files, "--regression", "-o", str(tmp_path / "reg"), "--json")
    assert scored.exit_code == 0, scored.output
    assert "pearson" in json.loads(scored.stdout)["after_fixmask"]["metrics"]["validation"]
    heads = {out: checkpoint.load(tmp_path / out).extras["classifier.weight"].shape[0] for out in ("cls", "reg")}
    assert heads == {"cls": 5, "reg": 1}


@pytest.mark.parametrize("extra, needle", [
    (["--task", "rte", "--data-dir", "."], "task rte has its own labels"),
    (["--task-type", "token-classification"], "applies to --task-type sequence-classification"),
])
def test_regression_with_a_task_of_its_own_labels_exits_2(tmp_path, tiny_base, data, extra, needle):
    train, dev = data
    result = _invoke("--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
                     "--regression", *extra, "-o", str(tmp_path / "c"))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


def test_epochs_default_to_5_where_a_method_has_a_first_phase_and_stay_3_in_the_record_elsewhere():
    """5 is the table's split for the first phase; random and fisher have none, and record the old 3 so that their
    checkpoints (and the benchmark's cached .diff files) keep the same bytes."""
    from diffcli.train_options import TrainOptions

    assert [TrainOptions(method=m).epochs for m in ("magnitude", "l0", "swr", "basis")] == [5, 5, 5, 5]
    assert [TrainOptions(method=m).epochs for m in ("random", "fisher")] == [3, 3]
    assert TrainOptions(method="random", epochs=0).epochs == 0  # given is kept
    TrainOptions(method="fisher").validate()  # its recorded 3 is its default, not a foreign option
