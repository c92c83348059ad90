"""Hostile inputs: every malformed, truncated, lying or mutated file ends in a typed error, fast and small."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from diffcli import artifact
from diffcli.errors import ChecksumError, FormatError, NotFoundError, UnsupportedVersionError
from test_artifact import golden_diff

VALID = artifact.pack(golden_diff(), version=1)  # the version-1 reader; version 2: the v2 section below


def split(data: bytes) -> tuple[dict, bytes]:
    hlen = int.from_bytes(data[12:16], "little")
    return json.loads(data[16:16 + hlen]), data[48 + hlen:]


def build(header: dict, payload: bytes, version: int = 1, flags: int = 0, text: bytes | None = None) -> bytes:
    """A file whose header digest is right, whatever the header says: exercises the checks behind it."""
    if text is None:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    pre = b"DIFFPRUN" + struct.pack("<HHI", version, flags, len(text))
    return pre + text + hashlib.sha256(pre + text).digest() + payload


def sections(header: dict) -> list[dict]:
    out = [header["extras"][n]["data"] for n in sorted(header["extras"])]
    for n in sorted(header["tensors"]):
        t = header["tensors"][n]
        out += [s for s in (t["index"], t["values"]) if isinstance(s, dict)]
    return out


def replace_section(header: dict, payload: bytes, target: dict, stored: bytes, **fields) -> bytes:
    """Swap one section's stored bytes (fixing its checksum and every later offset) and rebuild."""
    secs = sections(header)
    blobs = [payload[s["offset"]:s["offset"] + s["length"]] for s in secs]
    i = next(j for j, s in enumerate(secs) if s is target)
    blobs[i] = stored
    target.update(length=len(stored), sha256=hashlib.sha256(stored).hexdigest(), **fields)
    offset = 0
    for s, b in zip(secs, blobs):
        s["offset"] = offset
        offset += len(b)
    return build(header, b"".join(blobs))


def check_consistent(diff, header: dict) -> None:
    """A file that loads must give a Diff that honours everything its header declares."""
    assert set(diff.tensors) == set(header["tensors"]) and set(diff.extras) == set(header["extras"])
    for name, td in diff.tensors.items():
        t = header["tensors"][name]
        assert list(td.shape) == t["shape"] and td.nnz == t["nnz"]
        if td.nnz:
            idx = td.indices
            assert idx.dtype == torch.int64 and int(idx[0]) >= 0 and int(idx[-1]) < td.numel
            assert bool((idx[1:] > idx[:-1]).all()) and bool(torch.isfinite(td.values).all())
    for name, t in diff.extras.items():
        assert list(t.shape) == header["extras"][name]["shape"]


def load_bytes(data: bytes, tmp_path, name: str = "x.diff"):
    path = tmp_path / name
    path.write_bytes(data)
    return artifact.load(path)


def test_the_helpers_rebuild_a_valid_file():
    header, payload = split(VALID)
    assert build(header, payload) == VALID
    check_consistent(artifact.loads(VALID), header)


def test_empty_file_directory_and_missing(tmp_path):
    with pytest.raises(FormatError, match="too short"):
        load_bytes(b"", tmp_path)
    with pytest.raises(FormatError, match="folder"):
        artifact.load(tmp_path)
    with pytest.raises(FormatError, match="folder"):
        artifact.read_header(tmp_path)
    with pytest.raises(NotFoundError):
        artifact.load(tmp_path / "nope.diff")


def test_truncated_at_every_length(tmp_path):
    path = tmp_path / "t.diff"
    for n in range(len(VALID)):
        with pytest.raises(FormatError):
            artifact.loads(VALID[:n])
        if n < 16 + len(split(VALID)[0]) or n % 97 == 0:  # read_header: all of the front, some of the payload
            path.write_bytes(VALID[:n])
            with pytest.raises(FormatError):
                artifact.verify(path) if n % 2 else artifact.read_header(path) if n < 48 else artifact.load(path)


def test_truncated_payload_names_the_problem():
    with pytest.raises(FormatError, match="past the end|truncated"):
        artifact.loads(VALID[:-1])
    with pytest.raises(FormatError, match="unexpected bytes"):
        artifact.loads(VALID + b"\0")


def test_bit_flips_everywhere_are_caught():
    for i in range(len(VALID)):
        for bit in (0, 7):
            data = bytearray(VALID)
            data[i] ^= 1 << bit
            with pytest.raises(FormatError) as exc:
                artifact.loads(bytes(data))
            if i >= 16:  # header text, header digest and payload bytes: checksums notice first
                assert isinstance(exc.value, ChecksumError), (i, bit, exc.value)
            elif 8 <= i < 10:
                assert isinstance(exc.value, UnsupportedVersionError)


