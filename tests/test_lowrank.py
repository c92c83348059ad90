"""Low-rank records (δ = B·A): format v2 round trips, schema, inspect, checkpoint, apply/bank/merge, hostile input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from conftest import apply_sharded_in_small_chunks, make_base, make_finetune
from diffcli import artifact, checkpoint, lowrank
from diffcli.cli.app import app
from diffcli.diff import Diff
from diffcli.errors import FormatError, InvalidValueError
from diffcli.extract import extract_diff
from diffcli.projection import project
from test_artifact import golden_diff
from diff_bytes import build2, replace_raw, split2

runner = CliRunner()
GOLDEN_LOWRANK = Path(__file__).parent / "data" / "golden_v2_lowrank.diff"
GOLDEN_LOWRANK_SHA256 = "96403aae7f16e0ad9f624e860dc0e808e6ba482d5ce1eb0239c8edb0b14254f8"
SCHEMA = Path(artifact.__file__).parent / "schema" / "header.schema.json"
QUERY = "bert.encoder.layer.0.attention.self.query.weight"  # 32×32 in the tiny BERT
EMB = "bert.embeddings.word_embeddings.weight"  # 120×32


def with_lowrank(diff: Diff, name: str, rank: int, seed: int = 0, scale: float = 0.05) -> Diff:
    """`diff` with tensor `name` replaced by a random rank-`rank` update (same base name, shape and digest)."""
    td = diff.tensors[name]
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(td.shape[0], rank, generator=g) * scale
    a = torch.randn(rank, td.shape[1], generator=g) * scale
    tensors = dict(diff.tensors)
    tensors[name] = lowrank.make(td.base_name, td.shape, td.dtype, td.digest, b, a)
    return Diff(tensors, dict(diff.extras), diff.config, diff.base_ref, diff.base_fingerprint, dict(diff.meta))


def golden_lowrank() -> Diff:
    """The golden diff plus a 6×5 rank-2 record (values exact in fp16, zeros and signs of both kinds)."""
    from diffcli.weights import fingerprint

    d = golden_diff()
    b = (torch.arange(12, dtype=torch.float32).reshape(6, 2) - 5.5) / 8
    a = torch.tensor([[0.5, -1.25, 0.0, 3.0, -0.0625], [2.0, 0.125, -0.75, 0.0, 1.5]])
    d.tensors["bert.encoder.lr"] = lowrank.make("encoder.lr", (6, 5), "float32", "ab" * 16, b, a)
    d.base_fingerprint = fingerprint(t.digest for t in d.tensors.values())
    return d


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank")
    base = make_base(root / "base")
    sparse = project(extract_diff(str(base), str(make_finetune(base, root / "ft", seed=1))), 0.1).diff
    diff = with_lowrank(with_lowrank(sparse, QUERY, 4), EMB, 3, seed=1)
    checkpoint.save(diff, root / "lr.ckpt")
    artifact.write(diff, root / "lr.diff", values="fp32")
    return root, base, sparse, diff


# ----------------------------------------------------------------------------------------------- format

def test_golden_lowrank_bytes(golden_producer):
    data = GOLDEN_LOWRANK.read_bytes()
    assert hashlib.sha256(data).hexdigest() == GOLDEN_LOWRANK_SHA256
    assert artifact.pack(golden_lowrank()) == data
    back = artifact.load(GOLDEN_LOWRANK).tensors["bert.encoder.lr"]
    want = golden_lowrank().tensors["bert.encoder.lr"]
    assert all(torch.equal(x, y) for x, y in zip(back.factors, want.factors))  # exact in fp16


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16", "int8", "int4", "ternary"])
def test_round_trip_every_quantizer(values):
    d = golden_lowrank()
    data = artifact.pack(d, values)
    assert data == artifact.pack(golden_lowrank(), values)  # deterministic
    back = artifact.loads(data)
    td, src = back.tensors["bert.encoder.lr"], d.tensors["bert.encoder.lr"]
    assert td.is_lowrank and td.base_name == "encoder.lr" and td.shape == (6, 5)
    assert [tuple(f.shape) for f in td.factors] == [(6, 2), (2, 5)]
    header = artifact.loads_header(data)
    assert header["nnz"] == back.nnz  # sparse entries + 6·2 + 2·5 factor entries
    assert td.nnz == 22 and (back.nnz == d.nnz or values in ("int8", "int4", "ternary"))  # zero codes: sparse only
    stored = torch.cat([f.reshape(-1) for f in src.factors])
    got = torch.cat([f.reshape(-1) for f in td.factors])
    assert float((stored - got).abs().max()) <= header["values"]["max_abs_error"] + 1e-7
    if values == "fp32":
        assert all(torch.equal(x, y) for x, y in zip(td.factors, src.factors))
    for name in ("bert.encoder.w", "bert.encoder.b"):  # the other records are unaffected by the new kind
        assert torch.equal(back.tensors[name].dense(), artifact.loads(artifact.pack(golden_diff(), values))
                           .tensors[name].dense())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(out=st.integers(1, 9), inp=st.integers(1, 9), data=st.data(), values=st.sampled_from(["fp32", "int8"]),
       scale=st.sampled_from([1e-4, 1.0, 300.0]))
def test_hypothesis_round_trip(out, inp, data, values, scale):
    rank = data.draw(st.integers(1, min(out, inp)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    d = golden_diff()
    b, a = torch.randn(out, rank, generator=g) * scale, torch.randn(rank, inp, generator=g)
    d.tensors["bert.x"] = lowrank.make("x", (out, inp), "bfloat16", "cd" * 16, b, a)
    data_bytes = artifact.pack(d, values)
    back = artifact.loads(data_bytes).tensors["bert.x"]
    err = artifact.loads_header(data_bytes)["values"]["max_abs_error"]
    assert back.is_lowrank and back.shape == (out, inp) and back.dtype == "bfloat16"
    for got, want in zip(back.factors, (b, a)):
        assert got.shape == want.shape and float((got - want).abs().max()) <= err * (1 + 1e-6)
    if values == "fp32":
        assert torch.equal(back.dense(), b @ a)


def test_blocks_restart_at_each_factor():
    d = golden_lowrank()
    b, a = d.tensors["bert.encoder.lr"].factors
    d.tensors["bert.encoder.lr"].factors = (b * 1000, a / 1000)  # very different scales
    back = artifact.loads(artifact.pack(d, "int8", block=256)).tensors["bert.encoder.lr"]
    for got, want in zip(back.factors, (b * 1000, a / 1000)):
        assert float((got - want).abs().max()) <= float(want.abs().max()) / 127 * 0.5 + 1e-9


def test_header_matches_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    header = artifact.loads_header(artifact.pack(golden_lowrank(), "fp16"))
    jsonschema.validate(header, schema)
    rec = next(r for r in header["records"] if r[0] == "lowrank")
    assert rec == ["lowrank", "bert.encoder.lr", "encoder.lr", "float32", [6, 5], "ab" * 16, 2]
    for bad in (0, 3.5):
        broken = json.loads(json.dumps(header))
        next(r for r in broken["records"] if r[0] == "lowrank")[6] = bad
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_version_1_refuses_a_lowrank_diff():
    with pytest.raises(InvalidValueError, match="version 1 cannot hold the low-rank"):
        artifact.pack(golden_lowrank(), "fp16", version=1)


@pytest.mark.parametrize("b_shape, a_shape, message", [
    ((6, 2), (3, 5), "do not multiply"),
    ((6, 7), (7, 5), "rank 7 is outside 1..5"),
    ((5, 2), (2, 5), "do not multiply"),
    ((6, 0), (0, 5), "rank 0 is outside"),
])
def test_writer_refuses_factors_that_lie(b_shape, a_shape, message):
    d = golden_lowrank()
    d.tensors["bert.encoder.lr"].factors = (torch.ones(b_shape), torch.ones(a_shape))
    with pytest.raises(InvalidValueError, match=message):
        artifact.pack(d, "fp16")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_writer_refuses_non_finite_factors(bad):
    d = golden_lowrank()
    b, a = d.tensors["bert.encoder.lr"].factors
    a = a.clone()
    a[1, 2] = bad
    d.tensors["bert.encoder.lr"].factors = (b, a)
    with pytest.raises(InvalidValueError, match="NaN or infinite"):
        artifact.pack(d, "fp32")


def _lowrank_record(header: dict) -> list:
    return next(r for r in header["records"] if r[0] == "lowrank")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.__setitem__(6, 3), "nnz 31 is not the sum 42"),  # a rank that lies about the stored factors
    (lambda r: r.__setitem__(6, 1), "nnz 31 is not the sum 20"),
    (lambda r: r.__setitem__(6, 0), "rank 0 is outside"),
    (lambda r: r.__setitem__(6, 6), "rank 6 is outside 1..5"),
    (lambda r: r.__setitem__(4, [6, 5, 1]), "not 2-D"),
    (lambda r: r.__setitem__(3, "int64"), "only float tensors"),
    (lambda r: r.__setitem__(6, True), "rank"),
    (lambda r: r.append(1), "must have 7 fields"),
])
def test_reader_refuses_lying_lowrank_records(mutate, message):
    header, payload = split2(artifact.pack(golden_lowrank(), "fp32"))
    mutate(_lowrank_record(header))
    with pytest.raises(FormatError, match=message):
        artifact.loads(build2(header, payload))


@pytest.mark.parametrize("rank", [1, 3])
def test_reader_refuses_a_rank_that_lies_even_with_matching_totals(rank):
    header, payload = split2(artifact.pack(golden_lowrank(), "fp32"))
    _lowrank_record(header)[6] = rank
    header["nnz"] += (rank - 2) * 11
    with pytest.raises(FormatError, match="values.raw_length"):
        artifact.loads(build2(header, payload))


def test_reader_refuses_non_finite_factors():
    header, payload = split2(artifact.pack(golden_lowrank(), "fp32"))
    from diff_bytes import raw2
    from diffcli import codec

    raw = codec.from_planes(np.frombuffer(raw2(header, payload, "values"), np.uint8).copy(), 4)
    vals = np.frombuffer(bytes(raw), "<f4").copy()
    vals[-1] = np.inf  # the last entry of A (the low-rank record sorts last)
    planes = codec.to_planes(vals.astype("<f4").view(np.uint8), 4)
    with pytest.raises(FormatError, match="NaN or infinite"):
        artifact.loads(replace_raw(header, payload, "values", bytes(planes)))


# ----------------------------------------------------------------------------------------------- checkpoint, CLI

def test_checkpoint_round_trip_and_pack(env, tmp_path):
    root, _base, _sparse, diff = env
    back = checkpoint.load(root / "lr.ckpt")
    for name in (QUERY, EMB):
        assert back.tensors[name].is_lowrank
        assert all(torch.equal(x, y) for x, y in zip(back.tensors[name].factors, diff.tensors[name].factors))
    res = runner.invoke(app, ["pack", str(root / "lr.ckpt"), "-o", str(tmp_path / "x.diff"), "--values", "fp32"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "x.diff").read_bytes() == (root / "lr.diff").read_bytes()


def test_inspect_json_counts_factor_entries_as_params(env):
    root, _base, _sparse, diff = env
    for path in (root / "lr.diff", root / "lr.ckpt"):
        res = runner.invoke(app, ["inspect", str(path), "--json"])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        rows = {r["tensor"]: r for r in report["tensors"]}
        assert rows[QUERY]["kind"] == "lowrank" and rows[QUERY]["nnz"] == 4 * (32 + 32) and rows[QUERY]["rank"] == 4
        assert rows[EMB]["nnz"] == 3 * (120 + 32)
        sparse_nnz = sum(td.nnz for td in diff.tensors.values() if not td.is_lowrank)
        assert report["totals"]["params"] == sparse_nnz + 4 * 64 + 3 * 152 == diff.nnz
    res = runner.invoke(app, ["inspect", str(root / "lr.diff"), "--tensors"])
    assert res.exit_code == 0 and "lowrank" in res.stdout


def test_verify_with_base(env):
    root, base, _sparse, _diff = env
    res = runner.invoke(app, ["verify", str(root / "lr.diff"), "--base", str(base)])
    assert res.exit_code == 0, res.output


def _bad_checkpoint(root: Path, tmp: Path, kind: str) -> Path:
    from safetensors.torch import load_file, save_file

    import shutil

    bad = tmp / f"bad-{kind}.ckpt"
    shutil.copytree(root / "lr.ckpt", bad)
    t = load_file(str(bad / checkpoint.TENSOR_FILE))
    if kind == "rank":
        t[f"lowrank.A/{QUERY}"] = torch.zeros(5, 32)  # B says rank 4
    elif kind == "shape":
        t[f"lowrank.B/{QUERY}"] = torch.zeros(31, 4)
    else:
        t[f"lowrank.B/{QUERY}"][0, 0] = float("nan")
    save_file(t, str(bad / checkpoint.TENSOR_FILE))
    return bad


@pytest.mark.parametrize("kind, message", [("rank", "do not multiply"), ("shape", "do not multiply"),
                                           ("nan", "NaN or infinite")])
def test_hostile_checkpoints_one_line_exit_4_nothing_written(env, tmp_path, kind, message):
    root, base, _sparse, _diff = env
    bad = _bad_checkpoint(root, tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["pack", str(bad), "-o", str(tmp_path / "out.diff")], ["inspect", str(bad)],
                 ["apply", str(base), str(bad), "-o", str(tmp_path / "merged")]):
        res = runner.invoke(app, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 4 and len(lines) == 1 and message in lines[0], (args, res.stderr)
        assert res.stdout == "" and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_hostile_packed_file_one_line_exit_4_nothing_written(env, tmp_path):
    root, base, _sparse, _diff = env
    header, payload = split2((root / "lr.diff").read_bytes())
    _lowrank_record(header)[6] += 1
    bad = tmp_path / "bad.diff"
    bad.write_bytes(build2(header, payload))
    for args in (["verify", str(bad)], ["inspect", str(bad)], ["pack", str(bad), "-o", str(tmp_path / "o.diff")],
                 ["apply", str(base), str(bad), "-o", str(tmp_path / "merged")]):
        res = runner.invoke(app, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 4 and len(lines) == 1, (args, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.diff"]


# ----------------------------------------------------------------------------------------------- rebuilding

def test_apply_streams_w_plus_ba_in_float32_cast_once(env, tmp_path):
    from safetensors.torch import load_file

    from diffcli.applying import apply_to_folder
    from diffcli.weights import WeightStore

    root, base, _sparse, diff = env
    store = WeightStore(base)
    for dtype in (None, "bfloat16"):
        out = tmp_path / f"merged-{dtype}"
        apply_to_folder(str(base), root / "lr.diff", out, dtype=dtype)
        got = load_file(str(out / "model.safetensors"))
        for name in (QUERY, EMB):
            td = diff.tensors[name]
            w = store[td.base_name]
            want = (w.float() + td.factors[0] @ td.factors[1]).to(got[name].dtype)
            assert torch.equal(got[name], want), name


def test_apply_from_a_sharded_base_into_shards_through_small_chunks_is_the_same_model(env, tmp_path, monkeypatch):
    """Chunks of 50 floats cut the 32-wide rows of B·A mid-row: every entry is the whole product's to float32
    rounding (a matmul of a row block may round an entry otherwise, FORMAT.md §10), and every other tensor, from a
    sharded base into shards, is bit for bit the one-file result."""
    root, base, _sparse, _diff = env
    got, want, report = apply_sharded_in_small_chunks(base, root / "lr.diff", tmp_path, monkeypatch)
    assert report.shards > 2
    assert set(got) == set(want)
    for k in want:
        if k in (QUERY, EMB):
            torch.testing.assert_close(got[k], want[k], rtol=2 ** -22, atol=2 ** -30)  # an ulp of B·A, no more
        else:
            assert torch.equal(got[k], want[k]), k


def test_apply_in_memory_and_revert_bit_for_bit(env):
    from transformers import BertForSequenceClassification

    from diffcli.applying import apply_, revert_

    root, base, _sparse, diff = env
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_(model, diff)
    td = diff.tensors[QUERY]
    assert torch.equal(model.state_dict()[QUERY], before[QUERY] + td.factors[0] @ td.factors[1])
    revert_(model, handle)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bank_switches_and_restores_the_base_bit_for_bit(env, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from diffcli.applying import apply_to_folder
    from diffcli.bank import DiffBank

    root, base, sparse, _diff = env
    checkpoint.save(sparse, tmp_path / "sparse.ckpt")
    bank = DiffBank(str(base), device="cpu")
    enc0 = {k: v.clone() for k, v in bank.encoder.state_dict().items()}
    bank.add("lr", root / "lr.diff")
    bank.add("sparse", tmp_path / "sparse.ckpt")
    batch = {"input_ids": torch.randint(5, 40, (2, 7), generator=torch.Generator().manual_seed(0)),
             "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    apply_to_folder(str(base), root / "lr.diff", tmp_path / "merged")
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = ref(**batch).logits
        for task in ("lr", "sparse", "lr"):
            with bank.use(task) as model:
                got = model(**batch).logits
            if task == "lr":
                assert torch.allclose(got, want, atol=1e-5)
    bank.reset()
    assert all(torch.equal(enc0[k], v) for k, v in bank.encoder.state_dict().items())


def test_merge_of_sparse_and_lowrank_on_one_tensor_is_exact(env, tmp_path):
    root, _base, sparse, diff = env
    checkpoint.save(sparse, tmp_path / "sparse.ckpt")
    out = tmp_path / "merged.diff"
    res = runner.invoke(app, ["merge", str(root / "lr.diff"), str(tmp_path / "sparse.ckpt"), "-o", str(out),
                              "--weights", "0.5,2", "--values", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert sorted(report["densified"]) == sorted(f"{root / 'lr.diff'}:{n}" for n in (EMB, QUERY))
    merged = artifact.load(out)
    for name in (QUERY, EMB):
        want = (0.5 * diff.tensors[name].dense().double() + 2 * sparse.tensors[name].dense().double()).float()
        assert not merged.tensors[name].is_lowrank
        assert torch.equal(merged.tensors[name].dense(), want)


def test_merge_of_two_lowrank_records_on_one_tensor_is_exact(env):
    """FORMAT.md §10: two low-rank δ on one tensor (ranks 4 and 2, 3 and 5) are densified and summed exactly."""
    from diffcli.merging import merge

    _root, _base, sparse, diff = env
    other = with_lowrank(with_lowrank(sparse, QUERY, 2, seed=7), EMB, 5, seed=8)
    result = merge([diff, other], [0.5, -2.0], names=["a", "b"])
    assert sorted(result.report["densified"]) == sorted(f"{w}:{n}" for w in "ab" for n in (EMB, QUERY))
    for name in (QUERY, EMB):
        want = (0.5 * diff.tensors[name].dense().double() - 2 * other.tensors[name].dense().double()).float()
        assert not result.diff.tensors[name].is_lowrank
        assert torch.equal(result.diff.tensors[name].dense(), want), name


def test_prune_projects_the_product_exactly(env):
    from diffcli.projection import project as project_diff

    _root, _base, _sparse, diff = env
    out = project_diff(diff, 0.01)
    dense = torch.cat([diff.tensors[n].dense().reshape(-1) for n in sorted(diff.tensors) if diff.tensors[n].is_float])
    kept = torch.cat([out.diff.tensors[n].dense().reshape(-1) for n in sorted(diff.tensors)
                      if diff.tensors[n].is_float])
    k = out.k
    assert int((kept != 0).sum()) == k and not any(t.is_lowrank for t in out.diff.tensors.values())
    thr = dense.abs().topk(k).values.min()
    assert bool((kept[kept != 0].abs() >= thr).all()) and torch.equal(kept[kept != 0], dense[kept != 0])


def test_a_low_rank_record_too_big_to_densify_is_out_of_memory_exit_1_not_an_internal_error(tmp_path):
    """A 2^23 x 2^23 rank-1 record is a small file; prune and merge densify B·A: exit 1 "out of memory", not 70."""
    from typer.testing import CliRunner

    from diffcli.cli._errors import classify
    from diffcli.cli.app import app

    d = golden_lowrank()
    n = 2 ** 23
    d.tensors["bert.encoder.lr"] = lowrank.make("encoder.lr", (n, n), "float32", "ab" * 16,
                                                torch.zeros(n, 1), torch.zeros(1, n))
    bomb = tmp_path / "bomb.diff"
    artifact.write(d, bomb, values="fp16")
    assert bomb.stat().st_size < 200_000
    for args in (["prune", str(bomb), "-s", "1%", "-o", str(tmp_path / "p")],
                 ["merge", str(bomb), str(bomb), "-o", str(tmp_path / "m.diff")]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert res.stderr.startswith("error: out of memory") and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.diff"]
    oom = type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert classify(oom)[:2] == (1, "out of memory")
    assert classify(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))[0] == 70
