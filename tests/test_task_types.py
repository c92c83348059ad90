"""Task-type registry: building each type's model on BERT/GPT-2/Llama bases, refusals, the loss falls, and the
finetuned config travels through a diff to `apply` and `AutoModelFor...`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_base
from diffcli import task_types
from diffcli.errors import InvalidValueError
from tiny_lms import make_gpt2, make_llama, nudge

TAGGED = [(["john", "sat", "on", "the", "mat"], ["B-PER", "O", "O", "O", "O"]),
          (["mary", "lives", "in", "paris"], ["B-PER", "O", "O", "B-LOC"]),
          (["the", "cat", "and", "the", "dog"], ["O", "O", "O", "O", "O"]),
          (["john", "works", "at", "acme", "in", "berlin"], ["B-PER", "O", "O", "B-ORG", "O", "B-LOC"])]
LM_ROWS = [{"text": "the cat sat on the mat"}, {"prompt": "john lives in", "completion": "paris"},
           {"prompt": "say", "completion": "hello world"}, {"text": "the dog is good"}]


def write_tagged(path, rows=TAGGED):
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in rows))
    return path


def write_lm(path, rows=LM_ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("types")
    return {"bert": make_base(root / "bert"), "gpt2": make_gpt2(root / "gpt2"), "llama": make_llama(root / "llama")}


def test_registry_names_and_unknown_type():
    assert list(task_types.TASK_TYPES) == ["sequence-classification", "token-classification", "causal-lm"]
    assert task_types.get(None).name == "sequence-classification"
    assert task_types.get("Token_Classification").name == "token-classification"
    with pytest.raises(InvalidValueError, match="unknown task type 'seq2seq'"):
        task_types.get("seq2seq")


def test_type_recorded_by_a_diff():
    assert task_types.of_diff({"architectures": ["GPT2LMHeadModel"]}).name == "causal-lm"
    assert task_types.of_diff({"architectures": ["LlamaForCausalLM"]}).name == "causal-lm"
    assert task_types.of_diff({"architectures": ["BertForTokenClassification"]}).name == "token-classification"
    assert task_types.of_diff({}, {"task_type": "causal-lm"}).name == "causal-lm"
    assert task_types.of_diff({}).name == "sequence-classification"
    with pytest.raises(InvalidValueError, match="made for causal-lm, not token-classification"):
        task_types.of_diff({"architectures": ["GPT2LMHeadModel"]}, None, "token-classification")


def test_token_classification_on_bert_carries_its_labels(bases, tmp_path):
    kind = task_types.get("token-classification")
    data = kind.load("ner", train_file=write_tagged(tmp_path / "t.jsonl"))
    tm = kind.build(bases["bert"], data, seed=0)
    assert type(tm.model).__name__ == "BertForTokenClassification"
    assert tm.model.config.id2label == {0: "O", 1: "B-LOC", 2: "B-ORG", 3: "B-PER"}
    assert tm.model.config.label2id == {"O": 0, "B-LOC": 1, "B-ORG": 2, "B-PER": 3}
    assert sorted(tm.head) == ["classifier.bias", "classifier.weight"]
    assert "bert.embeddings.word_embeddings.weight" in tm.gated


def test_causal_lm_heads_tied_and_untied(bases, tmp_path):
    kind = task_types.get("causal-lm")
    data = kind.load("lm", train_file=write_lm(tmp_path / "d.jsonl"))
    gpt2 = kind.build(bases["gpt2"], data, seed=0)
    assert type(gpt2.model).__name__ == "GPT2LMHeadModel" and gpt2.head == []  # the head is the tied embedding
    assert "transformer.wte.weight" in gpt2.gated
    assert gpt2.tied == {"lm_head.weight": "transformer.wte.weight"}  # a diff must not store it as a dense extra
    llama = kind.build(bases["llama"], data, seed=0)
    assert "lm_head.weight" in llama.gated and llama.head == []  # the base stores its own LM head
    assert llama.tied == {}


def test_architectures_that_cannot_serve_a_type(bases, tmp_path):
    lm = task_types.get("causal-lm")
    data = lm.load("lm", train_file=write_lm(tmp_path / "d.jsonl"))
    with pytest.raises(InvalidValueError, match="'bert' is a bidirectional encoder: it cannot serve --task-type "
                                                "causal-lm"):
        lm.build(bases["bert"], data, seed=0)
    with pytest.raises(InvalidValueError, match="bidirectional encoder"):
        lm.check(bases["bert"])
    lm.check(bases["gpt2"])
    lm.check(bases["llama"])
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("opt", vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                               num_attention_heads=2)
    with pytest.raises(InvalidValueError, match="'opt' has no AutoModelForTokenClassification"):
        task_types.get("token-classification").check_model(cfg)


def test_glue_options_are_refused_for_file_types(tmp_path):
    with pytest.raises(InvalidValueError, match="--text-fields applies only to --task-type sequence-classification"
                                                "; causal-lm reads --train-file/--validation-file$"):
        task_types.get("causal-lm").load("lm", train_file=write_lm(tmp_path / "d.jsonl"), text_fields=["text"])
    with pytest.raises(InvalidValueError, match="token-classification reads --validation-file$"):  # eval's options
        task_types.get("token-classification").load("t", validation_file=tmp_path / "d.jsonl", data_dir=tmp_path,
                                                     need_train=False)


@pytest.mark.parametrize("kind_name, base, writer", [("token-classification", "bert", write_tagged),
                                                     ("token-classification", "gpt2", write_tagged),
                                                     ("causal-lm", "gpt2", write_lm), ("causal-lm", "llama", write_lm)])
def test_the_loss_falls(bases, tmp_path, kind_name, base, writer):
    kind = task_types.get(kind_name)
    data = kind.load("t", train_file=writer(tmp_path / "d.jsonl"))
    tm = kind.build(bases[base], data, seed=0)
    ds = kind.encode(data.train, tm.tokenizer, data.spec, 32)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    opt = torch.optim.AdamW(tm.model.parameters(), lr=3e-3)
    tm.model.train()
    losses = []
    for _ in range(12):
        loss = tm.model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _diff_of(tm, base, tmp_path, meta):
    """A 30% diff of the nudged task model against its base, packed to a .diff file."""
    from diffcli import artifact
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    nudge(tm.model)
    tm.model.save_pretrained(tmp_path / "ft")
    diff = project(extract_diff(str(base), str(tmp_path / "ft")), 0.3).diff
    diff.meta.update(meta)
    artifact.write(diff, tmp_path / "task.diff", values="fp32")
    return tmp_path / "task.diff"


@pytest.mark.parametrize("kind_name, base, writer, auto", [
    ("token-classification", "bert", write_tagged, "AutoModelForTokenClassification"),
    ("causal-lm", "gpt2", write_lm, "AutoModelForCausalLM"),
    ("causal-lm", "llama", write_lm, "AutoModelForCausalLM")])
def test_apply_writes_a_config_the_auto_class_loads(bases, tmp_path, kind_name, base, writer, auto):
    import transformers

    from diffcli.applying import apply_to_folder
    from diffcli.bank import DiffBank

    kind = task_types.get(kind_name)
    data = kind.load("t", train_file=writer(tmp_path / "d.jsonl"))
    tm = kind.build(bases[base], data, seed=0)
    path = _diff_of(tm, bases[base], tmp_path, {"task": "t", "task_type": kind_name})
    apply_to_folder(str(bases[base]), path, tmp_path / "merged")
    merged = getattr(transformers, auto).from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == type(tm.model).__name__
    if kind_name == "token-classification":
        assert merged.config.id2label == tm.model.config.id2label
    bank = DiffBank(str(bases[base]), device="cpu")
    bank.add("t", path)
    ids = torch.tensor([[5, 9, 12, 7, 30, 6]])
    with torch.no_grad(), bank.use("t") as model:
        assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_readme_task_types_example_runs(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path

    from test_token_tasks import write_conll

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "task_types.get" in b)
    make_base(tmp_path / "my-bert")
    write_conll(tmp_path / "train.conll", TAGGED)
    write_conll(tmp_path / "dev.conll", TAGGED[:2])
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'f1':" in printed and "'precision':" in printed
