"""Basis-scale records: the deterministic basis and probe, format v2 and checkpoint round trips, every reader
(apply, DiffBank, verify, inspect, eval, prune) and merge; hostile files are in test_basis_hostile.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import MATRICES, apply_sharded_in_small_chunks, make_finetune, probes_of_another_base, with_bases
from diffcli import artifact, checkpoint, svd_basis
from diffcli.cli.app import app
from diffcli.diff import BasisScales, TensorDiff
from diffcli.errors import BaseMismatchError, InvalidValueError


def _expected_state(diff, base_dir):
    """base + U·diag(σ⊙c)·Vᵀ + δ by the definition, in float64, per target name."""
    from diffcli.weights import WeightStore

    store = WeightStore(base_dir)
    out = {}
    for name, td in diff.tensors.items():
        w = store[td.base_name].double()
        if name in diff.bases:
            bs = diff.bases[name]
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            lead = u.abs().argmax(0)
            sign = torch.sign(u[lead, torch.arange(u.shape[1])])
            c = bs.coefficients()
            w = w + (u * sign * (s * c)) @ (vh * sign[:, None])
        out[name] = w + td.dense().double()
    store.release()
    return out


# ------------------------------------------------------------------------------------------ basis and probe

def test_canonical_svd_reconstructs_with_the_documented_signs():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    u, s, vh = svd_basis.canonical_svd(w)
    assert u.dtype == torch.float64 and u.shape == (12, 12) and vh.shape == (12, 20)
    assert torch.allclose((u * s) @ vh, w.double(), atol=1e-12)
    lead = u.abs().argmax(dim=0)
    assert bool((u[lead, torch.arange(12)] > 0).all())
    # the same basis from a different factorisation (of Wᵀ), put in the same canonical form
    v2, s2, uh2 = torch.linalg.svd(w.double().T, full_matrices=False)
    u2 = uh2.T
    sign = torch.sign(u2[u2.abs().argmax(0), torch.arange(12)])
    assert torch.allclose(u2 * sign, u, atol=1e-10) and torch.allclose((v2 * sign).T, vh, atol=1e-10)


def test_probe_vectors_are_the_documented_splitmix64_stream():
    """Golden values: a change here changes every probe ever written (docs/FORMAT.md, basis records)."""
    def reference(stream: int, n: int) -> list[float]:
        out = []
        mask = (1 << 64) - 1
        for j in range(n):
            z = ((stream << 32) + j + 1) * 0x9E3779B97F4A7C15 & mask
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & mask
            z = (z ^ (z >> 27)) * 0x94D049BB133111EB & mask
            z ^= z >> 31
            out.append((z >> 11) * 2.0 ** -52 - 1.0)
        norm = sum(x * x for x in out) ** 0.5
        return [x / norm for x in out]

    for stream, n in ((0, 5), (3, 17), (7, 64)):
        assert np.allclose(svd_basis.probe_vector(stream, n), reference(stream, n), rtol=0, atol=1e-15)
    assert svd_basis.probe_vector(0, 3).round(12).tolist() == [round(x, 12) for x in reference(0, 3)]


def test_resolve_is_the_definition_and_a_tampered_base_misses_the_probe():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(2))
    u, s, vh = svd_basis.canonical_svd(w)
    a = torch.linspace(0.5, 1.5, 16)
    a[3] = 0
    bs = svd_basis.make_scales(u, s, vh, a)
    assert bs.nkept == 15 and 3 not in bs.kept.tolist()
    td = TensorDiff.zeros("w", (16, 24), "float32", "0" * 32)
    got, err = svd_basis.resolve("w", w, td, bs)
    assert err < 1e-12
    assert torch.allclose(got.values.double(), (u * (s * a.double())) @ vh - w.double(), atol=1e-6)
    ones = svd_basis.make_scales(u, s, vh, torch.ones(16))  # a = 1 everywhere: the base, exactly
    assert not bool(svd_basis.resolve("w", w, td, ones)[0].values.any())
    tampered = w.clone()
    tampered[0, 0] += 1e-2
    with pytest.raises(BaseMismatchError, match="probe"):
        svd_basis.resolve("w", tampered, td, bs)
    with pytest.raises(BaseMismatchError, match="probe"):
        svd_basis.resolve("w", torch.randn(16, 24), td, bs)


def test_probe_tolerance_covers_the_recorded_value_error_and_no_more():
    w = torch.randn(16, 24, generator=torch.Generator().manual_seed(3))
    u, s, vh = svd_basis.canonical_svd(w)
    bs = svd_basis.make_scales(u, s, vh, 1 + 0.1 * torch.randn(16, generator=torch.Generator().manual_seed(4)))
    cast = bs.values.half().float()
    err = float((cast - bs.values).abs().max())
    assert err > 0
    td = TensorDiff.zeros("w", (16, 24), "float32", "0" * 32)
    lying = BasisScales(bs.rank, bs.kept, cast, bs.probe, 0.0)  # fp16 values without their recorded error
    with pytest.raises(BaseMismatchError):
        svd_basis.resolve("w", w, td, lying)
    svd_basis.resolve("w", w, td, BasisScales(bs.rank, bs.kept, cast, bs.probe, err))


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_v2_round_trip_keeps_the_basis_records(basis_models, values):
    diff = basis_models["diff"]
    back = artifact.loads(artifact.pack(diff, values))
    assert sorted(back.bases) == sorted(diff.bases)
    for name, bs in diff.bases.items():
        got = back.bases[name]
        assert got.rank == bs.rank and torch.equal(got.kept, bs.kept) and got.probe == bs.probe
        tol = 0 if values == "fp32" else (1e-3 if values == "fp16" else 2e-2)
        assert torch.allclose(got.values, bs.values, atol=tol, rtol=0)
        assert got.max_abs_error >= float((got.values - bs.values).abs().max())
    assert back.nnz == diff.nnz and sorted(back.tensors) == sorted(diff.tensors)


def test_checkpoint_round_trip_and_v1_refusal(basis_models, tmp_path):
    diff = basis_models["diff"]
    back = checkpoint.load(checkpoint.save(diff, tmp_path / "ck"))
    for name, bs in diff.bases.items():
        assert torch.equal(back.bases[name].values, bs.values) and back.bases[name].probe == bs.probe
    assert artifact.pack(back) == artifact.pack(diff)
    with pytest.raises(InvalidValueError, match="version 1 has no basis"):
        artifact.pack(diff, version=1)


def test_inspect_counts_the_scales_in_params(basis_models, tmp_path):
    from diffcli.report import inspect

    diff = basis_models["diff"]
    path = tmp_path / "b.diff"
    artifact.write(diff, path)
    scales = sum(bs.nkept for bs in diff.bases.values())
    for target in (path, checkpoint.save(diff, tmp_path / "ck")):
        report = inspect(target)
        assert report["totals"]["params"] == diff.nnz  # Diff.nnz counts the kept scales, as the header's nnz does
        assert report["totals"]["nnz"] == diff.nnz - scales  # inspect's nnz: the budget tensors' entries
        rows = [r for r in report["tensors"] if r["kind"] == "basis"]
        assert sorted(r["tensor"] for r in rows) == sorted(diff.bases)
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["totals"]["params"] == diff.nnz


def test_diff_nnz_is_the_packed_headers_nnz_with_basis_scales(basis_models, tmp_path):
    """Issue 10: Diff.nnz, the checkpoint's nnz, `pack`'s report and the header's nnz all count every stored
    update parameter (sparse entries and the kept basis scales alike), as docs/FORMAT.md defines the header's."""
    diff = basis_models["diff"]
    scales = sum(bs.nkept for bs in diff.bases.values())
    sparse = sum(td.nnz for td in diff.tensors.values())
    assert scales > 0 and sparse > 0 and diff.nnz == sparse + scales
    report = artifact.write(diff, tmp_path / "b.diff", values="fp32")
    header = artifact.read_header(tmp_path / "b.diff")
    assert header["nnz"] == report.nnz == diff.nnz == artifact.load(tmp_path / "b.diff").nnz
    assert report.density == diff.density == diff.nnz / diff.budget_numel
    ck = checkpoint.save(diff, tmp_path / "ck")
    assert json.loads((ck / checkpoint.META_FILE).read_text())["nnz"] == diff.nnz == checkpoint.load(ck).nnz