def test_wrong_magic_future_version_and_flags():
    header, payload = split(VALID)
    with pytest.raises(FormatError, match="magic"):
        artifact.loads(b"DIFFPRUX" + VALID[8:])
    with pytest.raises(FormatError, match="magic"):
        artifact.loads(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(UnsupportedVersionError, match="version 3"):
        artifact.loads(build(header, payload, version=3))
    with pytest.raises(UnsupportedVersionError):
        artifact.loads(build(header, payload, version=0))
    with pytest.raises(FormatError, match="flags"):
        artifact.loads(build(header, payload, flags=1))
    header["version"] = 2
    with pytest.raises(FormatError, match="version"):
        artifact.loads(build(header, payload))


def test_lying_header_length():
    hlen = int.from_bytes(VALID[12:16], "little")
    for lie in (hlen + 1, hlen - 1, len(VALID), 16 << 20, (16 << 20) + 1, 2**32 - 1):
        data = VALID[:12] + struct.pack("<I", lie) + VALID[16:]
        with pytest.raises(FormatError):
            artifact.loads(data)
    with pytest.raises(FormatError, match="limit"):
        artifact.loads(VALID[:12] + struct.pack("<I", 2**32 - 1) + VALID[16:])


def _mutated(mutate) -> bytes:
    header, payload = split(VALID)
    result = mutate(header)
    return result if isinstance(result, bytes) else build(header, payload)


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h.update(surprise=1), "unknown keys"),
    (lambda h: h.pop("meta"), "lacks"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(extra=1), "unknown keys"),
    (lambda h: h["tensors"]["bert.encoder.w"]["index"].update(extra=1), "unknown keys"),
    (lambda h: h["base"].update(hub="x"), "unknown keys"),
    (lambda h: h.update(format="zip"), "format"),
    (lambda h: h.update(values="fp8"), "values"),
    (lambda h: h.update(max_abs_error=-1), "max_abs_error"),
    (lambda h: h.update(max_abs_error="small"), "max_abs_error"),
    (lambda h: h.update(config=[]), "config"),
    (lambda h: h["base"].update(fingerprint="md5:00"), "fingerprint"),
    (lambda h: h["base"].update(digest="sha256"), "tensor digests use 'sha256'"),
    (lambda h: h["base"].pop("digest"), "lacks"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(digest="XYZ"), "digest"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(dtype="complex64"), "dtype"),
    (lambda h: h["extras"]["flags"].update(dtype="float8"), "dtype"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(shape=[4, -8]), "shape"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(shape=[4, 8.0]), "shape"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(shape=[1] * 17), "shape"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(shape=[2**40, 2**40]), "2\\*\\*60"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(nnz=True), "nnz"),
    (lambda h: h["tensors"]["bert.encoder.w"].update(nnz=33), "exceeds"),
    (lambda h: h["tensors"]["bert.empty"].update(index=h["tensors"]["bert.encoder.w"]["index"]), "null"),
    (lambda h: h.update(nnz=h["nnz"] + 1), "sum"),
    (lambda h: h.update(budget_numel=1), "budget_numel"),
    (lambda h: h["tensors"]["bert.encoder.w"]["values"].update(raw_length=9), "imply"),
    (lambda h: h["tensors"]["bert.encoder.w"]["index"].update(raw_length=10**9), "imply|zstd"),
    (lambda h: h["extras"]["flags"]["data"].update(raw_length=4), "imply"),
    (lambda h: h["tensors"]["bert.encoder.w"]["values"].update(codec="lz4"), "codec"),
    (lambda h: h["tensors"]["bert.encoder.w"]["values"].update(sha256="0" * 63), "sha256"),
    (lambda h: h["tensors"]["bert.encoder.w"]["values"].update(offset=h["tensors"]["bert.encoder.w"]["values"]
                                                               ["offset"] + 1), "contiguous"),
    (lambda h: h["extras"]["flags"]["data"].update(length=h["extras"]["flags"]["data"]["length"] + 1),
     "length differs"),
    (lambda h: h["extras"]["classifier.weight"]["data"].update(length=h["extras"]["classifier.weight"]["data"]
                                                                ["length"] + 1), "length differs|contiguous"),
    (lambda h: h["tensors"].update({"classifier.bias": h["tensors"]["bert.encoder.w"]}), "both"),
    (lambda h: h["tensors"].update({"": h["tensors"].pop("bert.empty")}), "valid string"),
])
def test_lying_headers_are_rejected(mutate, message):
    with pytest.raises(FormatError, match=message):
        artifact.loads(_mutated(mutate))


def test_wrong_section_checksum_is_a_checksum_error():
    header, payload = split(VALID)
    header["tensors"]["bert.encoder.w"]["values"]["sha256"] = "0" * 64
    with pytest.raises(ChecksumError, match=r"tensors\['bert.encoder.w'\].values"):
        artifact.loads(build(header, payload))
    artifact.loads_header(build(header, payload))  # the header alone is fine: only load reads payloads


@pytest.mark.parametrize("text", [
    b'{"format":"diffprune","format":"diffprune"}',  # duplicate key
    b'{"max_abs_error":NaN}',
    b'["not", "an", "object"]',
    b'\xff\xfe{}',
    b'{"a":' * 100_000 + b'1' + b'}' * 100_000,
    b'',
])
def test_malformed_json_headers(text):
    with pytest.raises(FormatError):
        artifact.loads(build({}, b"", text=text))


