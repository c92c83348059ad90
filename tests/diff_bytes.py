"""Byte-level surgery on .diff files for the hostile-input tests: take a file apart, change what its header or
sections say, and rebuild it with a correct header digest so the checks behind the digest are what is exercised."""

from __future__ import annotations

import hashlib
import json
import struct

import torch
import zstandard

from diffcli import artifact

# --------------------------------------------------------------------------------------------- format version 1

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


def numeric_paths(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numeric_paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from numeric_paths(v, path + (i,))
    if not isinstance(obj, (dict, list)) or not obj:
        yield path


INTERESTING = [0, 1, -1, 2, 7, 8, 31, 32, 2**31 - 1, 2**31, 2**32, 2**60, 2**62, 2**63, 10**12, 1.5, True, None,
               "x", [], {}]


# --------------------------------------------------------------------------------------------- format version 2

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


def with_golden_bases(diff):
    """The golden diff plus basis scales on its 4×8 tensor (one basis pruned) and its empty 3×5 one (all pruned)."""
    from diffcli.diff import BasisScales

    diff.bases["bert.encoder.w"] = BasisScales(4, torch.tensor([0, 2, 3]), torch.tensor([0.1, -0.2, 0.0]),
                                               [0.1, -0.2, 0.3, 0.4])
    diff.bases["bert.empty"] = BasisScales(3, torch.zeros(0, dtype=torch.int64), torch.zeros(0), [0.0, 0.0, 0.0, 0.0])
    return diff
