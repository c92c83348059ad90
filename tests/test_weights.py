"""Model resolution, lazy sharded weight access, prefix-aware name matching, fingerprints."""

from __future__ import annotations

import pytest
import torch

from diffcli.errors import HubUnavailableError, InvalidValueError, NotFoundError
from diffcli.weights import (WeightStore, fingerprint, match_names, resolve_model, tensor_digest)


def test_match_names_across_a_task_prefix():
    base = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight", "pooler.dense.bias"]
    target = ["bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.attention.self.query.weight",
              "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]
    m = match_names(base, target)
    assert m == {t: t.removeprefix("bert.") for t in target[:3]}


def test_match_names_prefixed_base_against_bare_model():
    base = ["bert.embeddings.x", "bert.encoder.y", "cls.predictions.bias"]
    m = match_names(base, ["embeddings.x", "encoder.y"])
    assert m == {"embeddings.x": "bert.embeddings.x", "encoder.y": "bert.encoder.y"}


def test_match_names_identity_and_no_double_claim():
    m = match_names(["a.w", "b.w"], ["a.w", "b.w", "x.a.w"])
    assert m["a.w"] == "a.w" and m["b.w"] == "b.w"
    assert list(m.values()).count("a.w") == 1


def test_weight_store_reads_sharded_folders(tiny_base, tmp_path):
    from transformers import BertModel

    model = BertModel.from_pretrained(tiny_base)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    single, multi = WeightStore(tiny_base), WeightStore(sharded)
    assert sorted(single.names()) == sorted(multi.names())
    assert len(multi.files()) > 1
    for name in single.names():
        assert multi.shape(name) == single.shape(name)
        assert multi.dtype(name) == single.dtype(name) == "float32"
        assert torch.equal(multi[name], single[name])


def test_resolve_model_errors(tmp_path, tiny_base, monkeypatch):
    assert resolve_model(str(tiny_base)) == tiny_base
    with pytest.raises(NotFoundError):
        resolve_model(str(tmp_path / "nope") + "/")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InvalidValueError):
        resolve_model(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError):
        resolve_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError):
        resolve_model("some-org/some-model-that-is-not-cached")


def test_bundled_alias_resolves_offline():
    path = resolve_model("minilm")
    assert (path / "config.json").exists()


def test_digest_depends_on_content_dtype_and_shape():
    t = torch.arange(12, dtype=torch.float32)
    assert tensor_digest(t) == tensor_digest(t.clone())
    assert tensor_digest(t) != tensor_digest(t.reshape(3, 4))
    assert tensor_digest(t) != tensor_digest(t.double())
    u = t.clone()
    u[5] = torch.nextafter(u[5], torch.tensor(100.0))
    assert tensor_digest(t) != tensor_digest(u)
    assert tensor_digest(t.reshape(3, 4).t()) == tensor_digest(t.reshape(3, 4).t().contiguous())
    assert fingerprint(["b", "a"]) == fingerprint(["a", "b"]) != fingerprint(["a", "c"])
