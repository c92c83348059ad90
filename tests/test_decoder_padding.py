"""Decoder classifiers (GPT-2) pool at each row's last token that is not `config.pad_token_id`: rows must be padded
with that id in training and in `eval`, or a padded row is scored at a padding position and the score depends on
the batch size."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from diffcli import task_types
from diffcli.cli.app import app
from diffcli.prediction import predict
from diffcli.tasks import encode, padding_id
from tiny_lms import EOS, PAD, make_gpt2

runner = CliRunner()
WORDS = "the a is not good bad movie cat dog yes no sat on mat john paris big small runs".split()


def _write(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for _ in range(n):
            s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
            w.writerow([s, int("good" in s)])
    return path


def _data(tmp_path):
    kind = task_types.get(task_types.DEFAULT)
    data = kind.load(train_file=_write(tmp_path / "train.csv", 40, 0), validation_file=_write(tmp_path / "dev.csv", 30, 1),
                     text_fields=["sentence"], label_field="label")
    return kind, data


def _one_at_a_time(model, tokenizer, examples):
    with torch.no_grad():
        return torch.cat([model(**tokenizer(e.texts[0], return_tensors="pt")).logits for e in examples])


@pytest.mark.parametrize("value, expected", [(None, None), (0, 0), (5, 5), (63, 63), (64, None), (-1, None),
                                             (True, None), ([1], None)])
def test_padding_id_takes_only_an_id_the_vocabulary_holds(value, expected):
    assert padding_id(type("C", (), {"pad_token_id": value, "vocab_size": 64})()) == expected
    assert padding_id(None) is None


def test_a_config_pad_outside_the_vocabulary_is_replaced_by_the_tokenizers(tmp_path):
    """GPT-2 loads a config whose pad id its embedding cannot look up: the head pads as the tokenizer does."""
    import json as _json

    kind, data = _data(tmp_path)
    base = make_gpt2(tmp_path / "gpt2")
    cfg = _json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(_json.dumps({**cfg, "pad_token_id": 64}))
    tm = kind.build(base, data, seed=0)
    assert tm.model.config.pad_token_id == PAD
    logits, _ = predict(tm.model.eval(), tm.tokenizer, data.eval["validation"], batch_size=64)
    assert logits.shape == (len(data.eval["validation"]), 2)


def test_training_pads_with_the_bases_own_pad_id(tmp_path, monkeypatch):
    """A base whose config names a pad id (eos) other than its tokenizer's (0): the train set pads with the config's,
    the id the head pools by, as eval does."""
    import json as _json

    from diffcli.train_options import TrainOptions
    from diffcli.training import train

    kind, _ = _data(tmp_path)
    base = make_gpt2(tmp_path / "gpt2")
    cfg = _json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(_json.dumps({**cfg, "pad_token_id": EOS}))
    pads = []
    encode_orig = type(kind).encode

    def spy(self, *args, **kw):
        out = encode_orig(self, *args, **kw)
        pads.append(out.pad_token_id)
        return out

    monkeypatch.setattr(type(kind), "encode", spy)
    train(train_file=str(tmp_path / "train.csv"), validation_file=str(tmp_path / "dev.csv"), text_fields=["sentence"],
          label_field="label", model=str(base), output=tmp_path / "ck",
          options=TrainOptions(method="random", sparsity=0.05, fixmask_epochs=1, batch_size=8))
    assert pads == [EOS]


def test_encode_pads_with_the_id_it_is_given_else_the_tokenizers(tmp_path):
    kind, data = _data(tmp_path)
    tok = kind.tokenizer(make_gpt2(tmp_path / "gpt2"))
    assert encode(data.train, tok, 64).pad_token_id == PAD
    assert encode(data.train, tok, 64, EOS).pad_token_id == EOS
    batch = encode(data.train[:2], tok, 64, EOS).collate([encode(data.train[:2], tok, 64, EOS)[i] for i in (0, 1)])
    lengths = batch["attention_mask"].sum(1)
    short = int(lengths.argmin())
    assert (batch["input_ids"][short, int(lengths[short]):] == EOS).all()


def test_a_new_head_pads_as_the_tokenizer_does(tmp_path):
    kind, data = _data(tmp_path)
    base = make_gpt2(tmp_path / "gpt2")  # its tokenizer pads with <pad> (0); its config names no pad id
    tm = kind.build(base, data, seed=0)
    assert tm.model.config.pad_token_id == tm.tokenizer.pad_token_id == PAD
    nopad = make_gpt2(tmp_path / "nopad")  # GPT-2's own tokenizer has no pad token: rows are padded with eos
    tok = kind.tokenizer(nopad)
    tok.pad_token = None
    tok.save_pretrained(nopad)
    tm = kind.build(nopad, data, seed=0)
    assert tm.tokenizer.pad_token_id is None and tm.model.config.pad_token_id == EOS
    assert encode(data.train, tm.tokenizer, 64, padding_id(tm.model.config)).pad_token_id == EOS


def test_predict_pads_with_the_models_pad_id_not_the_tokenizers(tmp_path):
    """A model whose config pads with eos (3) beside a tokenizer padding with 0 (as diffs trained before the fix
    are): batched logits must equal unpadded ones, one example at a time."""
    kind, data = _data(tmp_path)
    base = make_gpt2(tmp_path / "gpt2")
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=EOS).eval()
    tok = kind.tokenizer(base)
    assert tok.pad_token_id == PAD != model.config.pad_token_id
    examples = data.eval["validation"]
    logits, _ = predict(model, tok, examples, batch_size=64)
    torch.testing.assert_close(torch.from_numpy(logits), _one_at_a_time(model, tok, examples), rtol=1e-4, atol=1e-5)


def test_gpt2_eval_does_not_depend_on_the_batch_size_and_matches_the_applied_model(tmp_path):
    _data(tmp_path)  # writes train.csv and dev.csv
    base = make_gpt2(tmp_path / "gpt2")
    files = ["--validation-file", str(tmp_path / "dev.csv"), "--text-fields", "sentence", "--label-field", "label"]
    res = runner.invoke(app, ["train", "--train-file", str(tmp_path / "train.csv"), *files, "--model", str(base),
                              "--method", "random", "--sparsity", "5%", "--fixmask-epochs", "1", "-o",
                              str(tmp_path / "ck"), "--quiet"])
    assert res.exit_code == 0, res.output
    scores = []
    for bs in ("1", "4", "64"):
        res = runner.invoke(app, ["eval", str(base), str(tmp_path / "ck"), *files, "--batch-size", bs, "--json"])
        assert res.exit_code == 0, res.output
        scores.append(json.loads(res.stdout)["metrics"]["validation"]["accuracy"])
    res = runner.invoke(app, ["apply", str(base), str(tmp_path / "ck"), "-o", str(tmp_path / "applied"), "--quiet"])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "applied").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "applied")
    examples = task_types.get(task_types.DEFAULT).load(
        train_file=tmp_path / "train.csv", validation_file=tmp_path / "dev.csv", text_fields=["sentence"],
        label_field="label").eval["validation"]
    reference = (_one_at_a_time(model, tok, examples).argmax(-1) == torch.tensor([e.label for e in examples]))
    assert scores == [pytest.approx(float(reference.float().mean()))] * 3
