"""Dev scores the quality benchmarks share: a packed .diff applied to its base, and the majority-class floor."""

from __future__ import annotations

from pathlib import Path


def score_artifact(packed: Path, s: dict, data_dir: str) -> dict:
    """Dev metrics of base + the packed .diff (fp16 values as shipped), via the shared evaluation code."""
    import torch
    from transformers import AutoTokenizer

    from baselines import load_model
    from diffcli import applying, artifact, data_sources, evaluation, weights

    torch.manual_seed(s["seed"])
    diff = artifact.load(packed)
    base_dir = weights.resolve_model(s["model"])
    data = data_sources.load_task(s["task"], data_dir=data_dir, max_eval_samples=s["max_eval_samples"], need_train=False)
    model = load_model(base_dir, data.spec)
    # check=False: the base is the bundled folder by construction; diffs written before the switch of
    # weights.tensor_digest to XXH3 (a95a67c) carry SHA-256 digests that the check would reject.
    applying.apply_(model, diff, check=False)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    return evaluation.evaluate(model, tokenizer, data, max_seq_length=s["max_seq_length"])


def majority_score(task: str, data_dir: str, max_train_samples: int | None, max_eval_samples: int | None) -> float:
    """The dev score of always predicting the most frequent train label (regression: the mean), ×100.

    The floor a model that learned nothing reaches; a score at this value means the run did not learn the task.
    """
    import numpy as np

    from diffcli import data_sources, metrics

    data = data_sources.load_task(task, data_dir=data_dir, max_train_samples=max_train_samples,
                                  max_eval_samples=max_eval_samples)
    spec = data.spec
    dev = data.eval[spec.eval_splits[0]]
    labels = np.array([e.label for e in dev])
    train = np.array([e.label for e in data.train])
    if spec.is_regression:
        preds = np.full((len(dev), 1), float(train.mean()))
    else:
        preds = np.zeros((len(dev), spec.num_labels))
        preds[:, int(np.bincount(train.astype(int), minlength=spec.num_labels).argmax())] = 1.0
    return 100 * metrics.main_score(spec, metrics.compute(spec, preds, labels))
