"""GLUE metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from diffcli import metrics
from diffcli.errors import InvalidValueError
from diffcli.tasks import GLUE_TASKS, TaskSpec


def logits_for(classes, n_classes=2):
    out = np.zeros((len(classes), n_classes), np.float32)
    out[np.arange(len(classes)), classes] = 3.0
    return out


def test_accuracy_and_f1_of_the_positive_class():
    labels = np.array([1, 1, 0, 0, 1])
    preds = logits_for([1, 0, 0, 1, 1])  # tp=2 fp=1 fn=1 tn=1
    got = metrics.compute(GLUE_TASKS["mrpc"], preds, labels)
    assert got["accuracy"] == pytest.approx(3 / 5)
    assert got["f1"] == pytest.approx(2 / 3)  # 2tp / (2tp + fp + fn) = 4/6
    assert got["combined_score"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert metrics.main_score(GLUE_TASKS["mrpc"], got) == pytest.approx(got["combined_score"])


def test_f1_is_zero_when_no_positive_is_predicted():
    got = metrics.compute(GLUE_TASKS["qqp"], logits_for([0, 0, 0]), np.array([1, 0, 1]))
    assert got["f1"] == 0.0 and got["accuracy"] == pytest.approx(1 / 3)


def test_matthews_correlation():
    labels = np.array([1, 1, 0, 0, 1])
    got = metrics.compute(GLUE_TASKS["cola"], logits_for([1, 0, 0, 1, 1]), labels)
    # (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2) = 1/6
    assert got == {"matthews_correlation": pytest.approx(1 / 6)}
    perfect = metrics.compute(GLUE_TASKS["cola"], logits_for([1, 1, 0, 0, 1]), labels)
    assert perfect["matthews_correlation"] == pytest.approx(1.0)
    constant = metrics.compute(GLUE_TASKS["cola"], logits_for([1, 1, 1, 1, 1]), labels)
    assert constant["matthews_correlation"] == 0.0


def test_pearson_and_spearman_from_squeezed_regression_outputs():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    labels = np.array([1.0, 2.0, 3.0, 5.0])
    got = metrics.compute(GLUE_TASKS["stsb"], preds, labels)
    x, y = preds.ravel(), labels
    r = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    assert got["pearson"] == pytest.approx(r) and r < 1
    assert got["spearmanr"] == pytest.approx(1.0)  # same ranks
    assert got["combined_score"] == pytest.approx((r + 1.0) / 2)
    reversed_ = metrics.compute(GLUE_TASKS["stsb"], preds[::-1], labels)
    assert reversed_["spearmanr"] == pytest.approx(-1.0)


def test_constant_regression_prediction_scores_zero_not_nan():
    got = metrics.compute(GLUE_TASKS["stsb"], np.full(4, 2.5), np.array([1.0, 2.0, 3.0, 5.0]))
    assert got["pearson"] == 0.0 and got["spearmanr"] == 0.0


def test_three_class_accuracy_and_class_id_input():
    labels = np.array([0, 1, 2, 2])
    logits = np.array([[2, 1, 0], [0, 3, 1], [0, 4, 1], [0, 0, 9]], np.float32)
    assert metrics.compute(GLUE_TASKS["mnli"], logits, labels) == {"accuracy": pytest.approx(0.75)}
    assert metrics.compute(GLUE_TASKS["mnli"], np.array([0, 1, 1, 2]), labels)["accuracy"] == pytest.approx(0.75)


def test_main_score_single_metric_and_missing():
    assert metrics.main_score(GLUE_TASKS["cola"], {"matthews_correlation": 0.4}) == 0.4
    assert metrics.main_score(GLUE_TASKS["stsb"], {"pearson": 0.8, "spearmanr": 0.6}) == pytest.approx(0.7)
    with pytest.raises(InvalidValueError, match="metric 'accuracy' missing"):
        metrics.main_score(GLUE_TASKS["rte"], {"f1": 0.5})


def test_bad_inputs():
    with pytest.raises(InvalidValueError, match="3 predictions for 2 labels"):
        metrics.compute(GLUE_TASKS["rte"], logits_for([0, 1, 1]), np.array([0, 1]))
    with pytest.raises(InvalidValueError, match="predicts 3 classes; task rte has 2"):
        metrics.compute(GLUE_TASKS["rte"], np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(InvalidValueError, match="no examples"):
        metrics.compute(GLUE_TASKS["rte"], np.zeros((0, 2)), np.array([]))
    bogus = TaskSpec("custom", ("text",), "label", ("a", "b"), ("bleu",), "bleu")
    with pytest.raises(InvalidValueError, match="unknown metric 'bleu'"):
        metrics.compute(bogus, logits_for([0]), np.array([0]))
