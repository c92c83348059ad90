"""GLUE and custom task specs, label parsing and batch encoding for train and eval (the data itself: data_sources)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from diffcli.errors import DataError, InvalidValueError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TaskSpec:
    """What a task reads (columns), predicts (labels) and is scored on (metrics).

    Column names are those of the hub `nyu-mll/glue` dataset; the original GLUE TSV files are mapped onto them.
    `main_metric` selects the best checkpoint: the single metric, or `combined_score` (the mean of the task's
    metrics, as on the GLUE leaderboard) for MRPC, QQP and STS-B.
    """

    name: str
    text_fields: tuple[str, ...]
    label_field: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


class Example(NamedTuple):
    """One row: its 1 or 2 texts and its label (class id, or a float for regression)."""

    texts: tuple[str, ...]
    label: int | float


@dataclass
class TaskData:
    """A task's spec with its training examples (None when not needed) and its evaluation splits."""

    spec: TaskSpec
    train: list[Example] | None
    eval: dict[str, list[Example]] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)  # where the data came from: kind, name (+ path, why)


def _spec(name, text_fields, labels, metrics, main=None, eval_splits=("validation",)) -> TaskSpec:
    return TaskSpec(name, tuple(text_fields), "label", labels, tuple(metrics), main or metrics[0], tuple(eval_splits))


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _spec("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": _spec("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": _spec("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                  "combined_score"),
    "stsb": _spec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"), "combined_score"),
    "qqp": _spec("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                 "combined_score"),
    "mnli": _spec("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                  eval_splits=("validation_matched", "validation_mismatched")),
    "qnli": _spec("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": _spec("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": _spec("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}


def _norm_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def task_spec(task: str) -> TaskSpec:
    """The spec of a GLUE task by name (case, '-' and '_' ignored: SST-2, sts_b)."""
    key = _norm_name(task)
    if key not in GLUE_TASKS:
        raise InvalidValueError(f"unknown task '{task}'; known tasks: {', '.join(GLUE_TASKS)}, or custom",
                                hint="for your own data: --train-file/--validation-file (eval: --validation-file)")
    return GLUE_TASKS[key]


# ---------------------------------------------------------------------------------------------- labels

def _label_key(raw: Any) -> str:
    """A canonical text for a label value: "1", 1, 1.0 and "1.0" all become "1"."""
    if isinstance(raw, bool):
        return str(int(raw))
    if isinstance(raw, int):
        return str(raw)
    if isinstance(raw, float):
        return str(int(raw)) if math.isfinite(raw) and raw.is_integer() else repr(raw)
    text = str(raw).strip()
    try:
        return str(int(text))
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if math.isfinite(number) and number.is_integer() else text


def _as_int(key: str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def _as_float(key: str) -> float | None:
    try:
        value = float(key)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def infer_labels(values: Sequence[Any]) -> tuple[str, ...] | None:
    """Label names for a custom task: sorted distinct values (numerically when all are integers).

    Returns None (regression) when every value is a number and at least one is not an integer.
    """
    keys = {_label_key(v) for v in values if v is not None}
    if not keys:
        raise DataError("no label values found")
    if all(_as_int(k) is not None for k in keys):
        return tuple(sorted(keys, key=int))
    if all(_as_float(k) is not None for k in keys):
        return None
    return tuple(sorted(keys))


def _label_parser(spec: TaskSpec) -> Callable[[Any, str], int | float]:
    """A function (raw value, location) -> class id or float score, raising DataError on bad values."""
    if spec.is_regression:
        def parse_score(raw: Any, where: str) -> float:
            value = None if raw is None or isinstance(raw, bool) else _as_float(str(raw).strip())
            if value is None:
                raise DataError(f"{where}: label {raw!r} is not a number (task {spec.name} is a regression)")
            return value
        return parse_score

    names = spec.labels or ()
    ids = {_label_key(name): i for i, name in enumerate(names)}
    ids.update({name: i for i, name in enumerate(names)})
    by_id = not any(_as_int(k) is not None for k in ids)  # numeric label names are values, never ids
    if by_id:  # class ids are accepted too (hub exports store 0..n-1)
        ids.update({str(i): i for i in range(len(names))})

    def parse_class(raw: Any, where: str) -> int:
        key = _label_key(raw)
        if key not in ids:
            allowed = ", ".join(names)
            raise DataError(f"{where}: unknown label {raw!r} for task {spec.name} (allowed: {allowed}"
                            f"{' or 0..' + str(len(names) - 1) if by_id else ''})")
        return ids[key]
    return parse_class


# ---------------------------------------------------------------------------------------------- encoding

class EncodedDataset:
    """Tokenized examples as a torch-style Dataset of dicts of 1-D tensors (no padding; see `collate`).

    Each feature is kept as one flat tensor plus offsets (items are views), which is much cheaper to build than
    one tensor per row; attention_mask is all ones before padding, so it is made on access.
    """

    def __init__(self, features: dict[str, list[list[int]]], labels: list[int | float], pad_token_id: int = 0):
        import itertools

        import torch

        self.pad_token_id = pad_token_id
        self.regression = any(isinstance(y, float) for y in labels)
        ids = features.get("input_ids", [])
        self._lengths = [len(row) for row in ids]
        self._offsets = [0, *itertools.accumulate(self._lengths)]
        self._flat = {k: torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
                      for k, rows in features.items() if k != "attention_mask"}
        self._labels = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, i: int) -> dict[str, "torch.Tensor"]:
        import torch

        start, stop = self._offsets[i], self._offsets[i + 1]
        item = {"input_ids": self._flat["input_ids"][start:stop],
                "attention_mask": torch.ones(stop - start, dtype=torch.long)}
        for key, flat in self._flat.items():
            if key != "input_ids":
                item[key] = flat[start:stop]
        item["labels"] = self._labels[i]
        return item

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for length-sorted batching)."""
        return list(self._lengths)

    @property
    def labels(self) -> "torch.Tensor":
        return self._labels

    def collate(self, batch: list[dict]) -> dict[str, "torch.Tensor"]:
        """`collate` with this tokenizer's padding id."""
        return collate(batch, pad_token_id=self.pad_token_id)


def encode(examples: Sequence[Example], tokenizer, max_seq_length: int,
           pad_token_id: int | None = None) -> EncodedDataset:
    """Tokenize all examples in one batched call (fast tokenizers run it in Rust), truncating to max_seq_length.

    Rows are padded with `pad_token_id` (`padding_id(model.config)`: decoders such as GPT-2 pool at the last token
    that is not the config's pad id), else the tokenizer's pad id, else its end-of-text id, else 0.
    """
    if max_seq_length < 8:
        raise InvalidValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
    arities = {len(e.texts) for e in examples}
    if len(arities) > 1:
        raise DataError("examples mix single texts and text pairs")
    features: dict[str, list[list[int]]] = {"input_ids": []}
    if examples:
        first = [e.texts[0] for e in examples]
        second = [e.texts[1] for e in examples] if arities == {2} else None
        enc = tokenizer(first, second, truncation=True, max_length=max_seq_length, padding=False,
                        return_attention_mask=False)
        features = {k: v for k, v in enc.items() if k in ("input_ids", "token_type_ids")}
    from diffcli.sequences import pad_id

    pad = pad_token_id if pad_token_id is not None else pad_id(tokenizer)
    return EncodedDataset(features, [e.label for e in examples], pad)


def padding_id(config) -> int | None:
    """The pad id a model's config names (an int its vocabulary holds), else None: the one rows must be padded with."""
    pad = getattr(config, "pad_token_id", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        return None
    return pad if not isinstance(vocab, int) or pad < vocab else None


def collate(batch: list[dict], pad_token_id: int = 0) -> dict[str, "torch.Tensor"]:
    """Stack a batch, padding every sequence to the longest one IN THIS BATCH (not to max_seq_length).

    input_ids are padded with pad_token_id (0 for BERT; use EncodedDataset.collate for other tokenizers),
    attention_mask and token_type_ids with 0.
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    out: dict[str, torch.Tensor] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == "labels":
            out[key] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            seqs = [torch.as_tensor(v, dtype=torch.long) for v in values]
            out[key] = pad_sequence(seqs, batch_first=True, padding_value=pad_token_id if key == "input_ids" else 0)
    return out


__all__ = ["TaskSpec", "Example", "TaskData", "GLUE_TASKS", "task_spec", "infer_labels", "encode", "collate",
           "EncodedDataset", "padding_id"]
