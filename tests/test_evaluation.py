"""evaluate()/predict() on tiny BERT classifiers match logits computed one example at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffcli import evaluation, metrics
from diffcli.errors import InvalidValueError
from diffcli.tasks import GLUE_TASKS, Example, TaskData


@pytest.fixture
def tokenizer(tiny_base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_base)


def classifier(base: Path, num_labels: int):
    from transformers import BertForSequenceClassification

    torch.manual_seed(3)
    return BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)


PAIRS = [Example(("the cat is good", "a dog"), 1), Example(("no", "the movie is not bad at all"), 0),
         Example(("yes", "yes"), 1), Example(("the dog is a good dog", "the cat"), 0),
         Example(("bad movie", "good movie"), 1)]


def manual_logits(model, tokenizer, examples):
    model.eval()
    rows = []
    with torch.no_grad():
        for ex in examples:
            enc = tokenizer(*ex.texts, return_tensors="pt")
            rows.append(model(**enc).logits[0].numpy())
    return np.stack(rows)


def test_predict_matches_unpadded_logits_in_input_order(tiny_base, tokenizer):
    model = classifier(tiny_base, 2)
    logits, labels = evaluation.predict(model, tokenizer, PAIRS, batch_size=2)
    np.testing.assert_allclose(logits, manual_logits(model, tokenizer, PAIRS), atol=1e-5)
    assert labels.tolist() == [1, 0, 1, 0, 1]


def test_evaluate_classification_and_restores_train_mode(tiny_base, tokenizer):
    model = classifier(tiny_base, 2)
    model.train()
    data = TaskData(GLUE_TASKS["mrpc"], None, {"validation": PAIRS})
    got = evaluation.evaluate(model, tokenizer, data, batch_size=3)
    expected = metrics.compute(GLUE_TASKS["mrpc"], manual_logits(model, tokenizer, PAIRS),
                               np.array([e.label for e in PAIRS]))
    assert set(got) == {"validation"}
    assert got["validation"] == pytest.approx(expected)
    model.train()
    evaluation.evaluate(model, tokenizer, data)
    assert model.training


def test_evaluate_regression_every_split(tiny_base, tokenizer):
    model = classifier(tiny_base, 1)
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)  # spread the untrained outputs so metrics are not float noise
    scored = [Example(ex.texts, float(i) * 1.25) for i, ex in enumerate(PAIRS)]
    data = TaskData(GLUE_TASKS["stsb"], None, {"a": scored[:3], "b": scored})
    got = evaluation.evaluate(model, tokenizer, data, batch_size=2)
    manual = manual_logits(model, tokenizer, scored)
    for split, rows, logits in (("a", scored[:3], manual[:3]), ("b", scored, manual)):
        expected = metrics.compute(GLUE_TASKS["stsb"], logits, np.array([e.label for e in rows]))
        assert got[split] == pytest.approx(expected, abs=1e-4)
    predicted, labels = evaluation.predict(model, tokenizer, scored, batch_size=2)
    np.testing.assert_allclose(predicted, manual, atol=1e-5)
    assert predicted.shape == (5, 1) and labels.dtype == np.float32


def test_wrong_head_size_and_no_eval_data(tiny_base, tokenizer):
    model = classifier(tiny_base, 2)
    with pytest.raises(InvalidValueError, match="predicts 2 classes; task mnli has 3"):
        evaluation.evaluate(model, tokenizer, TaskData(GLUE_TASKS["mnli"], None, {"validation_matched": PAIRS}))
    with pytest.raises(InvalidValueError, match="no evaluation data"):
        evaluation.evaluate(model, tokenizer, TaskData(GLUE_TASKS["mrpc"], PAIRS, {}))


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluation.pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluation.pick_device() == torch.device("cuda")