def test_header_with_basis_records_matches_the_schema(basis_models):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    schema = json.loads((Path(artifact.__file__).parent / "schema" / "header.schema.json").read_text())
    header = artifact.loads_header(artifact.pack(basis_models["diff"]))
    jsonschema.validate(header, schema)
    assert [r[0] for r in header["records"]].count("basis") == len(MATRICES)


# ------------------------------------------------------------------------------------------ readers

def test_apply_to_folder_rebuilds_base_plus_scales_plus_delta(basis_models, tmp_path):
    from safetensors.torch import load_file

    from diffcli.applying import apply_to_folder

    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path, values="fp32")
    report = apply_to_folder(basis_models["base"], path, tmp_path / "out")
    assert report.basis_probe_error is not None and report.basis_probe_error < 1e-9
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = _expected_state(basis_models["diff"], basis_models["base"])
    for name in MATRICES:
        target = next(t for t, td in basis_models["diff"].tensors.items() if td.base_name == name)
        assert torch.allclose(got[target].double(), want[target], atol=1e-5)


def test_apply_from_a_sharded_base_into_shards_through_small_chunks_is_the_same_model(basis_models, tmp_path,
                                                                                      monkeypatch):
    """The rebuilt basis tensors reach every shard and every 50-float chunk exactly as in one file at default chunks."""
    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path)
    got, want, report = apply_sharded_in_small_chunks(basis_models["base"], path, tmp_path, monkeypatch)
    assert report.shards > 2 and report.basis_probe_error is not None
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_apply_force_on_a_tampered_base_still_refuses_with_exit_5(basis_models, tmp_path):
    """--force overrides the digest check, never the probe: the recomputed basis would be another."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in basis_models["base"].iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tampered / "model.safetensors"))
    state[MATRICES[0]][0, 0] += 0.05
    save_file(state, str(tampered / "model.safetensors"), metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["apply", str(tampered), str(path), "-o", str(tmp_path / "out"), "--force"])
    assert result.exit_code == 5, result.output
    assert "probe" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, ["verify", str(path), "--base", str(tampered)])
    assert result.exit_code == 5


def test_verify_with_base_checks_the_probes(basis_models, tmp_path):
    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path)
    report = artifact.verify(path, base=str(basis_models["base"]))
    assert any("basis probes of 3 matrices" in c for c in report.checks)
    with pytest.raises(BaseMismatchError):
        artifact.verify(path, base=str(basis_models["other"]))


def test_in_memory_apply_and_revert_are_exact(basis_models):
    from transformers import AutoModelForSequenceClassification

    from diffcli.applying import apply_, revert_

    model = AutoModelForSequenceClassification.from_pretrained(basis_models["base"], num_labels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diff = artifact.loads(artifact.pack(basis_models["diff"], "fp32"))
    handle = apply_(model, diff)
    want = _expected_state(diff, basis_models["base"])
    state = model.state_dict()
    for target, w in want.items():
        key = handle.names[target]
        assert torch.allclose(state[key].double(), w, atol=1e-5), key
    revert_(model, handle)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bank_switches_and_restores_the_base_bit_for_bit(basis_models, tmp_path):
    from diffcli.bank import DiffBank

    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path, values="fp32")
    bank = DiffBank(basis_models["base"], device="cpu")
    base_state = {k: v.clone() for k, v in bank.encoder.state_dict().items()}
    bank.add("t", path)
    with bank.use("t") as model:
        enc = model.base_model.state_dict()
        want = _expected_state(basis_models["diff"], basis_models["base"])
        key = MATRICES[1]
        target = next(t for t, td in basis_models["diff"].tensors.items() if td.base_name == key)
        assert torch.allclose(enc[key].double(), want[target], atol=1e-5)
    plain = tmp_path / "plain.diff"  # the same sparse δ without the scales: switching goes through both paths
    no_bases = copy.copy(basis_models["diff"])
    no_bases.bases = {}
    artifact.write(no_bases, plain, values="fp32")
    bank.add("plain", plain)
    for name in ("plain", "t", "plain", "t"):
        with bank.use(name) as model:
            got = model.base_model.state_dict()[key].double()
        scaled = torch.allclose(got, want[target], atol=1e-5)
        assert scaled == (name == "t")
    assert bank.task_nbytes("t") < 2 * 4 * sum(basis_models["diff"].tensors[n].numel for n in basis_models["diff"].bases) + 10**5
    assert bank.basis_probe_error("t") < 1e-9 and bank.basis_probe_error("plain") is None  # kept from `add`
    bank.reset()
    assert all(torch.equal(base_state[k], v) for k, v in bank.encoder.state_dict().items())
    with pytest.raises(BaseMismatchError):
        DiffBank(basis_models["other"], device="cpu").add("t", path)


def test_eval_reports_the_basis_probe_error_only_for_basis_diffs(basis_models, tmp_path):
    """`eval` (through DiffBank) reports the rebuild's largest relative probe error, as `apply` does."""
    data = tmp_path / "dev.csv"
    data.write_text("sentence,label\nthe movie is good,1\nthe movie is bad,0\na cat,0\nyes the dog,1\n")
    plain = copy.copy(basis_models["diff"])
    plain.bases = {}
    for diff, scaled in ((basis_models["diff"], True), (plain, False)):
        path = tmp_path / f"{scaled}.diff"
        artifact.write(diff, path, values="fp32")
        args = ["eval", str(basis_models["base"]), str(path), "--task", "sst2", "--validation-file", str(data)]
        result = CliRunner().invoke(app, [*args, "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        if scaled:
            assert 0 <= report["basis_probe_error"] < 1e-9
        else:
            assert "basis_probe_error" not in report
        human = CliRunner().invoke(app, args)
        assert human.exit_code == 0 and ("largest relative probe error" in human.stdout) == scaled, human.output


def test_merge_refuses_basis_records_without_a_base_with_one_line(basis_models, tmp_path):
    a, b = tmp_path / "a.diff", tmp_path / "b.diff"
    artifact.write(basis_models["diff"], a)
    artifact.write(basis_models["diff"], b)
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "m.diff")])
    assert result.exit_code == 2
    assert "basis scales" in result.stderr and "pass --base BASE" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m.diff").exists()


