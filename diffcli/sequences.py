"""Per-token data shared by token classification and causal LM: the spec, the dataset and its padding collate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the label of a token that carries no loss (transformers' ignore_index)


@dataclass(frozen=True)
class SequenceSpec:
    """A token-level task: its type, its label set (token classification) and the metrics it reports."""

    name: str
    task_type: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str

    @property
    def num_labels(self) -> int:
        return len(self.labels or ())

    @property
    def is_regression(self) -> bool:
        return False


class SequenceDataset:
    """Token ids with one label per token (IGNORE where no loss), as a torch-style Dataset of 1-D tensors."""

    def __init__(self, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int):
        if len(input_ids) != len(labels):
            raise ValueError(f"{len(input_ids)} sequences for {len(labels)} label rows")
        self.input_ids = [list(x) for x in input_ids]
        self.label_ids = [list(y) for y in labels]
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, "torch.Tensor"]:
        import torch

        ids = self.input_ids[i]
        return {"input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.ones(len(ids), dtype=torch.long),
                "labels": torch.tensor(self.label_ids[i], dtype=torch.long)}

    @property
    def lengths(self) -> list[int]:
        """Token count of every example (for length-sorted batching)."""
        return [len(x) for x in self.input_ids]

    def collate(self, batch: list[dict]) -> dict[str, "torch.Tensor"]:
        """Pad to the longest sequence in the batch: input_ids with the pad id, attention_mask 0, labels IGNORE."""
        from torch.nn.utils.rnn import pad_sequence

        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE}
        return {key: pad_sequence([item[key] for item in batch], batch_first=True, padding_value=pads[key])
                for key in batch[0]}


def pad_id(tokenizer) -> int:
    """The tokenizer's padding id, else its end-of-text id (GPT-2 has no pad token), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
