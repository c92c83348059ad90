"""Causal LM data: text / prompt+completion / .txt reading, the completion-only loss mask, perplexity, bad data."""

from __future__ import annotations

import json
import math

import pytest

from diffcli import lm_tasks
from diffcli.errors import DataError
from diffcli.metrics import lm_scores
from diffcli.sequences import IGNORE
from tiny_lms import BOS, EOS, make_gpt2, make_llama


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("gpt2") / "base")


def test_rows_of_each_kind(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat"}, {"prompt": "say", "completion": " hello"}])
    rows = lm_tasks.read_lm(path)
    assert [(r.prompt, r.target) for r in rows] == [("", "the cat sat"), ("say", " hello")]
    txt = tmp_path / "d.txt"
    txt.write_text("the cat sat\n\nthe dog sat\n")
    assert [r.target for r in lm_tasks.read_lm(txt)] == ["the cat sat", "the dog sat"]
    assert lm_tasks.read_lm(txt)[1].where.endswith("d.txt:3")



def test_a_csv_mixes_text_rows_and_prompt_rows_as_jsonl_does(tmp_path):
    """A csv has every column in every row, so a text row's prompt and completion are empty cells: they read as
    absent (the row was refused as an empty completion), while a prompt row with an empty completion still is."""
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("text,prompt,completion\nthe cat sat on the mat,,\n,say hello,hello world\n")
    assert [(r.prompt, r.target) for r in lm_tasks.read_lm(mixed)] == [("", "the cat sat on the mat"),
                                                                      ("say hello", "hello world")]
    bad = tmp_path / "bad.csv"
    bad.write_text("text,prompt,completion\n,say hello,\n")
    with pytest.raises(DataError, match="empty completion"):
        lm_tasks.read_lm(bad)


@pytest.mark.parametrize("rows, needle", [
    ([{"sentence": "a"}], "needs a 'text' field or 'prompt' and 'completion'"),
    ([{"prompt": "say", "completion": ""}], "empty completion"),
    ([{"prompt": "say", "completion": "   "}], "empty completion"),
    ([{"prompt": "say", "completion": "hi"}, {"prompt": "say"}], "needs a completion"),
    ([{"text": ""}], "empty text"),
    ([{"text": 3}], "'text' must be a string"),
])
def test_bad_rows(tmp_path, rows, needle):
    with pytest.raises(DataError, match=needle):
        lm_tasks.read_lm(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_loss_only_on_the_completion(gpt2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2)
    rows = lm_tasks.read_lm(write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "say hello", "completion": "world"}, {"text": "the cat sat"}]))
    enc = lm_tasks.encode(rows, tok, None, 32)
    say, hello, world = tok.convert_tokens_to_ids(["say", "hello", "world"])
    assert enc.input_ids[0] == [say, hello, world, EOS]
    assert enc.label_ids[0] == [IGNORE, IGNORE, world, EOS]
    assert enc.label_ids[1] == enc.input_ids[1]  # plain text: every token is a target
    batch = enc.collate([enc[0], enc[1]])
    assert batch["labels"][0].tolist() == [IGNORE, IGNORE, world, EOS]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


def test_llama_prompt_keeps_its_bos_out_of_the_loss(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_llama(tmp_path / "llama"))
    rows = lm_tasks.read_lm(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "say", "completion": "hello"},
                                                               {"text": "the cat"}]))
    enc = lm_tasks.encode(rows, tok, None, 16)
    assert enc.input_ids[0][0] == BOS and enc.label_ids[0][:2] == [IGNORE, IGNORE]
    assert enc.label_ids[1][0] == IGNORE and enc.label_ids[1][1:] == enc.input_ids[1][1:]


def test_prompt_that_fills_the_window_is_refused(gpt2, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2)
    rows = lm_tasks.read_lm(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "the " * 10, "completion": "cat"}]))
    with pytest.raises(DataError, match=r"d.jsonl:1: nothing to predict: the prompt fills 10 token\(s\) of 8"):
        lm_tasks.encode(rows, tok, None, 8)


def test_perplexity_by_hand():
    # uniform predictions over V tokens: loss = ln V per token, perplexity = V
    assert lm_scores(10 * math.log(64), 10) == pytest.approx({"loss": math.log(64), "perplexity": 64.0})
    assert lm_scores(3.0, 2)["perplexity"] == pytest.approx(math.exp(1.5))


def test_uniform_model_scores_perplexity_vocab_size(gpt2, tmp_path):
    import torch
    from transformers import AutoTokenizer

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 64)})()

    tok = AutoTokenizer.from_pretrained(gpt2)
    rows = lm_tasks.read_lm(write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on the mat"},
                                                               {"prompt": "say", "completion": "hello world"}]))
    got = lm_tasks.evaluate(Uniform(), tok, rows, None, max_seq_length=32, batch_size=1)
    assert got["perplexity"] == pytest.approx(64.0)


def test_loss_equals_transformers_token_mean(gpt2, tmp_path):
    """Over one batch, the split loss is transformers' own mean next-token loss on the same labels."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2)
    model = AutoModelForCausalLM.from_pretrained(gpt2)
    rows = lm_tasks.read_lm(write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat sat on the mat"},
                                                               {"prompt": "john lives in", "completion": "paris"}]))
    got = lm_tasks.evaluate(model, tok, rows, None, max_seq_length=32, batch_size=8)
    enc = lm_tasks.encode(rows, tok, None, 32)
    with torch.no_grad():
        want = model(**enc.collate([enc[0], enc[1]])).loss.item()
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