def test_prune_projects_the_sparse_delta_and_keeps_the_basis_scales(basis_models, tmp_path):
    """A double-pruned checkpoint: δ is projected to k = round(S·N) exactly as without scales; every scale survives."""
    from diffcli.projection import project

    ckpt, out = tmp_path / "ckpt", tmp_path / "pruned"
    checkpoint.save(basis_models["diff"], ckpt)
    result = CliRunner().invoke(app, ["prune", str(ckpt), "-s", "1%", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    source = checkpoint.load(ckpt)
    kept = sum(bs.nkept for bs in source.bases.values())
    assert report["basis_scales"] == {"matrices": len(MATRICES), "kept": kept,
                                      "rank": sum(bs.rank for bs in source.bases.values())}
    pruned = checkpoint.load(out)
    assert sorted(pruned.bases) == sorted(source.bases)
    for name, bs in source.bases.items():
        got = pruned.bases[name]
        assert got.rank == bs.rank and torch.equal(got.kept, bs.kept) and torch.equal(got.values, bs.values)
        assert got.probe == bs.probe
    plain = copy.copy(source)
    plain.bases = {}
    want = project(plain, 0.01).diff
    assert report["kept"] == sum(t.nnz for t in want.tensors.values()) < sum(t.nnz for t in source.tensors.values())
    for name, td in want.tensors.items():
        assert torch.equal(pruned.tensors[name].dense(), td.dense()), name
    assert pruned.nnz == report["kept"] + kept
    human = CliRunner().invoke(app, ["prune", str(ckpt), "-s", "1%", "-o", str(tmp_path / "again")])
    assert human.exit_code == 0 and f"basis scales kept unchanged (outside k): {kept:,}" in human.stdout
    # the pruned checkpoint packs, verifies and rebuilds on its base, probe-checked
    packed = tmp_path / "pruned.diff"
    assert CliRunner().invoke(app, ["pack", str(out), "-o", str(packed), "--values", "fp32"]).exit_code == 0
    assert CliRunner().invoke(app, ["verify", str(packed)]).exit_code == 0
    merged = tmp_path / "merged"
    applied = CliRunner().invoke(app, ["apply", str(basis_models["base"]), str(packed), "-o", str(merged)])
    assert applied.exit_code == 0, applied.output
    from safetensors.torch import load_file

    got, want = load_file(str(merged / "model.safetensors")), _expected_state(pruned, basis_models["base"])
    for target in pruned.bases:
        assert torch.allclose(got[target].double(), want[target], atol=1e-5), target


@pytest.fixture(scope="module")
def second(basis_models):
    """Another basis diff on the same base: another finetune, other scales and pruned bases."""
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    ft = make_finetune(basis_models["base"], basis_models["root"] / "ft2", seed=2)
    return with_bases(project(extract_diff(str(basis_models["base"]), str(ft)), 0.02).diff, basis_models["base"], seed=1)


def _resolved_dense(diff, base_dir) -> dict[str, torch.Tensor]:
    """base tensor name → δ (float64) of `diff` with its basis records resolved on `base_dir` by svd_basis."""
    from diffcli.weights import WeightStore

    store = WeightStore(base_dir)
    resolved, _ = svd_basis.resolve_diff(diff, lambda name: store[name])
    store.release()
    return {td.base_name: td.dense().double() for td in resolved.tensors.values()}


def test_merge_with_the_base_is_the_weighted_sum_of_the_resolved_deltas(basis_models, second):
    """Library: each basis record becomes its resolved dense δ on the base, summed exactly. Tolerance 1e-6 (plus
    1e-5 relative): the inputs are float32 resolutions summed in float64 and cast once, so only rounding differs."""
    from diffcli.merging import merge

    from test_lowrank import with_lowrank

    plain = copy.copy(basis_models["diff"])  # the same sparse δ without scales: a basis record merged with a sparse one
    plain.bases = {}
    query = next(t for t, td in plain.tensors.items() if td.base_name == MATRICES[0])
    lowrank = with_lowrank(plain, query, 3, seed=4)  # a low-rank δ where the first input has basis scales
    weights = [0.5, -1.5]
    for inputs in ((basis_models["diff"], second), (second, plain), (basis_models["diff"], lowrank)):
        result = merge(list(inputs), weights, base=basis_models["base"], names=["a", "b"])
        assert not result.diff.bases  # every basis record is folded into a sparse record
        scaled = sum(len(d.bases) for d in inputs)
        assert len(result.report["resolved"]) == scaled
        assert result.report["basis_probe_error"] < 1e-9
        want = {}
        for w, d in zip(weights, inputs):
            for name, delta in _resolved_dense(d, basis_models["base"]).items():
                want[name] = want.get(name, 0) + w * delta
        got = {td.base_name: td.dense().double() for td in result.diff.tensors.values()}
        assert sorted(got) == sorted(want)
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), name
    # and the resolved δ is the definition, U·diag(σ⊙c)·Vᵀ + δ in float64 (FORMAT.md §11), to float32 rounding
    from diffcli.weights import WeightStore

    store = WeightStore(basis_models["base"])
    defined = _expected_state(second, basis_models["base"])
    resolved = _resolved_dense(second, basis_models["base"])
    for target, td in second.tensors.items():
        assert torch.allclose(resolved[td.base_name], defined[target] - store[td.base_name].double(), atol=1e-6)
    store.release()


def test_cli_merge_with_base_writes_a_sparse_diff_that_verifies_and_reports_the_probe_error(basis_models, second, tmp_path):
    from diffcli.merging import merge

    a, b, out = tmp_path / "a.diff", tmp_path / "b.diff", tmp_path / "m.diff"
    artifact.write(basis_models["diff"], a, values="fp32")
    artifact.write(second, b, values="fp32")
    result = CliRunner().invoke(app, ["merge", str(a), str(b), "--base", str(basis_models["base"]), "-o", str(out),
                                      "--values", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["resolved"]) == 2 * len(MATRICES) and report["basis_probe_error"] < 1e-9
    merged = artifact.load(out)
    assert not merged.bases and merged.meta["merge"]["base"] == str(basis_models["base"])
    assert CliRunner().invoke(app, ["verify", str(out), "--base", str(basis_models["base"])]).exit_code == 0
    lib = merge([artifact.load(a), artifact.load(b)], base=basis_models["base"]).diff
    for target, td in lib.tensors.items():
        assert torch.equal(merged.tensors[target].dense(), td.dense()), target
    human = CliRunner().invoke(app, ["merge", str(a), str(b), "-b", str(basis_models["base"]), "-o",
                                     str(tmp_path / "h.diff")])
    assert human.exit_code == 0, human.output
    assert "basis scales resolved on the base" in human.stdout and "probe error" in human.stdout


def test_merge_refuses_a_probe_or_a_base_that_misses_with_exit_5_and_writes_nothing(basis_models, second, tmp_path):
    """The probe check of apply: a probe made on another base (digests of the right one) is refused, exit 5; so is a
    --base other than the one the diffs were made on (its digests differ) and a missing one (exit 3)."""
    lying = probes_of_another_base(basis_models)
    a, b, good, out = tmp_path / "lying.diff", tmp_path / "b.diff", tmp_path / "a.diff", tmp_path / "m.diff"
    artifact.write(lying, a)
    artifact.write(second, b)
    artifact.write(basis_models["diff"], good)
    cases = [([str(a), str(b), "--base", str(basis_models["base"])], 5, "probe"),
             ([str(good), str(b), "--base", str(basis_models["other"])], 5, "another base"),
             ([str(good), str(b), "--base", str(tmp_path / "nowhere")], 3, "nowhere")]
    for args, code, needle in cases:
        result = CliRunner().invoke(app, ["merge", *args, "-o", str(out)])
        assert result.exit_code == code, result.output
        assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".m.diff*"))
