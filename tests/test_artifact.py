"""Packed artifact: golden bytes, determinism, round trips, header schema, verify against a base."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from diffcli import artifact
from diffcli.diff import Diff, TensorDiff
from diffcli.errors import BaseMismatchError, FormatError, InvalidValueError, NotFoundError
from diffcli.weights import fingerprint

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden_v1.diff"
GOLDEN_SHA256 = "5cdeb112972d11c75417da748e279c16ce95a55a7b3b3893c885b6772985f1f2"
GOLDEN_V2 = DATA / "golden_v2.diff"
GOLDEN_V2_SHA256 = "6ea4fd79b2704534f8b0f38d46ecf8ebc6fc7a478706a1ad1fa1c896efe6b4bb"
SCHEMA = Path(artifact.__file__).parent / "schema" / "header.schema.json"
SCHEMA_V1 = Path(artifact.__file__).parent / "schema" / "header-v1.schema.json"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_clustered_positions_are_compressed_below_their_rice_code():
    """Whole rows kept (as an L0 run with structured gates leaves them) cost far less than random positions."""
    numel, rows = 1 << 20, 10
    idx = torch.cat([torch.arange(r * 4096, r * 4096 + 1024) for r in range(rows)])  # 10 contiguous runs of 1024
    vals = torch.linspace(1e-3, 2e-3, idx.numel())
    td = TensorDiff("w", (1024, numel // 1024), "float32", _digest("w"), vals, idx)
    diff = Diff({"bert.w": td}, {}, {}, "b", fingerprint([td.digest]), {})
    data = artifact.pack(diff, "fp16")
    stream = artifact.loads_header(data)["streams"]["positions"]
    assert stream["codec"] == "zstd" and stream["length"] < stream["raw_length"] / 8
    assert torch.equal(artifact.loads(data).tensors["bert.w"].indices, idx)


def golden_diff(reverse: bool = False) -> Diff:
    """A tiny diff with every feature: sparse, dense, empty and integer tensors, extras of four dtypes."""
    tensors = {
        "bert.encoder.w": TensorDiff("encoder.w", (4, 8), "float32", _digest("w"),
                                     torch.tensor([0.5, -0.25, 1e-3, 3.0, 1 / 3]),
                                     torch.tensor([1, 5, 6, 30, 31], dtype=torch.int64)),
        "bert.encoder.b": TensorDiff("encoder.b", (8,), "float32", _digest("b"),
                                     torch.tensor([0.0, 0.125, 0.0, 0.0, -2.0, 0.0, 7e-5, 0.0])),
        "bert.encoder.h": TensorDiff("encoder.h", (2, 3), "bfloat16", _digest("h"),
                                     torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.5]).reshape(2, 3)),
        "bert.empty": TensorDiff.zeros("empty", (3, 5), "float16", _digest("e")),
        "bert.ids": TensorDiff.zeros("ids", (1, 6), "int64", _digest("ids")),
    }
    extras = {
        "classifier.weight": (torch.arange(8, dtype=torch.float32).reshape(2, 4) - 3.5) / 10,
        "classifier.bias": torch.tensor([0.25, -1.0], dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.tensor([[7, -2**40]], dtype=torch.int64),
    }
    config = {"architectures": ["BertForSequenceClassification"], "num_labels": 2, "label2id": {"neg": 0, "pos": 1}}
    meta = {"task": "golden", "metrics": {"accuracy": 0.5}, "note": "é ☃"}
    if reverse:
        tensors = dict(reversed(list(tensors.items())))
        extras = dict(reversed(list(extras.items())))
        config = dict(reversed(list(config.items())))
        meta = dict(reversed(list(meta.items())))
    fp = fingerprint(t.digest for t in tensors.values())
    return Diff(tensors, extras, config, "tiny-bert", fp, meta)


def max_error(data: bytes) -> float:
    """The recorded max abs error of a packed file of either version."""
    h = artifact.loads_header(data)
    return h["max_abs_error"] if h["version"] == 1 else h["values"]["max_abs_error"]


def assert_same_diff(a: Diff, b: Diff, atol: float = 0.0) -> None:
    assert set(a.tensors) == set(b.tensors) and set(a.extras) == set(b.extras)
    assert (a.config, a.meta, a.base_ref, a.base_fingerprint) == (b.config, b.meta, b.base_ref, b.base_fingerprint)
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        assert (ta.base_name, tuple(ta.shape), ta.dtype, ta.digest) == (tb.base_name, tuple(tb.shape), tb.dtype,
                                                                         tb.digest)
        assert ta.nnz == tb.nnz
        assert torch.allclose(ta.dense(), tb.dense(), rtol=0, atol=atol), name
    for name, ea in a.extras.items():
        eb = b.extras[name]
        assert ea.dtype == eb.dtype and ea.shape == eb.shape and torch.equal(ea, eb), name


def test_golden_bytes(golden_producer):
    data = GOLDEN.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256
    assert artifact.pack(golden_diff(), version=1) == data


def test_golden_v2_bytes(golden_producer):
    data = GOLDEN_V2.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_V2_SHA256
    assert artifact.pack(golden_diff()) == data


def test_golden_file_decodes_to_the_golden_diff():
    back = artifact.load(GOLDEN)
    assert_same_diff(golden_diff(), back, atol=artifact.read_header(GOLDEN)["max_abs_error"])
    assert back.tensors["bert.encoder.w"].indices.tolist() == [1, 5, 6, 30, 31]
    assert back.tensors["bert.encoder.b"].indices.tolist() == [1, 4, 6]  # a dense diff is stored sparsely
    assert back.tensors["bert.encoder.w"].values[3].item() == 3.0


def test_golden_preamble_layout():
    data = GOLDEN.read_bytes()
    assert data[:8] == b"DIFFPRUN"
    assert int.from_bytes(data[8:10], "little") == 1 and int.from_bytes(data[10:12], "little") == 0
    hlen = int.from_bytes(data[12:16], "little")
    header = json.loads(data[16:16 + hlen])
    assert data[16 + hlen:48 + hlen] == hashlib.sha256(data[:16 + hlen]).digest()
    assert data[16:16 + hlen] == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    sections = [e["data"] for _, e in sorted(header["extras"].items())]
    for _, t in sorted(header["tensors"].items()):
        sections += [t["index"], t["values"]] if t["nnz"] else []
    assert sum(s["length"] for s in sections) == len(data) - (48 + hlen)


def test_pack_is_deterministic_across_insertion_order():
    assert artifact.pack(golden_diff()) == artifact.pack(golden_diff())
    assert artifact.pack(golden_diff()) == artifact.pack(golden_diff(reverse=True))
    assert artifact.pack(golden_diff(), "bf16") != artifact.pack(golden_diff(), "fp16")


def test_header_matches_schema_and_reader_rules():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA_V1.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for values in ("fp16", "bf16", "fp32"):
        header = artifact.loads_header(artifact.pack(golden_diff(), values, version=1))
        jsonschema.validate(header, schema)
    bad = artifact.loads_header(artifact.pack(golden_diff(), version=1))
    bad["tensors"]["bert.encoder.w"]["surprise"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(FormatError, match="unknown keys"):
        artifact.validate_header(bad, 10**6)


def test_fp32_round_trip_is_exact_and_casts_stay_within_recorded_error():
    diff = golden_diff()
    assert_same_diff(diff, artifact.loads(artifact.pack(diff, "fp32")))
    for values in ("fp16", "bf16"):
        data = artifact.pack(diff, values)
        err = max_error(data)
        assert 0 < err < 0.01
        assert_same_diff(diff, artifact.loads(data), atol=err)


def test_write_read_header_and_report(tmp_path):
    out = tmp_path / "g.diff"
    report = artifact.write(golden_diff(), out)
    assert out.stat().st_size == report.bytes and report.nnz == 9 and report.tensors == 5 and report.extras == 4
    assert report.header_bytes + report.index_bytes + report.values_bytes + report.extras_bytes == report.bytes
    header = artifact.read_header(out)
    assert header["nnz"] == 9 and header["budget_numel"] == 32 + 8 + 6 + 15
    assert header["version"] == 2 and {r[1]: r for r in header["records"]}["bert.encoder.b"][2] == "encoder.b"
    with pytest.raises(Exception) as exc:
        artifact.write(golden_diff(), out)
    assert type(exc.value).__name__ == "OutputExistsError"
    assert [p.name for p in tmp_path.iterdir()] == ["g.diff"]


def test_write_refuses_binary_to_a_terminal(monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    with pytest.raises(InvalidValueError, match="terminal"):
        artifact.write(golden_diff(), "-")
    assert capsys.readouterr().out == ""


def test_pack_rejects_unstorable_diffs():
    diff = golden_diff()
    diff.tensors["bert.encoder.w"].values = torch.tensor([0.5, -0.25, 1e-3, 1e6, 1 / 3])
    with pytest.raises(InvalidValueError, match="fp16 range"):
        artifact.pack(diff, "fp16")
    assert artifact.loads(artifact.pack(diff, "bf16")).tensors["bert.encoder.w"].values[3].item() == \
        pytest.approx(1e6, rel=1e-2)
    diff.tensors["bert.encoder.w"].values = torch.tensor([0.5, float("nan"), 1e-3, 3.0, 1 / 3])
    with pytest.raises(InvalidValueError, match="NaN"):
        artifact.pack(diff, "fp32")
    diff = golden_diff()
    diff.tensors["bert.encoder.w"].indices = torch.tensor([1, 5, 5, 30, 31])
    with pytest.raises(InvalidValueError, match="unsorted"):
        artifact.pack(diff)
    diff = golden_diff()
    diff.base_fingerprint = "abc"
    with pytest.raises(InvalidValueError, match="fingerprint"):
        artifact.pack(diff)
    with pytest.raises(InvalidValueError, match="values"):
        artifact.pack(golden_diff(), "fp8")
    diff = golden_diff()
    diff.meta["bad"] = float("nan")
    with pytest.raises(InvalidValueError, match="JSON"):
        artifact.pack(diff)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_pack_rejects_a_head_holding_nan_or_inf(version, bad):
    """A diverged head is refused as a NaN δ is (readers take any bit pattern; the writer stores none of these)."""
    for name in ("classifier.weight", "classifier.bias"):
        diff = golden_diff()
        diff.extras[name] = diff.extras[name].clone()
        diff.extras[name].view(-1)[1] = bad
        with pytest.raises(InvalidValueError, match=f"extra {name!r} holds NaN or infinite values"):
            artifact.pack(diff, "fp32", version=version)


@st.composite
def diffs(draw):
    """Random diffs: a few tensors (sparse or dense, some empty) and extras, arbitrary finite values."""
    floats = st.floats(-60000, 60000, allow_nan=False, allow_infinity=False, width=32)
    tensors = {}
    for i in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
        numel = int(torch.tensor(shape).prod())
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16", "int64"]))
        if dtype == "int64" or numel == 0:
            tensors[f"t{i}"] = TensorDiff.zeros(f"b{i}", shape, dtype, _digest(str(i)))
            continue
        vals = torch.tensor(draw(st.lists(floats, min_size=numel, max_size=numel)), dtype=torch.float32)
        if draw(st.booleans()):
            td = TensorDiff(f"b{i}", shape, dtype, _digest(str(i)), vals.reshape(shape))
        else:
            idx = torch.tensor(sorted(draw(st.sets(st.integers(0, numel - 1), max_size=numel))), dtype=torch.int64)
            td = TensorDiff(f"b{i}", shape, dtype, _digest(str(i)), vals[: idx.numel()], idx)
        tensors[f"t{i}"] = td
    extras = {}
    for i in range(draw(st.integers(0, 2))):
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.uint8]))
        n = draw(st.integers(0, 10))
        extras[f"x{i}"] = (torch.arange(n) * draw(st.integers(1, 7)) - 3).to(dtype)
    meta = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-10**12, 10**12), st.text(max_size=8),
                                                                 st.floats(allow_nan=False, allow_infinity=False)),
                                max_size=3))
    return Diff(tensors, extras, {"k": 1}, draw(st.text(max_size=10)),
                fingerprint(t.digest for t in tensors.values()), meta)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(diffs(), st.sampled_from(["fp16", "bf16", "fp32"]))
def test_round_trip_property(diff, values):
    data = artifact.pack(diff, values)
    assert artifact.pack(diff, values) == data
    back = artifact.loads(data)
    err = max_error(data)
    cast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[values]
    expected = max([float((v.double() - v.to(cast).double()).abs().max())
                    for v in (td.sparse().values for td in diff.tensors.values()) if v.numel()] or [0.0])
    assert err == expected  # recorded exactly, not just bounded
    assert_same_diff(diff, back, atol=err)


def test_size_beats_the_information_bound_on_a_pruned_tensor():
    import math

    gen = torch.Generator().manual_seed(0)
    numel, k = 1 << 20, 5243  # 0.5%
    idx = torch.sort(torch.randperm(numel, generator=gen)[:k]).values
    vals = torch.randn(k, generator=gen) * 1e-3
    vals = vals + vals.sign() * 3e-3  # kept entries of a magnitude projection are away from zero
    td = TensorDiff("w", (1024, 1024), "float32", _digest("w"), vals, idx)
    diff = Diff({"bert.w": td}, {}, {}, "b", fingerprint([td.digest]), {})
    data = artifact.pack(diff, "fp16")
    bound = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2) / 8 + 2 * k
    assert len(data) <= 0.92 * bound
    back = artifact.loads(data).tensors["bert.w"]
    assert torch.equal(back.indices, idx)
    assert float((back.values - vals).abs().max()) <= max_error(data)
    assert artifact.loads_header(data)["streams"]["values"]["codec"] == "zstd"


def test_verify_against_its_base_and_another(tiny_base, tmp_path):
    from conftest import make_base, make_finetune
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    ft = make_finetune(tiny_base, tmp_path / "ft")
    diff = project(extract_diff(str(tiny_base), str(ft)), 0.05).diff
    out = tmp_path / "d.diff"
    artifact.write(diff, out)
    report = artifact.verify(out)
    assert report.base is None and report.nnz == diff.nnz and report.sections > 0
    report = artifact.verify(out, base=str(tiny_base))
    assert report.base_tensors_checked == len(diff.tensors) and report.fingerprint == diff.base_fingerprint
    other = make_base(tmp_path / "other", seed=3)
    with pytest.raises(BaseMismatchError, match=r"of \d+ base tensors differ.*first: 'bert\."):
        artifact.verify(out, base=str(other))
    smaller = make_base(tmp_path / "smaller", hidden_size=16)
    with pytest.raises(BaseMismatchError, match="shape"):
        artifact.verify(out, base=str(smaller))
    with pytest.raises(NotFoundError):
        artifact.verify(tmp_path / "missing.diff")


def test_golden_v1_file_still_verifies_and_applies(tmp_path):
    """A file of today's readers' oldest version: its expected tensors through load, verify and apply."""
    from diffcli.applying import apply_

    report = artifact.verify(GOLDEN)
    assert (report.version, report.values, report.nnz, report.tensors, report.extras) == (1, "fp16", 9, 5, 4)
    back = artifact.load(GOLDEN)
    w = back.tensors["bert.encoder.w"]
    assert w.indices.tolist() == [1, 5, 6, 30, 31]
    assert w.values.tolist() == [0.5, -0.25, float(torch.tensor(1e-3).half()), 3.0, float(torch.tensor(1 / 3).half())]
    assert back.tensors["bert.encoder.h"].indices.tolist() == [5] and back.tensors["bert.encoder.h"].values.tolist() == [1.5]
    model = torch.nn.Module()
    model.bert = torch.nn.Module()
    model.bert.encoder = torch.nn.Module()
    model.bert.encoder.w = torch.nn.Parameter(torch.ones(4, 8))
    model.bert.encoder.b = torch.nn.Parameter(torch.zeros(8))
    model.bert.encoder.h = torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16))
    model.bert.empty = torch.nn.Parameter(torch.zeros(3, 5, dtype=torch.float16))
    model.bert.register_buffer("ids", torch.zeros(1, 6, dtype=torch.int64))
    model.classifier = torch.nn.Linear(4, 2)
    handle = apply_(model, back, check=False, strict=False)
    expected = torch.ones(32)
    expected[[1, 5, 6, 30, 31]] += w.values
    assert torch.equal(model.bert.encoder.w.detach().reshape(-1), expected)
    assert model.bert.encoder.b.detach().tolist() == pytest.approx([0, 0.125, 0, 0, -2.0, 0, 7e-5, 0], abs=1e-7)
    assert model.bert.encoder.h.detach().reshape(-1).tolist() == [0, 0, 0, 0, 0, 1.5]
    assert torch.equal(model.classifier.weight.detach(), (torch.arange(8.0).reshape(2, 4) - 3.5) / 10)
    assert "flags" in handle.skipped


def test_v2_header_matches_its_schema_for_every_quantizer():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for values in ("fp16", "bf16", "fp32", "int8", "int4", "ternary"):
        header = artifact.loads_header(artifact.pack(golden_diff(), values))
        jsonschema.validate(header, schema)
        assert header["version"] == 2 and header["values"]["quantizer"] == values
    header = artifact.loads_header(artifact.pack(golden_diff(), "int8"))
    for bad in (lambda h: h["records"][0].__setitem__(0, "lowrank"), lambda h: h["values"].update(block=0),
                lambda h: h["values"].update(quantizer="int3"), lambda h: h["streams"].update(extra={})):
        broken = json.loads(json.dumps(header))
        bad(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)
        with pytest.raises(FormatError):
            artifact.validate_header(broken, 10**6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(diffs(), st.sampled_from(["int8", "int4", "ternary"]), st.sampled_from([None, 1, 3, 64]))
def test_quantized_round_trip_property(diff, values, block):
    data = artifact.pack(diff, values, block=block)
    assert artifact.pack(diff, values, block=block) == data
    back = artifact.loads(data)
    err = max_error(data)
    assert set(back.tensors) == set(diff.tensors) and (back.config, back.meta) == (diff.config, diff.meta)
    for name, td in diff.tensors.items():  # entries whose code is 0 are dropped; the rest within the error
        assert back.tensors[name].nnz <= td.nnz
        assert torch.allclose(back.tensors[name].dense(), td.dense(), rtol=0, atol=err * (1 + 1e-6) + 1e-30), name
    for name, t in diff.extras.items():
        assert torch.equal(back.extras[name], t)
