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


MATRICES = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.intermediate.dense.weight",
            "encoder.layer.1.output.dense.weight")


def with_bases(diff, base_dir: Path, seed: int = 0):
    """`diff` plus basis scales on three matrices: random a around 1, a quarter of the bases pruned."""
    import torch

    from diffcli import svd_basis
    from diffcli.weights import WeightStore

    store = WeightStore(base_dir)
    gen = torch.Generator().manual_seed(seed)
    for target, td in diff.tensors.items():
        if td.base_name in MATRICES:
            u, s, vh = svd_basis.canonical_svd(store[td.base_name])
            a = 1 + 0.2 * torch.randn(s.numel(), generator=gen)
            a[torch.randperm(s.numel(), generator=gen)[: s.numel() // 4]] = 0
            diff.bases[target] = svd_basis.make_scales(u, s, vh, a)
    store.release()
    assert len(diff.bases) == len(MATRICES)
    return diff


@pytest.fixture(scope="module")
def basis_models(tmp_path_factory):
    """A tiny base, a diff of a finetune of it with basis scales on three matrices, and another base."""
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("basis")
    base = make_base(root / "base")
    ft = make_finetune(base, root / "ft")
    diff = with_bases(project(extract_diff(str(base), str(ft)), 0.02).diff, base)
    return {"root": root, "base": base, "diff": diff, "other": make_base(root / "other", seed=5)}


def probes_of_another_base(basis_models):
    """The basis diff with the right base's digests but probes computed on another base's SVD."""
    import copy

    from diffcli import svd_basis
    from diffcli.diff import BasisScales
    from diffcli.weights import WeightStore

    diff = copy.copy(basis_models["diff"])
    other = WeightStore(basis_models["other"])
    diff.bases = {}
    for name, bs in basis_models["diff"].bases.items():
        u, s, vh = svd_basis.canonical_svd(other[diff.tensors[name].base_name])
        diff.bases[name] = BasisScales(bs.rank, bs.kept, bs.values, svd_basis.probe(u, s, vh, bs.coefficients()))
    other.release()
    return diff
