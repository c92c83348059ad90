"""Task metrics as fractions like the `evaluate` library: GLUE (from logits), seqeval entities, LM loss/perplexity."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import numpy as np

    from diffcli.tasks import TaskSpec

COMBINED = "combined_score"
METRIC_NAMES = ("accuracy", "f1", "matthews_correlation", "pearson", "spearmanr", "precision", "recall", "loss",
                "perplexity")
LOWER_IS_BETTER = ("loss", "perplexity")


def _finite(value: float) -> float:
    """Correlations of a constant prediction are undefined (NaN); report them as 0 (no correlation)."""
    value = float(value)
    return value if math.isfinite(value) else 0.0


def class_predictions(predictions: "np.ndarray") -> "np.ndarray":
    """Class ids from logits (argmax over the last axis); 1-D input is taken as class ids already."""
    import numpy as np

    predictions = np.asarray(predictions)
    return predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions.astype(np.int64)


def compute(spec: "TaskSpec", predictions: "np.ndarray", labels: "np.ndarray") -> dict[str, float]:
    """The task's metrics (spec.metrics) for logits `predictions` against `labels`.

    Classification: argmax of the logits; f1 is the F1 of the positive class 1. Regression: the logits squeezed
    to one score per example. Tasks with more than one metric also get `combined_score`, their mean.
    """
    import numpy as np

    predictions = np.asarray(predictions)
    labels = np.asarray(labels).reshape(-1)
    if len(predictions) != len(labels):
        raise InvalidValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise InvalidValueError("no examples to score")
    if spec.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] != 1:
            raise InvalidValueError(f"a regression model has one output, got {predictions.shape[1]}")
        preds = predictions.reshape(-1).astype(np.float64)
        labels = labels.astype(np.float64)
    else:
        if predictions.ndim == 2 and predictions.shape[1] != spec.num_labels:
            raise InvalidValueError(f"the model predicts {predictions.shape[1]} classes; task {spec.name} has "
                                    f"{spec.num_labels}")
        preds = class_predictions(predictions)
        labels = labels.astype(np.int64)
    out: dict[str, float] = {}
    for name in spec.metrics:
        out[name] = _metric(name, preds, labels)
    if len(spec.metrics) > 1:
        out[COMBINED] = float(np.mean([out[n] for n in spec.metrics]))
    return out


def _metric(name: str, preds: "np.ndarray", labels: "np.ndarray") -> float:
    if name == "accuracy":
        return float((preds == labels).mean())
    if name == "f1":
        from sklearn.metrics import f1_score

        return float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0))
    if name == "matthews_correlation":
        from sklearn.metrics import matthews_corrcoef

        return _finite(matthews_corrcoef(labels, preds))
    if name in ("pearson", "spearmanr"):
        import numpy as np

        if np.all(preds == preds[0]) or np.all(labels == labels[0]):
            return 0.0
        from scipy.stats import pearsonr, spearmanr

        fn = pearsonr if name == "pearson" else spearmanr
        return _finite(fn(preds, labels)[0])
    raise InvalidValueError(f"unknown metric '{name}'; known: {', '.join(METRIC_NAMES)}")


def token_scores(true_tags: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Entity-level precision, recall and F1 as `seqeval` computes them (conlleval-style), and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    if len(true_tags) != len(predicted) or any(len(t) != len(p) for t, p in zip(true_tags, predicted)):
        raise InvalidValueError("predicted tags do not line up with the true tags")
    if not true_tags:
        raise InvalidValueError("no examples to score")
    return {"precision": float(precision_score(true_tags, predicted, zero_division=0)),
            "recall": float(recall_score(true_tags, predicted, zero_division=0)),
            "f1": float(f1_score(true_tags, predicted, zero_division=0)),
            "accuracy": float(accuracy_score(true_tags, predicted))}


def lm_scores(nll_sum: float, tokens: int) -> dict[str, float]:
    """loss = Σ NLL / tokens (nats per predicted token) and perplexity = exp(loss), over a whole split."""
    if tokens <= 0:
        raise InvalidValueError("no tokens to score")
    loss = nll_sum / tokens
    perplexity = math.nan if math.isnan(loss) else math.exp(loss) if loss < 700 else math.inf
    return {"loss": float(loss), "perplexity": perplexity}


def main_score(spec: "TaskSpec", metrics: Mapping[str, float]) -> float:
    """The number that ranks checkpoints, higher is better: metrics[spec.main_metric], negated for a loss.

    combined_score is the mean of spec.metrics when missing.
    """
    if spec.main_metric in metrics:
        value = float(metrics[spec.main_metric])
        return -value if spec.main_metric in LOWER_IS_BETTER else value
    if spec.main_metric == COMBINED and all(m in metrics for m in spec.metrics):
        return float(sum(metrics[m] for m in spec.metrics) / len(spec.metrics))
    raise InvalidValueError(f"metric '{spec.main_metric}' missing; have: {', '.join(metrics) or 'none'}")
