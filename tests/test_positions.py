"""`--max-seq-length` against the model's position table: refused above it (exit 2), defaulted below it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffcli.cli.app import app
from diffcli.errors import InvalidValueError
from diffcli.positions import max_positions, seq_length_for


def _config(cls, **kw) -> dict:
    import transformers

    return getattr(transformers, cls)(**kw).to_dict()


@pytest.mark.parametrize("cls, kw, limit", [
    ("BertConfig", {}, 512),
    ("GPT2Config", {"n_positions": 256}, 256),
    ("RobertaConfig", {}, 510),               # positions start after the padding index (1)
    ("LlamaConfig", {}, None),                # rotary: a context length, not a table
    ("GPTNeoXConfig", {}, None),
    ("DebertaV2Config", {"position_biased_input": False}, None),
])
def test_max_positions_of_real_configs(cls, kw, limit):
    assert max_positions(_config(cls, **kw)) == limit


def test_seq_length_defaults_to_128_or_fewer_and_refuses_more_than_the_table():
    bert = _config("BertConfig", max_position_embeddings=64)
    assert seq_length_for(bert, None, "it") == 64 and seq_length_for(_config("BertConfig"), None, "it") == 128
    assert seq_length_for(bert, 64, "it") == 64
    with pytest.raises(InvalidValueError, match="--max-seq-length 65 is above the 64 positions"):
        seq_length_for(bert, 65, "it")
    assert seq_length_for(_config("LlamaConfig"), 100_000, "it") == 100_000


def test_eval_refuses_a_max_seq_length_above_the_models_positions(tiny_base, tiny_finetune, tmp_path):
    """Long inputs used to crash mid-evaluation (exit 70: 'size of tensor a (242) must match ... (64)')."""
    from tests.training_data import write_task

    runner = CliRunner()
    diff = tmp_path / "ft.diff"
    assert runner.invoke(app, ["prune", str(tiny_finetune), "-b", str(tiny_base), "-s", "5%", "-o",
                               str(tmp_path / "ck"), "-q"]).exit_code == 0
    assert runner.invoke(app, ["pack", str(tmp_path / "ck"), "-o", str(diff), "-q"]).exit_code == 0
    _train, dev = write_task(tmp_path / "data")
    long = " ".join(["the good movie is not bad"] * 40)
    dev.write_text("sentence,label\n" + "".join(f"{long},{i % 2}\n" for i in range(4)))
    args = ["eval", str(tiny_base), str(diff), "--validation-file", str(dev), "--json"]
    res = runner.invoke(app, [*args, "--max-seq-length", "512"])
    assert res.exit_code == 2 and res.stdout == "" and res.stderr.count("\n") <= 2
    assert "--max-seq-length 512 is above the 64 positions the model of" in res.stderr
    assert "Traceback" not in res.output
    res = runner.invoke(app, args)  # the default: 128 cut to the tiny model's 64 positions
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-eval-samples", "0"),
                                         ("--max-seq-length", "4")])
def test_eval_names_the_flag_a_bad_number_came_from(tiny_base, tmp_path, flag, value):
    """The messages said batch_size, max_eval_samples and max_seq_length: names a CLI user never typed."""
    res = CliRunner().invoke(app, ["eval", str(tiny_base), str(tmp_path / "missing.diff"), "--task", "rte",
                                   flag, value])
    assert res.exit_code == 2 and f"{flag} must be at least" in res.stderr, res.output