def test_overflowing_numbers_in_free_form_meta():
    header, payload = split(VALID)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert b'"meta":{' in text
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build({}, payload, text=text.replace(b'"meta":{', b'"meta":{"x":1e400,')))
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build({}, payload, text=text.replace(b'"meta":{', b'"meta":{"x":' + b"9" * 5000 + b",")))
    assert artifact.loads(build({}, payload, text=text.replace(b'"meta":{', b'"meta":{"x":1e300,'))).meta["x"] == 1e300


def test_positions_outside_a_shrunk_tensor():
    header, payload = split(VALID)
    t = header["tensors"]["bert.encoder.w"]  # its last position is 31
    t["shape"] = [4, 7]
    header["budget_numel"] -= 4
    with pytest.raises(FormatError, match="outside"):
        artifact.loads(build(header, payload))


def test_zstd_frame_larger_than_declared_is_refused():
    header, payload = split(VALID)
    sec = header["tensors"]["bert.encoder.w"]["values"]
    frame = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
    with pytest.raises(FormatError, match="more bytes"):
        artifact.loads(replace_section(header, payload, sec, frame, codec="zstd"))


def test_index_section_with_extra_positions_is_refused():
    header, payload = split(VALID)
    sec = header["tensors"]["bert.encoder.w"]["index"]
    stream = bytes([0]) + np.packbits(np.ones(6, dtype=np.uint8)).tobytes()  # six positions 0..5, header says 5
    with pytest.raises(FormatError, match="holds 6 positions"):
        artifact.loads(replace_section(header, payload, sec, stream, codec="raw", raw_length=len(stream)))


def test_bool_extra_with_other_bytes_is_refused():
    header, payload = split(VALID)
    sec = header["extras"]["flags"]["data"]
    with pytest.raises(FormatError, match="bool"):
        artifact.loads(replace_section(header, payload, sec, b"\x01\x02\x00", codec="raw"))


def test_non_finite_values_are_refused():
    header, payload = split(VALID)
    sec = header["tensors"]["bert.encoder.h"]["values"]  # one fp16 value, planes: high byte then low byte
    with pytest.raises(FormatError, match="NaN"):
        artifact.loads(replace_section(header, payload, sec, b"\x7e\x00", codec="raw"))


@pytest.mark.parametrize("mutate", [
    lambda h: (h["tensors"]["bert.encoder.w"].update(nnz=10**12, shape=[10**12]),
               h["tensors"]["bert.encoder.w"]["values"].update(raw_length=2 * 10**12),
               h.update(nnz=h["nnz"] - 5 + 10**12, budget_numel=h["budget_numel"] - 32 + 10**12)),
    lambda h: (h["tensors"]["bert.encoder.w"].update(nnz=10**12, shape=[10**12]),
               h.update(nnz=h["nnz"] - 5 + 10**12, budget_numel=h["budget_numel"] - 32 + 10**12)),
    lambda h: (h["extras"]["classifier.weight"].update(shape=[10**9, 10**3]),
               h["extras"]["classifier.weight"]["data"].update(raw_length=4 * 10**12)),
])
def test_huge_declared_sizes_fail_fast_and_small(mutate):
    data = _mutated(lambda h: (mutate(h), None)[1])
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError):
            artifact.loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 20 << 20, peak


def test_huge_sparse_tensor_loads_without_materialising_it():
    data = _mutated(lambda h: (h["tensors"]["bert.encoder.w"].update(shape=[2**60]),
                               h.update(budget_numel=h["budget_numel"] - 32 + 2**60)))
    tracemalloc.start()
    try:
        diff = artifact.loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert diff.tensors["bert.encoder.w"].numel == 2**60 and diff.budget_numel == 2**60 + 29
    assert diff.tensors["bert.encoder.w"].indices.tolist() == [1, 5, 6, 30, 31]
    assert peak < 20 << 20


INTERESTING = [0, 1, -1, 2, 7, 8, 31, 32, 2**31 - 1, 2**31, 2**32, 2**60, 2**62, 2**63, 10**12, 1.5, True, None,
               "x", [], {}]


def _numeric_paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numeric_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numeric_paths(v, path + (i,))
    if not isinstance(obj, (dict, list)) or not obj:
        yield path


