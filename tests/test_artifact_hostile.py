"""Hostile inputs to the version-1 reader: every malformed, truncated, lying or mutated file ends in a typed error,
fast and small."""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc

import numpy as np
import pytest
import zstandard

from diffcli import artifact
from diffcli.errors import ChecksumError, FormatError, NotFoundError, UnsupportedVersionError
from diff_bytes import (INTERESTING, build, check_consistent, load_bytes, numeric_paths, replace_section,
                        sections, split)
from test_artifact import golden_diff

VALID = artifact.pack(golden_diff(), version=1)


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
        path = rng.choice(list(numeric_paths(header)))
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
