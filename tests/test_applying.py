"""apply_to_folder: base + diff → a Hugging Face folder that reproduces the finetuned model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import make_base, make_finetune, write_vocab
from diffcli import applying, checkpoint
from diffcli.applying import apply_to_folder, parse_dtype, parse_size
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError, OutputExistsError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Base (single file and sharded copy), a finetune, a wrong base, a misfit base, dense and pruned diffs."""
    from transformers import BertModel

    from diffcli.extract import extract_diff
    from diffcli.projection import project

    root = tmp_path_factory.mktemp("apply")
    base = make_base(root / "base")
    sharded = root / "base_sharded"
    BertModel.from_pretrained(base).save_pretrained(sharded, max_shard_size="20KB")
    write_vocab(sharded)
    ft = make_finetune(base, root / "ft")
    dense = extract_diff(str(base), str(ft))
    pruned = project(dense, 0.01).diff
    ckpt = checkpoint.save(pruned, root / "pruned_ckpt")
    return {"root": root, "base": base, "sharded": sharded, "ft": ft, "dense": dense, "pruned": pruned,
            "ckpt": ckpt, "other": make_base(root / "other", seed=5),
            "misfit": make_base(root / "misfit", intermediate_size=48)}


def _logits(folder: Path):
    import torch
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 3], [2, 5, 6, 7, 3, 0]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=(ids != 0).long()).logits


def _weights(folder: Path) -> dict:
    from diffcli.weights import WeightStore

    store = WeightStore(folder)
    return {n: store[n].clone() for n in store.names()}


def _expected(base: Path, diff, dtype=None) -> dict:
    """Reference result computed independently: dense (base.float() + δ) cast once, plus extras."""
    b = _weights(base)
    out = {}
    for name, td in diff.tensors.items():
        t = b[td.base_name]
        out[name] = (t.float() + td.dense()).to(dtype or t.dtype)
    for name, t in diff.extras.items():
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_dense_diff_reproduces_finetune_logits(models, tmp_path):
    import torch

    report = apply_to_folder(models["base"], models["dense"], tmp_path / "out")
    assert report.shards == 1 and report.fingerprint_ok and not report.warnings
    assert report.tensors == len(models["dense"].tensors) + len(models["dense"].extras)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(_logits(tmp_path / "out"), _logits(models["ft"]), rtol=1e-5, atol=1e-6)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]


def test_pruned_diff_is_exact(models, tmp_path):
    import torch

    apply_to_folder(models["base"], models["pruned"], tmp_path / "out")
    got, want = _weights(tmp_path / "out"), _expected(models["base"], models["pruned"])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert not torch.equal(got["bert.encoder.layer.0.attention.self.query.weight"],
                           _weights(models["base"])["encoder.layer.0.attention.self.query.weight"])


def test_diff_path_checkpoint_is_accepted(models, tmp_path):
    import torch

    apply_to_folder(models["base"], models["ckpt"], tmp_path / "a")
    apply_to_folder(models["base"], models["pruned"], tmp_path / "b")
    torch.testing.assert_close(_logits(tmp_path / "a"), _logits(tmp_path / "b"), rtol=0, atol=0)