def _mutate_once(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    data = bytearray(VALID)
    header, payload = split(VALID)
    if kind == 0:  # raw damage: flips, overwrites, insertions, deletions, truncation
        for _ in range(rng.randint(1, 4)):
            op, i = rng.randrange(4), rng.randrange(len(data))
            if op == 0:
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                data[i] = rng.randrange(256)
            elif op == 2:
                data[i:i] = bytes([rng.randrange(256)])
            else:
                del data[i:i + rng.randint(1, 16)]
        return bytes(data)
    if kind == 1:  # a lying header field behind a correct header digest
        path = rng.choice(list(_numeric_paths(header)))
        node = header
        for p in path[:-1]:
            node = node[p]
        old = node[path[-1]] if path else None
        choice = rng.choice(INTERESTING + ([old + rng.choice([-1, 1])] if type(old) is int else []))
        if path:
            node[path[-1]] = choice
        return build(header, payload)
    secs = sections(header)
    sec = rng.choice(secs)
    stored = bytearray(payload[sec["offset"]:sec["offset"] + sec["length"]])
    if kind == 2 and stored:  # damaged section bytes with a matching checksum: the decoders must cope
        for _ in range(rng.randint(1, 3)):
            stored[rng.randrange(len(stored))] = rng.randrange(256)
        return replace_section(header, payload, sec, bytes(stored))
    # a re-encoded section: raw or zstd of slightly different content, declared lengths adjusted or not
    raw = bytearray(stored if sec["codec"] == "raw" else zstandard.ZstdDecompressor().decompress(bytes(stored)))
    if raw and rng.random() < 0.7:
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    if rng.random() < 0.3:
        raw += bytes(rng.randint(1, 3))
    codec = rng.choice(["raw", "zstd"])
    new = bytes(raw) if codec == "raw" else zstandard.ZstdCompressor(level=1).compress(bytes(raw))
    raw_length = len(raw) if rng.random() < 0.7 else sec["raw_length"]
    return replace_section(header, payload, sec, new, codec=codec, raw_length=raw_length)


def test_fuzz_mutations_give_typed_errors_or_consistent_diffs():
    rng = random.Random(20240601)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(600):
        data = _mutate_once(rng)
        try:
            diff = artifact.loads(data)
        except FormatError:
            outcomes["error"] += 1
            continue
        check_consistent(diff, split(data)[0])
        outcomes["loaded"] += 1
    assert outcomes["error"] > 300 and sum(outcomes.values()) == 600


# ------------------------------------------------------------------------------------------ format version 2

V2 = artifact.pack(golden_diff(), "int4")  # a block quantizer: the scales stream is in use
STREAMS = ("positions", "values", "scales", "dense")


def split2(data: bytes) -> tuple[dict, bytes]:
    hlen, raw = struct.unpack_from("<II", data, 12)
    return json.loads(zstandard.ZstdDecompressor().decompress(data[20:20 + hlen], max_output_size=raw)), \
        data[52 + hlen:]


def build2(header: dict, payload: bytes, version: int = 2, text: bytes | None = None,
           raw_length: int | None = None) -> bytes:
    """A v2 file whose header digest is right, whatever the header says."""
    if text is None:
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    frame = zstandard.ZstdCompressor(level=3).compress(text)
    front = b"DIFFPRUN" + struct.pack("<HHII", version, 0, len(frame), len(text) if raw_length is None else raw_length)
    return front + frame + hashlib.sha256(front + frame).digest() + payload


def streams2(header: dict, payload: bytes) -> dict[str, bytes]:
    out, offset = {}, 0
    for s in STREAMS:
        out[s] = payload[offset:offset + header["streams"][s]["length"]]
        offset += header["streams"][s]["length"]
    return out


def raw2(header: dict, payload: bytes, name: str) -> bytes:
    stored = streams2(header, payload)[name]
    return stored if header["streams"][name]["codec"] == "raw" else zstandard.ZstdDecompressor().decompress(stored)


def replace_stream(header: dict, payload: bytes, name: str, stored: bytes, **fields) -> bytes:
    """Swap one stream's stored bytes (fixing its length and checksum) and rebuild the file."""
    blobs = streams2(header, payload)
    blobs[name] = stored
    header["streams"][name].update(length=len(stored), sha256=hashlib.sha256(stored).hexdigest(), **fields)
    return build2(header, b"".join(blobs[s] for s in STREAMS))


def replace_raw(header: dict, payload: bytes, name: str, raw: bytes) -> bytes:
    return replace_stream(header, payload, name, raw, codec="raw", raw_length=len(raw))


def check_consistent2(diff, header: dict) -> None:
    """A v2 file that loads gives a Diff honouring every record of its header."""
    records = {r[1]: r for r in header["records"] if r[0] != "basis"}
    assert set(diff.tensors) | set(diff.extras) == set(records)
    bases = {r[1]: r for r in header["records"] if r[0] == "basis"}
    assert set(diff.bases) == set(bases)
    for name, bs in diff.bases.items():
        from diffcli.svd_basis import check_scales

        td = diff.tensors[name]
        assert bs.rank == bases[name][2] == min(td.shape) and bs.nkept == bases[name][3]
        check_scales(name, td.shape, td.dtype, bs)
    for name, td in diff.tensors.items():
        r = records[name]
        if r[0] == "lowrank":  # B (out×r) and A (r×in), finite
            assert td.is_lowrank and list(td.shape) == r[4] and len(r[4]) == 2 and 1 <= r[6] <= min(r[4])
            assert [list(f.shape) for f in td.factors] == [[r[4][0], r[6]], [r[6], r[4][1]]]
            assert all(bool(torch.isfinite(f).all()) for f in td.factors)
            continue
        assert r[0] == "sparse" and list(td.shape) == r[4] and td.nnz == r[6]
        if td.nnz:
            idx = td.indices
            assert idx.dtype == torch.int64 and int(idx[0]) >= 0 and int(idx[-1]) < td.numel
            assert bool((idx[1:] > idx[:-1]).all()) and bool(torch.isfinite(td.values).all())
    for name, t in diff.extras.items():
        assert records[name][0] == "dense" and list(t.shape) == records[name][3]


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
        path = rng.choice(list(_numeric_paths(header)))
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


def _with_bases(diff):
    """The golden diff plus basis scales on its 4×8 tensor (one basis pruned) and its empty 3×5 one (all pruned)."""
    from diffcli.diff import BasisScales

    diff.bases["bert.encoder.w"] = BasisScales(4, torch.tensor([0, 2, 3]), torch.tensor([0.1, -0.2, 0.0]),
                                               [0.1, -0.2, 0.3, 0.4])
    diff.bases["bert.empty"] = BasisScales(3, torch.zeros(0, dtype=torch.int64), torch.zeros(0), [0.0, 0.0, 0.0, 0.0])
    return diff


def test_v2_fuzz_mutations_give_typed_errors_or_consistent_diffs():
    rng = random.Random(20261202)
    outcomes = {"error": 0, "loaded": 0}
    from test_lowrank import golden_lowrank

    valids = [artifact.pack(golden_diff(), v) for v in ("fp16", "int8", "int4", "ternary")]
    valids += [artifact.pack(golden_lowrank(), v) for v in ("fp32", "int8")]  # with a low-rank record
    valids += [artifact.pack(_with_bases(golden_diff()), v) for v in ("fp16", "int8")]  # basis records too
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

    diff = _with_bases(golden_lowrank())
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


# ------------------------------------------------------------------------------------------ numbers beyond a double

BIG = 10**400  # a JSON integer no double holds
LONG_FLOAT = "0." + "0" * 4998 + "1"  # a float literal of 5000 digits


def _cli_exit(args) -> tuple[int, str]:
    from typer.testing import CliRunner

    from diffcli.cli.app import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    return res.exit_code, res.stderr


@pytest.mark.parametrize("mutate", [
    lambda h: h["values"].update(max_abs_error=BIG),
    lambda h: h["values"].update(max_rel_error=-BIG),
    lambda h: h["meta"].update(x=BIG),
    lambda h: h["config"].update(x=[BIG]),
    lambda h: h.update(nnz=BIG),
])
def test_v2_integers_beyond_a_double_are_a_format_error(mutate, tmp_path, tiny_base):
    header, payload = split2(V2)
    mutate(header)
    data = build2(header, payload)
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(data)
    path = tmp_path / "big.diff"
    path.write_bytes(data)
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", tmp_path / "out"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "JSON" in err, (args, err)
    assert not (tmp_path / "out").exists()


def test_v2_a_basis_probe_beyond_a_double_is_a_format_error():
    header, payload = split2(artifact.pack(_with_bases(golden_diff())))
    rec = next(r for r in header["records"] if r[0] == "basis")
    rec[5][0] = BIG
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build2(header, payload))
    rec[5][0] = 2**64  # an integer a double holds but int64 does not: a finite probe number, read as a float
    assert artifact.loads(build2(header, payload)).bases[rec[1]].probe[0] == float(2**64)


