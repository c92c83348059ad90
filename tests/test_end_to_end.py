"""One user journey on a tiny model: train → prune → pack → verify → inspect → apply → load → eval."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from diffcli import artifact, checkpoint
from diffcli.cli.app import app
from tests.training_data import write_task


def run(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (args, result.output)
    return result


def test_train_prune_pack_apply_load(tmp_path, tiny_base):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, dev = write_task(tmp_path / "data")
    ckpt, pruned, packed, merged = (tmp_path / n for n in ("ckpt", "pruned", "task.diff", "merged"))
    run("train", "--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
        "--sparsity", "2%", "--epochs", "1", "--fixmask-epochs", "1", "--batch-size", "8", "--lr", "1e-3",
        "-o", str(ckpt), "--quiet")
    trained = checkpoint.load(ckpt)
    assert trained.nnz == round(0.02 * trained.budget_numel)

    report = json.loads(run("prune", str(ckpt), "--sparsity", "1%", "-o", str(pruned), "--json").stdout)
    assert report["kept"] == round(0.01 * trained.budget_numel)
    run("pack", str(pruned), "-o", str(packed), "--values", "fp32")
    run("verify", str(packed), "--base", str(tiny_base))
    inspected = json.loads(run("inspect", str(packed), "--json").stdout)
    assert inspected["totals"]["nnz"] == report["kept"]
    assert inspected["meta"]["hyperparameters"]["sparsity"] == 0.02  # training metadata survives pack

    run("apply", str(tiny_base), str(packed), "-o", str(merged))
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)

    # The rebuilt weights are exactly base + pruned diff (fp32 values), head included.
    diff = artifact.load(packed)
    state = model.state_dict()
    from diffcli.weights import WeightStore

    base = WeightStore(tiny_base)
    for name, td in diff.tensors.items():
        assert torch.equal(state[name], base[td.base_name] + td.dense()), name
    for name, t in diff.extras.items():
        assert torch.equal(state[name], t), name

    # eval on base + diff in memory gives the numbers of the loaded model.
    result = json.loads(run("eval", str(tiny_base), str(packed), "--validation-file", str(dev),
                            "--text-fields", "sentence", "--label-field", "label", "--json").stdout)
    from diffcli.evaluation import evaluate
    from diffcli.data_sources import load_task

    data = load_task(validation_file=str(dev), train_file=str(train), text_fields=["sentence"], label_field="label")
    expected = evaluate(model, tokenizer, data)
    assert result["metrics"] == expected
