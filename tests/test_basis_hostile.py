"""Hostile basis records: lying ranks, counts, probes and value errors end in one line, exit 4 or 5, nothing
written; mutated files give typed errors."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
import torch
import zstandard
from typer.testing import CliRunner

from conftest import probes_of_another_base
from diff_bytes import build2, split2
from diffcli import artifact, svd_basis
from diffcli.cli.app import app
from diffcli.diff import BasisScales
from diffcli.errors import FormatError, InvalidValueError


def _basis_index(header: dict) -> int:
    return next(i for i, r in enumerate(header["records"]) if r[0] == "basis")


def _set(field: int, value):
    def mutate(h):
        h["records"][_basis_index(h)][field] = value
    return mutate


def _move_basis(h):
    i = _basis_index(h)
    h["records"].insert(0, h["records"].pop(i))


def _integer_tensor(h):
    i = _basis_index(h)
    h["records"][i - 1][3] = "int64"


@pytest.mark.parametrize("mutate, message", [
    (_set(2, 7), "not min\\(out, in\\)"),
    (_set(2, 10**6), "not min\\(out, in\\)"),
    (_set(3, 10**6), "exceeds its"),
    (_set(5, [0.0, 1.0]), "probe must be 4 finite numbers"),
    (_set(5, ["x", 1.0, 2.0, 3.0]), "probe must be 4 finite numbers"),
    (_set(5, [1e308, 1e308, 1e308, True]), "probe must be 4 finite numbers"),
    (_move_basis, "must follow the sparse record"),
    (_integer_tensor, "needs a 2-D float tensor"),
    (lambda h: h["records"][_basis_index(h)].append(0), "must have 6 fields"),
])
def test_lying_basis_records_are_refused(basis_models, tmp_path, mutate, message):
    header, payload = split2(artifact.pack(basis_models["diff"]))
    mutate(header)
    with pytest.raises(FormatError, match=message):
        artifact.loads(build2(header, payload))
    path = tmp_path / "x.diff"
    path.write_bytes(build2(header, payload))
    result = CliRunner().invoke(app, ["apply", str(basis_models["base"]), str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_scale_values_that_are_not_finite_are_refused_at_pack_and_at_read(basis_models, tmp_path):
    diff = basis_models["diff"]
    name = sorted(diff.bases)[0]
    bs = diff.bases[name]
    bad = BasisScales(bs.rank, bs.kept, bs.values.clone(), bs.probe)
    bad.values[0] = float("nan")
    saved = diff.bases[name]
    diff.bases[name] = bad
    try:
        with pytest.raises(InvalidValueError, match="NaN"):
            artifact.pack(diff)
    finally:
        diff.bases[name] = saved
    header, payload = split2(artifact.pack(diff, "fp32"))
    # an fp32 NaN planted in the values stream (with its checksum fixed) is refused when read
    streams = ["positions", "values", "scales", "dense"]
    blobs, off = {}, 0
    for s in streams:
        blobs[s] = payload[off:off + header["streams"][s]["length"]]
        off += header["streams"][s]["length"]
    raw = bytearray(zstandard.ZstdDecompressor().decompress(blobs["values"]) if header["streams"]["values"]["codec"]
                    == "zstd" else blobs["values"])
    n = len(raw) // 4
    planes = np.frombuffer(bytes(raw), np.uint8).reshape(4, n).copy()
    nan = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    planes[:, n - 1] = nan[::-1]  # the last stored value
    blobs["values"] = planes.tobytes()
    header["streams"]["values"].update(codec="raw", length=len(blobs["values"]),
                                       sha256=hashlib.sha256(blobs["values"]).hexdigest())
    planted = build2(header, b"".join(blobs[s] for s in streams))
    with pytest.raises(FormatError, match="NaN"):
        artifact.loads(planted)
    # through the CLI: one line, exit 4, nothing written
    bad = tmp_path / "nan.diff"
    bad.write_bytes(planted)
    for args in (["verify", str(bad)], ["apply", str(basis_models["base"]), str(bad), "-o", str(tmp_path / "merged")],
                 ["pack", str(bad), "-o", str(tmp_path / "again.diff")]):
        res = CliRunner().invoke(app, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 4 and len(lines) == 1 and "NaN" in lines[0], (args, res.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.diff"]


def test_fuzz_mutated_basis_files_give_typed_errors_or_consistent_diffs(basis_models):
    """Random lies in the header and damage to the bytes: a typed error, or a diff whose records obey the rules."""
    from diffcli.errors import DiffpruneError

    valid = artifact.pack(basis_models["diff"])
    header0, payload = split2(valid)
    rng = random.Random(20261202)
    outcomes = {"error": 0, "loaded": 0}
    for _ in range(300):
        if rng.random() < 0.5:
            data = bytearray(valid)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(data)
        else:
            header = json.loads(json.dumps(header0))
            rec = header["records"][rng.choice([i for i, r in enumerate(header["records"]) if r[0] == "basis"])]
            field = rng.randrange(1, 6)
            rec[field] = rng.choice([0, 1, -1, 7, 31, 32, 2**62, None, "x", [], 1.5, True,
                                     [0.0] * 4, [float(rng.random())] * 4])
            data = build2(header, payload)
        try:
            diff = artifact.loads(data)
        except DiffpruneError:
            outcomes["error"] += 1
            continue
        for name, bs in diff.bases.items():
            td = diff.tensors[name]
            svd_basis.check_scales(name, td.shape, td.dtype, bs)
        outcomes["loaded"] += 1
    assert outcomes["error"] > 150 and sum(outcomes.values()) == 300


@pytest.mark.parametrize("values", ["int4", "ternary"])
def test_a_scale_quantized_to_zero_stays_a_kept_basis(basis_models, values):
    """Sparse entries coded 0 are dropped; a basis scale coded 0 must stay (a = 1), never become pruned (a = 0)."""
    diff = basis_models["diff"]
    name = sorted(diff.bases)[0]
    saved = diff.bases[name]
    vals = saved.values.clone()
    vals[: vals.numel() // 2] = 0.0  # a = 1 exactly: an unchanged basis
    diff.bases[name] = BasisScales(saved.rank, saved.kept, vals, saved.probe)
    try:
        back = artifact.loads(artifact.pack(diff, values))
    finally:
        diff.bases[name] = saved
    got = back.bases[name]
    assert torch.equal(got.kept, saved.kept)
    assert not bool(got.values[: vals.numel() // 2].any())


def test_inspect_plot_draws_a_file_with_basis_records(basis_models, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.diff"
    artifact.write(basis_models["diff"], path)
    result = CliRunner().invoke(app, ["inspect", str(path), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_a_probe_made_on_another_base_is_refused_with_exit_5(basis_models, tmp_path):
    """Digests of the right base, probe of another: the rebuild check alone catches it; nothing is written."""
    diff = probes_of_another_base(basis_models)
    path = tmp_path / "b.diff"
    artifact.write(diff, path)
    for args in (["apply", str(basis_models["base"]), str(path), "-o", str(tmp_path / "out")],
                 ["verify", str(path), "--base", str(basis_models["base"])]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 5 and "probe" in result.stderr, result.output
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the recorded value error

def _with_eps(data: bytes, eps) -> bytes:
    header, payload = split2(data)
    header["values"]["max_abs_error"] = eps
    return build2(header, payload)


def test_a_lying_value_error_cannot_switch_the_probe_check_off(basis_models, tmp_path):
    """max_abs_error 1e300 widened the probe tolerance to anything: apply --force rebuilt another base (exit 0)."""
    path = tmp_path / "eps.diff"
    path.write_bytes(_with_eps(artifact.pack(basis_models["diff"], "fp16"), 1e300))
    with pytest.raises(FormatError, match="max_abs_error"):
        artifact.load(path)
    for args in (["apply", str(basis_models["other"]), str(path), "-o", str(tmp_path / "out"), "--force"],
                 ["verify", str(path)], ["verify", str(path), "--base", str(basis_models["base"])]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 4 and "max_abs_error" in result.stderr, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("values", ["fp16", "bf16", "int8", "int4", "ternary"])
def test_the_value_error_is_refused_just_above_its_bound_and_kept_at_it(basis_models, values):
    from diffcli import quantize

    data = artifact.pack(basis_models["diff"], values)
    header = artifact.loads_header(data)
    back = artifact.loads(data)
    stored = np.concatenate([v.numpy().reshape(-1) for v in _stored_values(back)])
    counts = np.asarray([v.numel() for v in _stored_values(back)], dtype=np.int64)
    scales = _scales_of(data)
    limit = quantize.error_limit(stored, scales, counts, values, header["values"].get("block", 0))
    assert 0 < header["values"]["max_abs_error"] <= limit
    artifact.loads(_with_eps(data, limit))
    with pytest.raises(FormatError, match="max_abs_error"):
        artifact.loads(_with_eps(data, limit * (1 + 2**-20) + 2**-90))


def _stored_values(diff) -> list[torch.Tensor]:
    """The values stream's segments in record order: sparse values, then a tensor's basis scales."""
    out = []
    for name in sorted(diff.tensors):
        td = diff.tensors[name]
        if td.nnz and not td.is_dense:
            out.append(td.values.reshape(-1))
        if name in diff.bases and diff.bases[name].nkept:
            out.append(diff.bases[name].values.reshape(-1))
    return out


def _scales_of(data: bytes) -> np.ndarray:
    header, payload = split2(data)
    lengths = [header["streams"][s]["length"] for s in ("positions", "values", "scales")]
    stored = payload[lengths[0] + lengths[1]:sum(lengths)]
    if header["streams"]["scales"]["codec"] == "zstd":
        stored = zstandard.ZstdDecompressor().decompress(stored)
    planes = np.frombuffer(stored, dtype=np.uint8).reshape(4, -1)  # byte planes, most significant first
    return np.ascontiguousarray(planes[::-1].T).view("<f4").reshape(-1).astype(np.float32)
