"""Quantization-aware fixed phase (`train --values`): the trained model is exactly what the packed file rebuilds,
on both fixed-phase engines; pack takes the trained value format by default; bad values are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffcli import artifact, checkpoint, quantize
from diffcli.cli.app import app
from diffcli.qat import StoredValues
from tests.test_api import _batches, _model
from tests.training_data import write_task


def _packed_logits(tmp_path, base, diff, values, batch):
    """Pack with `values`, decode the file, apply it to the base: the rebuilt model's logits."""
    from transformers import AutoModelForSequenceClassification

    from diffcli.applying import apply_to_folder

    path = tmp_path / f"{values}.diff"
    artifact.write(diff, path, values=values)
    apply_to_folder(str(base), str(path), tmp_path / f"merged-{values}")
    rebuilt = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"merged-{values}").eval()
    with torch.no_grad():
        return rebuilt(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _train(tiny_base, method, values):
    from diffcli import DiffPruner

    model = _model(tiny_base)
    batches = _batches()
    pruner = DiffPruner(model, str(tiny_base), method=method, sparsity=0.05, total_steps=len(batches),
                        fixmask_lr=3e-2, values=values, **({"lr": 1e-3} if method == "l0" else {}))
    model.train()
    if method == "l0":  # the flat engine (N-sized buffers)
        for b in batches:
            pruner.begin()
            model(**b).loss.backward()
            pruner.finish()
        pruner.project()
    else:  # the k-sparse engine
        pruner.choose_mask(None)
    pruner.start_fixed(total_steps=len(batches))
    for b in batches:
        model(**b).loss.backward()
        pruner.fixed_step()
    model.eval()
    with torch.no_grad():
        want = model(**{k: v for k, v in batches[0].items() if k != "labels"}).logits
    return pruner.export(), want, batches[0]


@pytest.mark.parametrize("method", ["l0", "random"])
@pytest.mark.parametrize("values", ["int4", "ternary"])
def test_the_trained_model_is_what_the_packed_file_rebuilds(tmp_path, tiny_base, method, values):
    diff, want, batch = _train(tiny_base, method, values)
    assert diff.meta["hyperparameters"]["values"] == values
    torch.testing.assert_close(_packed_logits(tmp_path, tiny_base, diff, values, batch), want, rtol=0, atol=1e-5)
    plain, want_plain, _ = _train(tiny_base, method, None)  # without QAT the same packing moves the model
    (tmp_path / "plain").mkdir()
    assert not torch.allclose(_packed_logits(tmp_path / "plain", tiny_base, plain, values, batch), want_plain,
                              atol=1e-5)


def test_stored_values_equal_the_files_values():
    g = np.random.default_rng(0)
    sizes = [300, 0, 17, 129]
    v = g.normal(size=sum(sizes)).astype(np.float32)
    v[5] = 0.0  # a δ still at 0 is not stored and takes no block slot
    for q in ("int8", "int4", "ternary", "bf16"):
        got = StoredValues.for_segments(sizes, q)(torch.from_numpy(v)).numpy()
        nz = v != 0
        counts = np.bincount(np.repeat(np.arange(len(sizes)), sizes)[nz], minlength=len(sizes))
        ref, keep, _ = quantize.quantize_stored(v[nz], counts, q, quantize.check_spec(q, None))
        want = np.zeros(int(nz.sum()), np.float32)
        want[keep] = ref.values
        np.testing.assert_array_equal(got[nz], want)
        assert got[5] == 0
    flat = StoredValues.for_flat([0, 10, 10, 25], torch.tensor([1, 4, 12, 24]), "int8")
    assert flat.tensor_ids.tolist() == [0, 0, 2, 2]


def _cli_train(tmp_path, base, *extra):
    train, dev = write_task(tmp_path / "data")
    out = tmp_path / "ckpt"
    return CliRunner().invoke(app, ["train", "--train-file", str(train), "--validation-file", str(dev), "--model",
                                    str(base), "--sparsity", "5%", "--method", "fisher", "--fixmask-epochs", "1",
                                    "--batch-size", "8", "-o", str(out), "--json", *extra]), out


def test_cli_pack_uses_the_trained_value_format(tmp_path, tiny_base):
    result, ckpt = _cli_train(tmp_path, tiny_base, "--values", "int4")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(ckpt).meta["hyperparameters"]["values"] == "int4"
    packed = CliRunner().invoke(app, ["pack", str(ckpt), "-o", str(tmp_path / "a.diff"), "--json"])
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout)["values"] == "int4"
    assert "warning" not in packed.stderr
    override = CliRunner().invoke(app, ["pack", str(ckpt), "-o", str(tmp_path / "b.diff"), "--values", "fp16",
                                        "--json"])
    assert json.loads(override.stdout)["values"] == "fp16"  # packed as asked, and told why that is another model
    assert "warning: " in override.stderr and "trained for int4 values" in override.stderr
    assert "never evaluated" in override.stderr
    blocks = CliRunner().invoke(app, ["pack", str(ckpt), "-o", str(tmp_path / "c.diff"), "--block", "32"])
    assert blocks.exit_code == 0 and "packed as int4 in blocks of 32" in blocks.stderr
    same = CliRunner().invoke(app, ["pack", str(ckpt), "-o", str(tmp_path / "d.diff"), "--block", "64"])
    assert same.exit_code == 0 and "warning" not in same.stderr  # int4's default block: the trained format


def test_eval_and_apply_of_the_checkpoint_folder_rebuild_the_model_its_training_evaluated(tmp_path, tiny_base):
    """The folder keeps the full-precision δ (so pack may choose a format); every reader takes it as the trained
    format packs it, so eval of the folder is the trainer's best score and apply of it is the packed file's model."""
    from safetensors.torch import load_file

    result, ckpt = _cli_train(tmp_path, tiny_base, "--values", "ternary", "--method", "l0", "--epochs", "1",
                              "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    best = json.loads(result.stdout)["after_fixmask"]["metrics"]["validation"]
    kept = checkpoint.load(ckpt)
    stored = artifact.loads(artifact.pack(kept, "ternary"))
    assert any(not torch.equal(kept.tensors[n].dense(), stored.tensors[n].dense()) for n in kept.tensors)
    run = CliRunner()
    packed = tmp_path / "t.diff"
    assert run.invoke(app, ["pack", str(ckpt), "-o", str(packed)]).exit_code == 0
    data = ["--validation-file", str(tmp_path / "data" / "dev.csv"), "--text-fields", "sentence", "--label-field",
            "label", "--json"]
    for source in (ckpt, packed):
        res = run.invoke(app, ["eval", str(tiny_base), str(source), *data])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["metrics"]["validation"] == best, source
    for source, out in ((ckpt, "from-folder"), (packed, "from-file")):
        assert run.invoke(app, ["apply", str(tiny_base), str(source), "-o", str(tmp_path / out)]).exit_code == 0
    a, b = (load_file(str(tmp_path / o / "model.safetensors")) for o in ("from-folder", "from-file"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--values", "int3"], "--values 'int3' is not one of"),
    (["--method", "swr", "--values", "int4"], "--method swr does not take --values"),
])
def test_bad_values_are_refused_before_training(tmp_path, tiny_base, extra, message):
    train, dev = write_task(tmp_path / "data")
    out = tmp_path / "ckpt"
    args = ["train", "--train-file", str(train), "--validation-file", str(dev), "--model", str(tiny_base),
            "-o", str(out), *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()