def test_sharded_base_and_sharded_output(models, tmp_path):
    import torch

    out = tmp_path / "out"
    report = apply_to_folder(models["sharded"], models["pruned"], out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert report.shards == len(files) > 2
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == report.bytes
    from safetensors import safe_open

    for f in files:  # every shard holds at most 20KB of data unless it holds a single bigger tensor
        with safe_open(str(out / f), "pt") as h:
            keys = list(h.keys())
            size = sum(h.get_tensor(k).nbytes for k in keys)
            assert size <= 20_000 or len(keys) == 1
            assert h.metadata() == {"format": "pt"}
    single = tmp_path / "single"
    apply_to_folder(models["base"], models["pruned"], single)
    got, want = _weights(out), _weights(single)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    torch.testing.assert_close(_logits(out), _logits(single), rtol=0, atol=0)


def test_tokenizer_files_are_copied(models, tmp_path):
    from transformers import AutoTokenizer

    apply_to_folder(models["base"], models["pruned"], tmp_path / "out")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (models["base"] / name).read_bytes()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("the cat")["input_ids"] == AutoTokenizer.from_pretrained(models["base"])("the cat")["input_ids"]


def test_wrong_base_fails_and_leaves_nothing(models, tmp_path):
    with pytest.raises(BaseMismatchError, match=r"diff does not fit base: \d+ of \d+ tensors differ.*first "):
        apply_to_folder(models["other"], models["pruned"], tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_force_applies_wrong_base_with_warning(models, tmp_path):
    import torch

    report = apply_to_folder(models["other"], models["pruned"], tmp_path / "out", force=True)
    assert not report.fingerprint_ok
    from diffcli.weights import tensor_digest

    other = _weights(models["other"])  # LayerNorm weights start equal across seeds: only the rest differ
    differ = [td.base_name for td in models["pruned"].tensors.values()
              if tensor_digest(other[td.base_name]) != td.digest]
    assert 0 < len(differ) < len(models["pruned"].tensors) and report.mismatched == differ
    assert f"{len(differ)} of {len(models['pruned'].tensors)} tensors differ" in report.warnings[0]
    assert report.warnings and "applied anyway" in report.warnings[0]
    got, want = _weights(tmp_path / "out"), _expected(models["other"], models["pruned"])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_shape_misfit_fails_even_with_force(models, tmp_path):
    for force in (False, True):
        with pytest.raises(BaseMismatchError, match=r"^diff does not fit base: encoder\.layer\.0\.intermediate"
                                                    r"\.dense\.bias has shape \[48\], diff expects \[64\]$"):
            apply_to_folder(models["misfit"], models["pruned"], tmp_path / "out", force=force)
        assert _no_leftovers(tmp_path, "out")


def test_missing_base_tensor_fails(models, tmp_path):
    import copy

    diff = copy.copy(models["pruned"])
    diff.tensors = dict(diff.tensors)
    name = "bert.pooler.dense.bias"
    td = copy.copy(diff.tensors[name])
    td.base_name = "pooler.nonexistent"
    diff.tensors[name] = td
    with pytest.raises(BaseMismatchError, match="pooler.nonexistent is not in"):
        apply_to_folder(models["base"], diff, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_existing_output_is_refused_and_untouched(models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        apply_to_folder(models["base"], models["pruned"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    apply_to_folder(models["base"], models["pruned"], out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failure_midway_leaves_no_output_and_no_temp(models, tmp_path, monkeypatch):
    real = applying._write_tensor
    calls = []

    def flaky(fd, t, offset):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real(fd, t, offset)

    monkeypatch.setattr(applying, "_write_tensor", flaky)
    with pytest.raises(OSError, match="No space"):
        apply_to_folder(models["sharded"], models["pruned"], tmp_path / "out", max_shard_size="20KB")
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []


def test_nan_in_diff_is_an_error_naming_the_tensor(models, tmp_path):
    import copy

    import torch

    diff = copy.copy(models["pruned"])
    diff.tensors = dict(diff.tensors)
    name = "bert.encoder.layer.1.output.dense.weight"
    td = copy.copy(diff.tensors[name])
    td.values = td.values.clone()
    td.values[0] = float("nan")
    diff.tensors[name] = td
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        apply_to_folder(models["base"], diff, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")
    diff.tensors[name] = copy.copy(models["pruned"].tensors[name])
    diff.tensors[name].values = torch.full_like(diff.tensors[name].values, 1e6)
    with pytest.raises(InvalidValueError, match=name.replace(".", r"\.") + "' overflows float16"):  # the dtype
        apply_to_folder(models["base"], diff, tmp_path / "out", dtype="float16")     # asked, not a corrupt diff
    assert _no_leftovers(tmp_path, "out")


def test_dtype_option_casts_once(models, tmp_path):
    import torch

    apply_to_folder(models["base"], models["pruned"], tmp_path / "out", dtype="bfloat16")
    got, want = _weights(tmp_path / "out"), _expected(models["base"], models["pruned"], torch.bfloat16)
    assert all(got[n].dtype == torch.bfloat16 and torch.equal(got[n], want[n]) for n in want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    _logits(tmp_path / "out")


def test_mixed_dtype_extras_round_trip(models, tmp_path):
    import copy

    import torch
    from safetensors.torch import load_file

    diff = copy.copy(models["pruned"])
    diff.extras = dict(diff.extras)
    diff.extras.update({"x.mask": torch.tensor([True, False, True]), "x.ids": torch.arange(5),
                        "x.half": torch.randn(3, 3).half(), "x.scalar": torch.tensor(2.5)})
    for cap in ("2GB", "1KB"):
        out = tmp_path / cap
        apply_to_folder(models["base"], diff, out, max_shard_size=cap)
        got = {}
        for f in out.glob("*.safetensors"):
            got.update(load_file(str(f)))
        for name in ("x.mask", "x.ids", "x.half", "x.scalar"):
            assert got[name].dtype == diff.extras[name].dtype and torch.equal(got[name], diff.extras[name])


def test_parse_size_and_dtype():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size("20kb") == 20_000
    assert parse_size(123) == 123
    for bad in ("lots", "-1GB", "0", "5XB"):
        with pytest.raises(InvalidValueError):
            parse_size(bad)
    assert parse_dtype("auto") is None and parse_dtype("float16") == "float16"
    with pytest.raises(InvalidValueError):
        parse_dtype("int8")


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_chunked_streaming_is_exact(models, tmp_path, monkeypatch, dtype):
    """Many small chunks (crossing sparse positions) give the same bytes and digests as whole-tensor maths."""
    import torch

    monkeypatch.setattr(applying, "_CHUNK_BYTES", 1000)
    for i, diff in enumerate((models["pruned"], models["dense"])):
        out = tmp_path / f"out{i}"
        report = apply_to_folder(models["sharded"], diff, out, dtype=dtype, max_shard_size="10KB")
        assert report.fingerprint_ok and not report.mismatched
        want_dtype = getattr(torch, dtype) if dtype else None
        got, want = _weights(out), _expected(models["base"], diff, want_dtype)
        assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)


def test_empty_diff_gives_a_valid_empty_weights_file(models, tmp_path):
    from safetensors import safe_open

    from diffcli.diff import Diff

    d = models["pruned"]
    report = apply_to_folder(models["base"], Diff({}, {}, d.config, d.base_ref, d.base_fingerprint), tmp_path / "o",
                             force=True)
    assert report.tensors == 0 and report.shards == 1
    with safe_open(str(tmp_path / "o" / "model.safetensors"), "pt") as h:
        assert list(h.keys()) == []
