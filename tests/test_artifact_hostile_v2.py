"""Hostile inputs to the version-2 reader: lying records, streams and scales end in a typed error, and the fuzzer
finds no file that loads into a Diff breaking what its header declares."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import zstandard

from diffcli import artifact
from diffcli.errors import ChecksumError, FormatError
from diff_bytes import (INTERESTING, STREAMS, build2, check_consistent2, numeric_paths, raw2, replace_raw,
                        replace_stream, split2, with_golden_bases)
from test_artifact import golden_diff

V2 = artifact.pack(golden_diff(), "int4")  # a block quantizer: the scales stream is in use


def test_v2_helpers_rebuild_a_valid_file():
    header, payload = split2(V2)
    assert header["values"]["quantizer"] == "int4" and header["streams"]["scales"]["raw_length"] > 0
    check_consistent2(artifact.loads(build2(header, payload)), header)


def test_v2_truncated_at_every_length_and_bit_flips():
    for n in range(len(V2)):
        with pytest.raises(FormatError):
            artifact.loads(V2[:n])
    for i in range(len(V2)):
        data = bytearray(V2)
        data[i] ^= 0x04
        with pytest.raises(FormatError) as exc:
            artifact.loads(bytes(data))
        if i >= 20:  # header frame, header digest, payload: checksums notice first
            assert isinstance(exc.value, ChecksumError), (i, exc.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["values"].update(quantizer="int3"), "unknown value quantizer 'int3'"),
    (lambda h: h.update(values={"quantizer": None}), "unknown value quantizer"),
    (lambda h: h["values"].update(block=0), "block"),
    (lambda h: h["values"].update(block=True), "block"),
    (lambda h: h["values"].update(block=7), "larger than the 6"),  # int4 dropped the 3 entries coded 0
    (lambda h: h["values"].update(block=1), "scales.raw_length .* imply"),  # 6 scales, 3 stored
    (lambda h: h["values"].pop("block"), "lacks"),
    (lambda h: h["values"].update(max_rel_error=float("1e300") * 0 - 1), "max_rel_error"),
    (lambda h: h["records"][0].__setitem__(0, "hologram"), "record kind 'hologram'"),  # a kind from the future
    (lambda h: h["records"][0].__setitem__(0, 7), "starting with its kind"),
    (lambda h: h["records"].reverse(), "sorted"),
    (lambda h: h["records"].append(h["records"][-1]), "sorted"),
    (lambda h: h["records"][2].append(0), "fields"),
    (lambda h: h["streams"]["values"].update(raw_length=h["streams"]["values"]["raw_length"] + 1), "imply"),
    (lambda h: h["streams"]["dense"].update(codec="lz4"), "codec"),
    (lambda h: h["streams"].pop("scales"), "lacks"),
    (lambda h: h.update(nnz=h["nnz"] + 1), "sum"),
    (lambda h: h.update(budget_numel=3), "budget_numel"),
    (lambda h: h.update(version=1), "version"),
])
def test_v2_lying_headers_are_rejected(mutate, message):
    header, payload = split2(V2)
    mutate(header)
    with pytest.raises(FormatError, match=message):
        artifact.loads(build2(header, payload))


def test_v2_header_raw_length_lies():
    header, payload = split2(V2)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    for lie in (len(text) - 1, len(text) + 1, 16 << 20, 2**32 - 1):
        with pytest.raises(FormatError):
            artifact.loads(build2(header, payload, raw_length=lie))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_v2_non_finite_zero_or_negative_scales_are_refused(scale):
    header, payload = split2(V2)
    raw = bytearray(raw2(header, payload, "scales"))
    planes = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(4, -1)  # byte planes, most significant first
    le = np.ascontiguousarray(planes[::-1].T).view("<f4").copy()
    le[0, 0] = scale
    stored = np.ascontiguousarray(le.view(np.uint8).reshape(-1, 4)[:, ::-1].T).tobytes()
    with pytest.raises(FormatError, match="scale"):
        artifact.loads(replace_raw(header, payload, "scales", stored))


def test_v2_scale_count_that_lies_is_refused():
    header, payload = split2(V2)
    raw = raw2(header, payload, "scales")
    with pytest.raises(FormatError, match="scales.raw_length"):
        artifact.loads(replace_raw(header, payload, "scales", raw[:-4]))
    with pytest.raises(FormatError, match="scales.raw_length"):
        artifact.loads(replace_raw(header, payload, "scales", raw + raw[:4]))


def test_v2_codes_outside_the_quantizer_and_padding_are_refused():
    header, payload = split2(V2)  # int4: 6 values in 3 bytes, nibble = q + 8, 0 is not a code
    raw = bytearray(raw2(header, payload, "values"))
    bad = bytearray(raw)
    bad[0] &= 0x0F
    with pytest.raises(FormatError, match="outside the int4 range"):
        artifact.loads(replace_raw(header, payload, "values", bytes(bad)))
    header, payload = split2(artifact.pack(golden_diff(), "ternary"))  # 3 values: 2 padding bits
    bad = bytearray(raw2(header, payload, "values"))
    bad[-1] |= 0x01
    with pytest.raises(FormatError, match="padding"):
        artifact.loads(replace_raw(header, payload, "values", bytes(bad)))
    header, payload = split2(artifact.pack(golden_diff(), "int8"))
    raw = bytearray(raw2(header, payload, "values"))
    raw[0] = 0x80
    with pytest.raises(FormatError, match="-128"):
        artifact.loads(replace_raw(header, payload, "values", bytes(raw)))
    header, payload = split2(artifact.pack(golden_diff(), "ternary"))
    raw = bytearray(raw2(header, payload, "values"))
    raw[0] |= 0xC0
    with pytest.raises(FormatError, match="outside the ternary range"):
        artifact.loads(replace_raw(header, payload, "values", bytes(raw)))


def test_v2_positions_that_lie_are_refused():
    header, payload = split2(V2)
    rec = next(r for r in header["records"] if r[1] == "bert.encoder.w")
    rec[7] += 1
    with pytest.raises(FormatError, match="positions.raw_length"):
        artifact.loads(build2(header, payload))
    header, payload = split2(V2)
    rec = next(r for r in header["records"] if r[1] == "bert.encoder.w")
    rec[4] = [4, 7]  # its last position is 31
    header["budget_numel"] -= 4
    with pytest.raises(FormatError, match="outside"):
        artifact.loads(build2(header, payload))


def test_v2_bad_input_is_one_line_exit_4_and_nothing_written(tmp_path):
    from typer.testing import CliRunner

    from diffcli.cli.app import app

    header, payload = split2(V2)
    header["values"]["quantizer"] = "int3"
    bad = tmp_path / "bad.diff"
    bad.write_bytes(build2(header, payload))
    runner = CliRunner()
    for args in (["verify", str(bad)], ["inspect", str(bad)], ["pack", str(bad), "-o", str(tmp_path / "out.diff")]):
        res = runner.invoke(app, args)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.exit_code == 4 and len(lines) == 1 and "int3" in lines[0], (args, res.stderr)
        assert res.stdout == "" and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.diff"]


def _mutate_v2(rng: random.Random, valid: bytes) -> bytes:
    kind = rng.randrange(4)
    header, payload = split2(valid)
    if kind == 0:  # raw damage
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            op, i = rng.randrange(3), rng.randrange(len(data))
            if op == 0:
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[i:i] = bytes([rng.randrange(256)])
            else:
                del data[i:i + rng.randint(1, 16)]
        return bytes(data)
    if kind == 1:  # a lying header field (records included) behind a correct header digest
        path = rng.choice(list(numeric_paths(header)))
        node = header
        for p in path[:-1]:
            node = node[p]
        old = node[path[-1]] if path else None
        if path:
            node[path[-1]] = rng.choice(INTERESTING + ([old + rng.choice([-1, 1])] if type(old) is int else []))
        return build2(header, payload)
    name = rng.choice([s for s in STREAMS if header["streams"][s]["raw_length"]])
    raw = bytearray(raw2(header, payload, name))
    if kind == 2:  # damaged stream bytes with a matching checksum: the decoders must cope
        for _ in range(rng.randint(1, 3)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return replace_raw(header, payload, name, bytes(raw))
    if rng.random() < 0.5:  # a re-encoded stream, longer or shorter, declared lengths adjusted or not
        raw += bytes(rng.randint(1, 3))
    else:
        del raw[-rng.randint(1, min(3, len(raw))):]
    codec = rng.choice(["raw", "zstd"])
    new = bytes(raw) if codec == "raw" else zstandard.ZstdCompressor(level=1).compress(bytes(raw))
    raw_length = len(raw) if rng.random() < 0.7 else header["streams"][name]["raw_length"]
    return replace_stream(header, payload, name, new, codec=codec, raw_length=raw_length)


def test_v2_fuzz_mutations_give_typed_errors_or_consistent_diffs():
    rng = random.Random(20261202)
    outcomes = {"error": 0, "loaded": 0}
    from test_lowrank import golden_lowrank

    valids = [artifact.pack(golden_diff(), v) for v in ("fp16", "int8", "int4", "ternary")]
    valids += [artifact.pack(golden_lowrank(), v) for v in ("fp32", "int8")]  # with a low-rank record
    valids += [artifact.pack(with_golden_bases(golden_diff()), v) for v in ("fp16", "int8")]  # basis records too
    for i in range(600):
        data = _mutate_v2(rng, valids[i % len(valids)])
        try:
            diff = artifact.loads(data)
        except FormatError:
            outcomes["error"] += 1
            continue
        check_consistent2(diff, split2(data)[0])
        outcomes["loaded"] += 1
    assert outcomes["error"] > 300 and sum(outcomes.values()) == 600


@pytest.mark.parametrize("values", ["fp32", "int8"])
def test_v2_nnz_counts_every_stored_value_of_every_record_kind(values):
    """One convention for the header's nnz: sparse entries + r·(out + in) per low-rank record + kept basis scales."""
    from test_lowrank import golden_lowrank

    diff = with_golden_bases(golden_lowrank())
    data = artifact.pack(diff, values)
    header, payload = split2(data)
    by_kind: dict[str, int] = {}
    for r in header["records"]:
        n = {"sparse": lambda: r[6], "lowrank": lambda: r[6] * (r[4][0] + r[4][1]), "basis": lambda: r[3],
             "dense": lambda: 0}[r[0]]()
        by_kind[r[0]] = by_kind.get(r[0], 0) + n
    assert by_kind["lowrank"] == 2 * (6 + 5) and by_kind["basis"] == 3  # a basis scale coded 0 is kept
    assert header["nnz"] == by_kind["sparse"] + by_kind["lowrank"] + by_kind["basis"]
    back = artifact.loads(data)
    check_consistent2(back, header)
    assert back.tensors["bert.encoder.lr"].is_lowrank and torch.equal(back.bases["bert.encoder.w"].kept,
                                                                       torch.tensor([0, 2, 3]))
    lying = dict(header, nnz=header["nnz"] - by_kind["basis"])  # basis's old convention: sparse entries only
    with pytest.raises(FormatError, match="nnz"):
        artifact.loads(build2(lying, payload))


def test_v2_a_tensor_with_both_a_low_rank_delta_and_basis_scales_is_refused_before_writing():
    from diffcli.diff import BasisScales
    from diffcli.errors import InvalidValueError
    from test_lowrank import golden_lowrank

    diff = golden_lowrank()
    diff.bases["bert.encoder.lr"] = BasisScales(5, torch.tensor([0, 1]), torch.tensor([0.5, -0.5]), [0.0] * 4)
    with pytest.raises(InvalidValueError, match="both a low-rank"):
        artifact.pack(diff)
