"""Shared fixtures: tiny random BERT models saved as real Hugging Face folders."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

GLUE_DIR = Path(__file__).resolve().parents[2] / "shared" / "glue"


def tiny_config(**kw):
    from transformers import BertConfig

    args = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    args.update(kw)
    return BertConfig(**args)


def write_vocab(folder: Path) -> None:
    """A small WordPiece vocab so the folder also carries a working tokenizer."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["the", "a", "is", "not", "good", "bad", "movie", "cat", "dog", "yes", "no", "##s", "##ing", ".", ","]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    # transformers 5 reads `vocab`, 4.x reads `vocab_file`; without the right one every word becomes [UNK].
    vocab = str(folder / "vocab.txt")
    BertTokenizerFast(vocab_file=vocab, vocab=vocab, do_lower_case=True).save_pretrained(folder)


def make_base(folder: Path, seed: int = 0, **kw) -> Path:
    """A bare BertModel saved without the `bert.` prefix, like the bundled MiniLM."""
    import torch
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel(tiny_config(**kw))
    model.save_pretrained(folder)
    write_vocab(folder)
    return folder


def make_finetune(base: Path, folder: Path, seed: int = 1, num_labels: int = 2, scale: float = 0.01) -> Path:
    """A BertForSequenceClassification from `base` with every weight nudged: a 'full finetune'."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.save_pretrained(folder)
    write_vocab(folder)
    return folder


def apply_sharded_in_small_chunks(base: Path, diff: Path, tmp: Path, monkeypatch) -> tuple[dict, dict, object]:
    """`apply` of `diff` from a 20 KB-sharded copy of `base` into 20 KB shards through 200-byte chunks, and from the
    one-file base at default chunks: (the first's tensors, the second's, the first's report)."""
    from safetensors.torch import load_file
    from transformers import BertModel

    from diffcli import applying

    applying.apply_to_folder(str(base), diff, tmp / "single")
    BertModel.from_pretrained(base).save_pretrained(tmp / "base-sharded", max_shard_size="20KB")
    write_vocab(tmp / "base-sharded")
    monkeypatch.setattr(applying, "_CHUNK_BYTES", 200)
    report = applying.apply_to_folder(str(tmp / "base-sharded"), diff, tmp / "out", max_shard_size="20KB")
    got: dict = {}
    for f in sorted((tmp / "out").glob("model-*.safetensors")):
        got.update(load_file(str(f)))
    return got, load_file(str(tmp / "single" / "model.safetensors")), report


@pytest.fixture
def tiny_base(tmp_path: Path) -> Path:
    return make_base(tmp_path / "base")


@pytest.fixture
def tiny_finetune(tiny_base: Path, tmp_path: Path) -> Path:
    return make_finetune(tiny_base, tmp_path / "ft")


def load_bench(name: str):
    """A script of bench/ as a module (bench/ on sys.path for its own imports; registered so dataclasses resolve)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module



def token_rows(n: int = 32):
    """A Trainer dataset of n rows of random token ids (seed 0), label = whether token 36 occurs."""
    import torch

    class Rows(torch.utils.data.Dataset):
        def __init__(self):
            ids = torch.randint(5, 45, (n, 10), generator=torch.Generator().manual_seed(0))
            self.rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": (r == 36).any().long()}
                         for r in ids]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    return Rows()


@pytest.fixture
def golden_producer(monkeypatch):
    """The golden files pin the format, not the version string of whoever wrote them."""
    from diffcli import artifact

    monkeypatch.setattr(artifact, "PRODUCER", "diffprune golden")
