"""Token classification: jsonl and CoNLL reading, label set, first-sub-token alignment, seqeval scores, bad data."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_base
from diffcli import token_tasks
from diffcli.errors import DataError
from diffcli.metrics import token_scores
from diffcli.sequences import IGNORE

SENTENCES = [(["john", "sat", "on", "the", "mat"], ["B-PER", "O", "O", "O", "O"]),
             (["the", "dogs", "is", "good"], ["O", "B-ANI", "O", "O"]),
             (["a", "cat", "and", "a", "dog"], ["O", "B-ANI", "O", "O", "B-ANI"])]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps({"tokens": t, "tags": g}) + "\n" for t, g in rows))
    return path


def write_conll(path, rows):
    blocks = ["\n".join(f"{tok} X {tag}" for tok, tag in zip(t, g)) for t, g in rows]
    path.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join(blocks) + "\n")
    return path


def test_jsonl_and_conll_read_the_same_sentences(tmp_path):
    a = token_tasks.read_tagged(write_jsonl(tmp_path / "t.jsonl", SENTENCES))
    b = token_tasks.read_tagged(write_conll(tmp_path / "t.conll", SENTENCES))
    assert [(s.tokens, s.tags) for s in a] == [(s.tokens, s.tags) for s in b]
    assert [list(s.tokens) for s in a] == [t for t, _ in SENTENCES]
    assert b[0].where.endswith("t.conll:3")  # the -DOCSTART- line and its blank line are skipped


def test_label_set_comes_from_train_with_o_first(tmp_path):
    data = token_tasks.load("ner", write_jsonl(tmp_path / "t.jsonl", SENTENCES), None)
    assert data.spec.labels == ("O", "B-ANI", "B-PER")
    assert data.spec.task_type == "token-classification" and data.spec.main_metric == "f1"
    assert data.eval == {}


@pytest.mark.parametrize("rows, needle", [
    ([{"tokens": ["a"], "labels": ["O"]}], "no 'tags' field"),
    ([{"tokens": ["a", "b"], "tags": ["O"]}], "2 tokens but 1 tags"),
    ([{"tokens": "a b", "tags": ["O", "O"]}], "'tokens' must be a list of strings"),
    ([{"tokens": [], "tags": []}], "a sentence with no tokens"),
    # tag ids (Hugging Face NER datasets store them) would score entity F1 0 for ever: refused, not read as "1"
    ([{"tokens": ["a", "b"], "tags": [1, 0]}], "not tag ids"),
    ([{"tokens": ["a", "b"], "tags": ["B-X", True]}], "'tags' must be a list of tag names"),
])
def test_bad_jsonl_rows(tmp_path, rows, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=needle):
        token_tasks.read_tagged(path)


def test_conll_line_without_a_tag(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("john B-PER\nsat\n")
    with pytest.raises(DataError, match=r"bad.conll:2: expected 'token tag'"):
        token_tasks.read_tagged(path)


def test_dev_tag_unseen_in_train_is_refused_with_its_place(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", SENTENCES)
    dev = write_jsonl(tmp_path / "dev.jsonl", [(["mary", "sat"], ["B-PER", "O"]), (["paris"], ["B-LOC"])])
    with pytest.raises(DataError, match=r"dev.jsonl:2: tag 'B-LOC' is not in the label set of the training data"):
        token_tasks.load("ner", train, dev)
    with pytest.raises(DataError, match="label set of the model's head"):
        token_tasks.load("ner", None, dev, labels=["O", "B-PER"], need_train=False)


def test_labels_go_on_the_first_sub_token_only(tmp_path):
    from transformers import AutoTokenizer

    base = make_base(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    data = token_tasks.load("ner", write_jsonl(tmp_path / "t.jsonl", SENTENCES), None)
    enc = token_tasks.encode(data.train, tok, data.spec, 32)
    # "dogs" is two word pieces (dog, ##s): only "dog" carries B-ANI; [CLS] and [SEP] carry nothing.
    pieces = tok.convert_ids_to_tokens(enc.input_ids[1])
    assert pieces == ["[CLS]", "the", "dog", "##s", "is", "good", "[SEP]"]
    o, ani = data.spec.labels.index("O"), data.spec.labels.index("B-ANI")
    assert enc.label_ids[1] == [IGNORE, o, ani, IGNORE, o, o, IGNORE]
    assert enc.words[1] == [(1, 0), (2, 1), (4, 2), (5, 3)]
    batch = enc.collate([enc[0], enc[1]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 7)
    assert batch["labels"][1].tolist() == enc.label_ids[1]


def test_seqeval_scores_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-LOC"]]
    got = token_scores(true, pred)
    # entities: PER (hit), LOC (missed), ORG (missed, predicted LOC instead): P = 1/2, R = 1/3, F1 = 0.4
    assert got["precision"] == pytest.approx(0.5)
    assert got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(0.4)
    assert got["accuracy"] == pytest.approx(4 / 6)


def test_scores_match_seqeval_directly():
    from seqeval.metrics import f1_score, precision_score, recall_score

    true = [["B-A", "I-A", "O", "B-B", "I-B"], ["B-A", "O", "B-B"]]
    pred = [["B-A", "O", "O", "B-B", "I-B"], ["I-A", "O", "B-B"]]
    got = token_scores(true, pred)
    assert got["precision"] == precision_score(true, pred)
    assert got["recall"] == recall_score(true, pred)
    assert got["f1"] == f1_score(true, pred)


def test_truncated_words_are_scored_as_outside(tmp_path):
    import torch

    from transformers import AutoTokenizer

    base = make_base(tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(base)
    words = ["the"] * 12 + ["john"]
    data = token_tasks.load("ner", write_jsonl(tmp_path / "t.jsonl", [(words, ["O"] * 12 + ["B-PER"])]), None)
    labels = data.spec.labels

    class Oracle(torch.nn.Module):
        """Predicts the true tag at every position it sees (a perfect tagger for the kept words)."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            out = torch.zeros(*input_ids.shape, len(labels))
            out[..., labels.index("O")] = 1
            return type("Out", (), {"logits": out})()

    got = token_tasks.evaluate(Oracle(), tok, data.train, data.spec, max_seq_length=8, batch_size=4)
    assert got["recall"] == 0.0 and got["accuracy"] == pytest.approx(12 / 13)  # john was cut: predicted O


_word = st.text(alphabet=st.characters(blacklist_categories=("Z", "C")), min_size=1, max_size=6).filter(
    lambda w: w != "-DOCSTART-")
_tag = st.sampled_from(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.tuples(_word, _tag), min_size=1, max_size=6), min_size=1, max_size=5))
def test_conll_and_jsonl_round_trip(tmp_path, sentences):
    rows = [([w for w, _ in s], [t for _, t in s]) for s in sentences]
    from_json = token_tasks.read_tagged(write_jsonl(tmp_path / "h.jsonl", rows))
    from_conll = token_tasks.read_tagged(write_conll(tmp_path / "h.conll", rows))
    assert [(list(s.tokens), list(s.tags)) for s in from_json] == rows
    assert [(list(s.tokens), list(s.tags)) for s in from_conll] == rows


def test_sample_limits_are_checked(tmp_path):
    from diffcli import task_types
    from diffcli.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="max_eval_samples must be at least 1"):
        task_types.get("token-classification").load("ner", train_file=write_jsonl(tmp_path / "t.jsonl", SENTENCES),
                                                     max_eval_samples=0)