def test_float_literals_of_over_4300_digits_are_a_format_error():
    header, payload = split2(V2)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    for literal in (LONG_FLOAT, "1." + "0" * 4300, "1" + "0" * 4301 + "e-4300"):
        with pytest.raises(FormatError, match="JSON"):
            artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{literal},'.encode())))
    ok = "1." + "0" * 4298  # 4299 digits: within the limit
    assert artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{ok},'.encode()))
                          ).meta["x"] == 1.0
    assert artifact.loads(build2({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{2**1023},'.encode()))
                          ).meta["x"] == 2**1023


def test_v1_numbers_beyond_a_double_are_a_format_error():
    header, payload = split(VALID)
    header["max_abs_error"] = BIG
    with pytest.raises(FormatError, match="JSON"):
        artifact.loads(build(header, payload))
    header, payload = split(VALID)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    for lit in (str(BIG), LONG_FLOAT, str(-2**1024)):
        with pytest.raises(FormatError, match="JSON"):
            artifact.loads(build({}, payload, text=text.replace(b'"meta":{', f'"meta":{{"x":{lit},'.encode())))


# ------------------------------------------------------------------------------------------ reserved and repeated names

def _renamed2(data: bytes, old: str, new: str) -> bytes:
    header, payload = split2(data)
    for r in header["records"]:
        if r[1] == old:
            r[1] = new
    header["records"].sort(key=lambda r: (r[1], r[0] == "basis"))
    return build2(header, payload)


@pytest.mark.parametrize("old", ["classifier.bias", "bert.encoder.w", "bert.empty"])
def test_v2_a_record_named_like_the_safetensors_metadata_key_is_refused(old, tmp_path, tiny_base):
    """apply wrote such a tensor over the safetensors header's `__metadata__` entry: a broken file, exit 0."""
    data = _renamed2(artifact.pack(golden_diff()), old, "__metadata__")
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(data)
    path = tmp_path / "meta.diff"
    path.write_bytes(data)
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", tmp_path / "out"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "__metadata__" in err, (args, err)
    assert not (tmp_path / "out").exists()
    header, payload = split2(artifact.pack(golden_diff()))
    next(r for r in header["records"] if r[1] == old or r[0] == "sparse")[2] = "__metadata__"  # as a base name
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(build2(header, payload))


def test_v1_a_tensor_or_extra_named_like_the_safetensors_metadata_key_is_refused():
    for kind, old in (("extras", "classifier.bias"), ("tensors", "bert.encoder.w")):
        header, payload = split(VALID)
        header[kind]["__metadata__"] = header[kind].pop(old)  # refused before any section is placed or read
        with pytest.raises(FormatError, match="__metadata__"):
            artifact.loads(build(header, payload))
    header, payload = split(VALID)
    header["tensors"]["bert.encoder.w"]["base"] = "__metadata__"
    with pytest.raises(FormatError, match="__metadata__"):
        artifact.loads(build(header, payload))


def test_a_writer_refuses_the_safetensors_metadata_key_as_a_name():
    from diffcli.errors import InvalidValueError

    diff = golden_diff()
    diff.extras["__metadata__"] = diff.extras.pop("classifier.bias")
    for version in (1, 2):
        with pytest.raises(InvalidValueError, match="__metadata__"):
            artifact.pack(diff, version=version)
    diff = golden_diff()
    diff.tensors["__metadata__"] = diff.tensors.pop("bert.encoder.w")
    with pytest.raises(InvalidValueError, match="__metadata__"):
        artifact.pack(diff)


def _one_base_twice(header: dict, a: str, b: str) -> None:
    """Record b names record a's base tensor (and copies its digest): two records, one base tensor."""
    ra = next(r for r in header["records"] if r[0] != "dense" and r[1] == a)
    rb = next(r for r in header["records"] if r[0] != "dense" and r[1] == b)
    rb[2], rb[5] = ra[2] if ra[2] is not None else ra[1], ra[5]


def test_v2_two_records_on_one_base_tensor_are_refused():
    header, payload = split2(V2)
    _one_base_twice(header, "bert.encoder.w", "bert.empty")
    with pytest.raises(FormatError, match="'encoder.w'.*two records|two records.*'encoder.w'"):
        artifact.loads(build2(header, payload))


def test_v1_two_tensors_on_one_base_tensor_are_refused():
    header, payload = split(VALID)
    header["tensors"]["bert.empty"]["base"] = header["tensors"]["bert.encoder.w"]["base"]
    with pytest.raises(FormatError, match="'encoder.w'"):
        artifact.loads(build(header, payload))


def test_a_writer_refuses_two_tensors_on_one_base_tensor():
    from diffcli.errors import InvalidValueError

    diff = golden_diff()
    td = diff.tensors["bert.empty"]
    diff.tensors["bert.empty"] = type(td).zeros("encoder.w", td.shape, td.dtype, td.digest)
    for version in (1, 2):
        with pytest.raises(InvalidValueError, match="'encoder.w'"):
            artifact.pack(diff, version=version)


def test_verify_base_and_apply_agree_on_a_file_with_one_base_tensor_twice(tmp_path, tiny_base, tiny_finetune):
    """verify --base counted the shared base tensor's digest twice (exit 5) while apply counted it once (exit 0)."""
    from diffcli.extract import extract_diff
    from diffcli.projection import project

    diff = project(extract_diff(str(tiny_base), str(tiny_finetune)), 0.05).diff
    header, payload = split2(artifact.pack(diff))
    q, k = (next(n for n in diff.tensors if n.endswith(f"layer.0.attention.self.{m}.weight")) for m in ("query", "key"))
    _one_base_twice(header, q, k)
    path = tmp_path / "twice.diff"
    path.write_bytes(build2(header, payload))
    for args in (["verify", path, "--base", tiny_base], ["apply", tiny_base, path, "-o", tmp_path / "out"],
                 ["apply", tiny_base, path, "-o", tmp_path / "out", "--force"]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "two records" in err, (args, err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ not a regular file

@pytest.fixture
def fifo(tmp_path):
    """A named pipe that would give a valid file's bytes to whoever reads it (as `<(cat x.diff)` does)."""
    import os
    import threading

    path = tmp_path / "pipe.diff"
    os.mkfifo(path)

    def feed():
        try:
            with open(path, "wb") as fh:  # blocks until a reader opens the pipe
                fh.write(V2)
        except OSError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    yield path
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # release the feeder if nobody read the pipe
    try:
        while os.read(fd, 1 << 16):
            pass
    except BlockingIOError:
        pass
    os.close(fd)


@pytest.mark.parametrize("special", ["fifo", "/dev/null", "/dev/zero"])
def test_a_path_that_is_not_a_regular_file_is_refused_by_every_reader(special, request, tmp_path, tiny_base):
    """verify read /dev/zero until memory ran out; a pipe verified (exit 0) where inspect found it 'too short'."""
    from pathlib import Path

    path = request.getfixturevalue("fifo") if special == "fifo" else Path(special)
    if not path.exists():
        pytest.skip(f"{path} does not exist here")
    for call in (artifact.load, artifact.read_header, artifact.verify):
        with pytest.raises(FormatError, match="not a regular file"):
            call(path)
    out = tmp_path / "out"
    for args in (["verify", path], ["inspect", path], ["apply", tiny_base, path, "-o", out],
                 ["eval", tiny_base, path, "--task", "sst2"], ["merge", path, path, "-o", out],
                 ["prune", path, "-s", "1%", "-o", out], ["pack", path, "-o", out]):
        code, err = _cli_exit(args)
        assert code == 4 and len(err.strip().splitlines()) == 1 and "not a regular file" in err, (args, err)
    assert not out.exists()


# ------------------------------------------------------------------------------------------ the recorded value error

@pytest.mark.parametrize("values", ["fp16", "bf16", "int8", "int4", "ternary"])
def test_every_file_the_writer_makes_keeps_its_value_error_within_the_bound(values):
    """The bound a reader checks max_abs_error against holds for sparse, dense, low-rank and basis records."""
    from test_lowrank import golden_lowrank

    for diff in (golden_diff(), golden_lowrank(), _with_bases(golden_diff()), _with_bases(golden_lowrank())):
        for block in ((None, 1, 2, 3, 1000) if values in ("int8", "int4", "ternary") else (None,)):
            data = artifact.pack(diff, values, block=block)
            check_consistent2(artifact.loads(data), split2(data)[0])


def test_the_golden_files_keep_their_value_error_within_the_bound():
    from test_artifact import DATA

    for path in sorted(DATA.glob("golden_*.diff")):
        artifact.load(path)


def test_v2_a_value_error_above_what_the_quantizer_can_make_is_refused():
    for values, lie in (("fp32", 1e-30), ("fp16", 2.0**-9), ("bf16", 2.0**-6), ("int8", 0.1), ("int4", 1.0),
                        ("ternary", 10.0)):
        header, payload = split2(artifact.pack(golden_diff(), values))  # largest |δ| 3: fp16 half-ulp 2^-10
        header["values"]["max_abs_error"] = lie
        with pytest.raises(FormatError, match="max_abs_error"):
            artifact.loads(build2(header, payload))


_MAGNITUDES = st.sampled_from([0.0, 1e-45, 1e-40, 2.0**-126, 6e-8, 2.0**-14, 1e-3, 0.3, 1.0, 7.0, 1e4, 65519.0, 1e30])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["fp16", "bf16", "int8", "int4", "ternary"]),
       st.lists(st.lists(st.tuples(_MAGNITUDES, st.floats(-1, 1, width=32)), max_size=40), min_size=1, max_size=5),
       st.lists(st.booleans(), min_size=5, max_size=5), st.integers(1, 64))
def test_the_writers_value_error_never_exceeds_the_bound_a_reader_checks(values, segments, droppable, block):
    """quantize_stored (both passes, dropped entries included) against quantize.error_limit over what it stores."""
    from diffcli import quantize

    if values in ("fp16", "bf16") and any(m >= 1e30 for seg in segments for m, _ in seg):
        segments = [[(m, f) for m, f in seg if m < 1e30] for seg in segments]  # beyond fp16: refused at pack
    if values == "fp16":
        segments = [[(m, f) for m, f in seg if m * abs(f) < 65504] for seg in segments]
    vals = np.asarray([m * f for seg in segments for m, f in seg], dtype=np.float32)
    counts = np.asarray([len(seg) for seg in segments], dtype=np.int64)
    block = 0 if values in ("fp16", "bf16") else block
    q, _keep, kept = quantize.quantize_stored(vals, counts, values, block, droppable=np.asarray(droppable[:counts.size]))
    limit = quantize.error_limit(q.values, q.scales, kept, values, quantize.fit_block(block, kept))
    assert q.max_abs_error <= limit, (q.max_abs_error, limit)


def test_a_writer_refuses_values_its_quantizer_cannot_store_within_the_bound():
    """A ternary block whose magnitudes sum past float32 would code nothing and store an error readers refuse."""
    from diffcli.diff import Diff, TensorDiff
    from diffcli.errors import InvalidValueError
    from diffcli.weights import fingerprint

    td = TensorDiff("w", (4,), "float32", "0" * 32, torch.tensor([3e38, -3e38, 1.0, 2.0]), torch.arange(4))
    diff = Diff({"w": td}, {}, {}, "b", fingerprint([td.digest]), {})
    with np.errstate(over="ignore"), pytest.raises(InvalidValueError, match="within its error bound"):
        artifact.pack(diff, "ternary")
    assert artifact.loads(artifact.pack(diff, "int8")).tensors["w"].nnz == 2  # 1 and 2 round to 0 beside 3e38


@pytest.mark.parametrize("values", ["int8", "int4", "ternary"])
def test_a_subnormal_entry_dropped_with_its_whole_segment_keeps_within_the_bound(values):
    """2^-149 alone: its int8 scale underflows, it codes 0 and is dropped; the error it leaves is within the floor."""
    from diffcli import quantize

    vals = np.asarray([1e-45], dtype=np.float32)
    q, _keep, kept = quantize.quantize_stored(vals, np.asarray([1]), values, 1)
    assert q.max_abs_error <= quantize.error_limit(q.values, q.scales, kept, values, quantize.fit_block(1, kept))


# ------------------------------------------------------------------------------------------------- reader memory

def _returned_bytes(diff) -> int:
    """Bytes of the arrays a loaded Diff holds: values, positions, low-rank factors, basis scales, extras."""
    arrays = [t for td in diff.tensors.values() for t in (td.values, td.indices, *(td.factors or ())) if t is not None]
    arrays += [bs.kept for bs in diff.bases.values()] + [bs.values for bs in diff.bases.values()]
    return sum(t.numel() * t.element_size() for t in arrays + list(diff.extras.values()))


def _peak_of_loading(data: bytes) -> tuple[object, int]:
    tracemalloc.start()  # counts numpy's allocations, which hold everything the v2 reader decodes
    try:
        diff = artifact.loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return diff, peak


def test_v2_a_tiny_low_rank_file_costs_a_reader_little_beyond_its_decoded_values():
    """A 600-byte file (one low-rank record of zeros, ternary, one RLE zstd frame) decodes to 32 MiB of float32
    factors (FORMAT.md §3: raw_length ≤ 32768 × length allows it); the reader once held 4.3x that (int64 block ids,
    float temporaries, copies of B and A), now the factors, the 2 MiB raw stream and a few MB of work buffers."""
    from diffcli import codec

    n, rank = 4096, 1024
    nnz = 2 * n * rank
    codes = zstandard.ZstdCompressor(level=19).compress(b"\x55" * (nnz // 4))  # q = 0: code 01, four a byte
    scales = codec.to_planes(np.ones(2, dtype="<f4").view(np.uint8), 4)  # one block for B, one for A
    def desc(stored, raw_length, kind="raw"):  # noqa: E306
        return {"length": len(stored), "raw_length": raw_length, "sha256": hashlib.sha256(stored).hexdigest(),
                "codec": kind}
    header = {"format": "diffprune", "version": 2, "producer": "x",
              "base": {"ref": "x", "fingerprint": "sha256:" + "0" * 64, "digest": "xxh3-128"},
              "values": {"quantizer": "ternary", "block": n * rank, "max_abs_error": 0, "max_rel_error": 0},
              "budget_numel": n * n, "nnz": nnz, "records": [["lowrank", "w", None, "float32", [n, n], "0" * 32, rank]],
              "streams": {"positions": desc(b"", 0), "values": desc(codes, nnz // 4, "zstd"),
                          "scales": desc(scales, 8), "dense": desc(b"", 0)},
              "config": {}, "meta": {}}
    data = build2(header, codes + scales)
    assert len(data) < 1000
    diff, peak = _peak_of_loading(data)
    b, a = diff.tensors["w"].factors
    assert tuple(b.shape) == (n, rank) and tuple(a.shape) == (rank, n) and not b.any() and not a.any()
    returned = _returned_bytes(diff)
    assert returned == 4 * nnz
    assert peak <= 1.5 * returned + (4 << 20), (peak, returned)


@pytest.mark.parametrize("values", ["ternary", "int4", "int8", "fp16"])
def test_v2_the_reader_holds_what_it_returns_its_raw_streams_and_a_few_mb(values):
    """The writer's own tiny files of huge regular content (every position of a tensor, one value; a low-rank
    record of zeros): a reader's peak is the float32 values and int64 positions it returns, one copy of the raw
    streams and work buffers of a few MB, whatever the quantizer (before: 4-6x what it returned)."""
    from diffcli import lowrank
    from diffcli.diff import Diff, TensorDiff

    m, n, rank = 1 << 21, 2048, 256
    sparse = TensorDiff("s", (m,), "float32", "0" * 32, torch.full((m,), 0.5), torch.arange(m))
    low = lowrank.make("w", (n, n), "float32", "1" * 32, torch.zeros(n, rank), torch.zeros(rank, n))
    data = artifact.pack(Diff({"s": sparse, "w": low}, {}, {}, "x", "sha256:" + "0" * 64, {}), values)
    raw = sum(s["raw_length"] for s in split2(data)[0]["streams"].values())
    assert len(data) < 1 << 16 < raw
    diff, peak = _peak_of_loading(data)
    assert diff.tensors["s"].indices.tolist()[-3:] == [m - 3, m - 2, m - 1]
    returned = _returned_bytes(diff)
    assert returned == 12 * m + 8 * n * rank
    assert peak <= returned + raw + (4 << 20), (peak, returned, raw)
