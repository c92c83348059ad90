"""Batch encoding and dynamic-padding collation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcli.errors import DataError
from diffcli.tasks import Example, collate, encode
from tests.conftest import write_vocab


@pytest.fixture
def tokenizer(tmp_path: Path):
    from transformers import AutoTokenizer

    write_vocab(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def test_single_texts_are_tokenized_without_padding(tokenizer):
    data = encode([Example(("the cat",), 1), Example(("the good dog is not bad",), 0)], tokenizer, 64)
    assert len(data) == 2
    first = data[0]
    assert first["input_ids"].tolist() == tokenizer("the cat")["input_ids"]
    assert first["labels"].dtype == torch.long and first["labels"].item() == 1
    assert data.lengths == [4, 8]


def test_pairs_get_segment_ids_and_truncate_to_max_length(tokenizer):
    long_text = " ".join(["cat"] * 40)
    data = encode([Example((long_text, "the dog"), 0), Example(("a", "b"), 1)], tokenizer, 16)
    item = data[0]
    assert len(item["input_ids"]) == 16
    assert item["token_type_ids"].tolist().count(1) >= 2  # the second segment survives truncation
    assert data[1]["token_type_ids"].tolist() == [0, 0, 0, 1, 1]


def test_regression_labels_are_float(tokenizer):
    data = encode([Example(("a",), 4.5), Example(("b",), 1.0)], tokenizer, 32)
    assert data.regression and data.labels.dtype == torch.float32
    assert data.labels.tolist() == [4.5, 1.0]


def test_collate_pads_to_the_longest_in_the_batch(tokenizer):
    data = encode([Example(("the cat",), 1), Example(("the good dog is not bad",), 0),
                   Example(("a",), 0)], tokenizer, 128)
    batch = collate([data[0], data[2]])
    assert batch["input_ids"].shape == (2, 4)  # not 128, not 8
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch["input_ids"][1, 3].item() == 0
    assert batch["labels"].tolist() == [1, 0]


def test_dataset_collate_uses_the_tokenizer_pad_id(tokenizer):
    tokenizer.pad_token = "[MASK]"
    data = encode([Example(("the cat",), 1), Example(("a",), 0)], tokenizer, 32)
    assert data.pad_token_id == tokenizer.convert_tokens_to_ids("[MASK]") != 0
    batch = data.collate([data[0], data[1]])
    assert batch["input_ids"][1, -1].item() == data.pad_token_id
    assert batch["attention_mask"][1, -1].item() == 0


def test_mixed_arity_is_an_error(tokenizer):
    with pytest.raises(DataError, match="mix"):
        encode([Example(("a",), 0), Example(("a", "b"), 1)], tokenizer, 32)
