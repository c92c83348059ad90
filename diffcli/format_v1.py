"""Packed format version 1: a JSON header with one checksummed section per stream (docs/FORMAT.md, "Version 1")."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from diffcli import codec, quantize
from diffcli.diff import Diff, TensorDiff
from diffcli.errors import ChecksumError, FormatError, InvalidValueError
from diffcli.format_common import (DIGEST_LEN, DIGEST_RE, DTYPE_SIZES, FLOAT_DTYPES, FORMAT_NAME, MAGIC,
                                   PREAMBLE, SHA_RE, canonical_header, check_diff, check_top, check_extra,
                                   check_tensor, choice, error_bound, fail, from_le_bytes, integer, keys, le_bytes,
                                   numel, one_per_base, parse_json, shape_of, sparse_entries, string,
                                   tensor_name)

VERSION = 1
VALUE_TYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
CODECS = ("raw", "zstd")

_TOP_KEYS = {"format", "version", "producer", "base", "values", "budget_numel", "nnz", "max_abs_error",
             "tensors", "extras", "config", "meta"}
_TENSOR_KEYS = {"base", "shape", "dtype", "digest", "nnz", "index", "values"}
_EXTRA_KEYS = {"shape", "dtype", "data"}
_SECTION_KEYS = {"offset", "length", "raw_length", "sha256", "codec"}


def encode(diff: Diff, values: str, producer: str) -> tuple[bytes, dict[str, Any]]:
    """Serialise a Diff as version 1; returns the file bytes and size statistics."""
    import torch

    from diffcli.weights import DIGEST_ALGORITHM, torch_dtype

    if values not in VALUE_TYPES:
        raise InvalidValueError(f"format version 1 stores values as {', '.join(VALUE_TYPES)}, not {values!r}",
                                hint="write format version 2 for int8, int4 or ternary values")
    vdtype = torch_dtype(VALUE_TYPES[values])
    vsize = DTYPE_SIZES[VALUE_TYPES[values]]
    check_diff(diff)

    sections: list[tuple[dict[str, Any], bytes, str]] = []  # payload order: extras, then tensors

    def section(raw: bytes, kind: str, planes: int = 1) -> dict[str, Any]:
        name, stored = codec.compress(raw, planes, level=codec.ZSTD_LEVEL)
        sec = {"offset": 0, "length": len(stored), "raw_length": len(raw),
               "sha256": hashlib.sha256(stored).hexdigest(), "codec": name}
        sections.append((sec, stored, kind))
        return sec

    extras: dict[str, Any] = {}
    for name in sorted(diff.extras):
        t = diff.extras[name]
        dtype, shape = check_extra(name, t)
        data = section(codec.to_planes(le_bytes(t), DTYPE_SIZES[dtype]), "extras", DTYPE_SIZES[dtype])
        extras[name] = {"shape": list(shape), "dtype": dtype, "data": data}

    tensors: dict[str, Any] = {}
    max_err = 0.0
    nnz_total = 0
    for name in sorted(diff.tensors):
        td = diff.tensors[name]
        shape = check_tensor(name, td)
        if td.is_lowrank:
            raise InvalidValueError(f"format version 1 cannot hold the low-rank diff of {name!r}",
                                    hint="write format version 2")
        idx, vals = sparse_entries(name, td)
        entry: dict[str, Any] = {"base": td.base_name, "shape": list(shape), "dtype": td.dtype,
                                 "digest": td.digest, "nnz": int(idx.numel()), "index": None, "values": None}
        if idx.numel():
            if not bool(torch.isfinite(vals).all()):
                raise InvalidValueError(f"diff {name!r} holds NaN or infinite values")
            cast = vals.to(vdtype)
            err = float((vals - cast.to(torch.float32)).abs().max())  # exact: Sterbenz, |v − c| ≤ ulp
            if not math.isfinite(err):
                raise InvalidValueError(f"diff {name!r} has values beyond the {values} range",
                                        hint="pack with --values bf16 or fp32")
            max_err = max(max_err, err)
            entry["index"] = section(codec.encode_positions(idx.numpy()), "index")
            entry["values"] = section(codec.to_planes(le_bytes(cast), vsize), "values", vsize)
        nnz_total += int(idx.numel())
        tensors[name] = entry

    offset = 0
    for sec, stored, _kind in sections:
        sec["offset"] = offset
        offset += len(stored)
    header = {"format": FORMAT_NAME, "version": VERSION, "producer": producer,
              "base": {"ref": diff.base_ref, "fingerprint": diff.base_fingerprint, "digest": DIGEST_ALGORITHM},
              "values": values,
              "budget_numel": sum(numel(tuple(e["shape"])) for e in tensors.values() if e["dtype"] in FLOAT_DTYPES),
              "nnz": nnz_total, "max_abs_error": max_err, "tensors": tensors, "extras": extras,
              "config": diff.config, "meta": diff.meta}
    text = canonical_header(header)
    pre = PREAMBLE.pack(MAGIC, VERSION, 0, len(text))
    digest = hashlib.sha256(pre + text).digest()
    parts = [pre, text, digest] + [stored for _sec, stored, _kind in sections]
    stats = {"header_bytes": len(pre) + len(text) + DIGEST_LEN, "index_bytes": 0, "values_bytes": 0,
             "extras_bytes": 0, "max_abs_error": max_err, "max_rel_error": None, "nnz": nnz_total,
             "budget_numel": header["budget_numel"]}
    for sec, stored, kind in sections:
        stats[f"{kind}_bytes"] += len(stored)
    return b"".join(parts), stats


@dataclass
class _Section:
    where: str
    kind: str  # "index", "values" or "extra"
    offset: int
    length: int
    raw_length: int
    sha256: str
    codec: str


def _section(v: Any, where: str, kind: str, raw_lo: int, raw_hi: int) -> _Section:
    s = keys(v, _SECTION_KEYS, where)
    sec = _Section(where, kind, integer(s["offset"], f"{where}.offset", 1 << 62),
                   integer(s["length"], f"{where}.length", 1 << 62),
                   integer(s["raw_length"], f"{where}.raw_length", 1 << 62),
                   string(s["sha256"], f"{where}.sha256", 64, 64, SHA_RE), choice(s["codec"], CODECS, f"{where}.codec"))
    if not raw_lo <= sec.raw_length <= raw_hi:
        raise fail(f"{where}.raw_length {sec.raw_length} is not what its shape and nnz imply "
                   f"({raw_lo}..{raw_hi})" if raw_lo != raw_hi else
                   f"{where}.raw_length {sec.raw_length} is not the {raw_lo} bytes its shape and nnz imply")
    if sec.codec == "raw" and sec.length != sec.raw_length:
        raise fail(f"{where} is stored raw but its length differs from raw_length")
    if sec.codec == "zstd" and sec.raw_length > codec.ZSTD_MAX_RATIO * sec.length:
        raise fail(f"{where} declares {sec.raw_length} bytes from {sec.length}: beyond any zstd frame")
    return sec


def validate_header(h: Any, payload_size: int) -> list[_Section]:
    """Check a parsed version-1 header against every rule of the spec; returns its sections in payload order."""
    check_top(h, _TOP_KEYS, VERSION)
    choice(h["values"], VALUE_TYPES, "values")
    vsize = DTYPE_SIZES[VALUE_TYPES[h["values"]]]
    error_bound(h["max_abs_error"], "max_abs_error", h["values"] == "fp32")
    if not isinstance(h["tensors"], dict) or not isinstance(h["extras"], dict):
        raise fail("tensors and extras must be objects")

    sections: list[_Section] = []
    for name in sorted(h["extras"]):
        where = f"extras[{name!r}]"
        tensor_name(name, "an extra's name")
        e = keys(h["extras"][name], _EXTRA_KEYS, where)
        shape = shape_of(e["shape"], where)
        choice(e["dtype"], DTYPE_SIZES, f"{where}.dtype")
        raw = numel(shape) * DTYPE_SIZES[e["dtype"]]
        sections.append(_section(e["data"], f"{where}.data", "extra", raw, raw))
    budget = nnz_total = 0
    for name in sorted(h["tensors"]):
        where = f"tensors[{name!r}]"
        tensor_name(name, "a tensor's name")
        if name in h["extras"]:
            raise fail(f"{name!r} is both a tensor and an extra")
        t = keys(h["tensors"][name], _TENSOR_KEYS, where)
        tensor_name(t["base"], f"{where}.base")
        shape = shape_of(t["shape"], where)
        choice(t["dtype"], DTYPE_SIZES, f"{where}.dtype")
        string(t["digest"], f"{where}.digest", 32, 32, DIGEST_RE)
        n = numel(shape)
        nnz = integer(t["nnz"], f"{where}.nnz")
        if nnz > n:
            raise fail(f"{where}.nnz {nnz} exceeds its {n} entries")
        if t["dtype"] in FLOAT_DTYPES:
            budget += n
        nnz_total += nnz
        if nnz == 0:
            if t["index"] is not None or t["values"] is not None:
                raise fail(f"{where} has nnz 0, so index and values must be null")
            continue
        lo, hi = codec.positions_raw_bounds(nnz, n)
        sections.append(_section(t["index"], f"{where}.index", "index", lo, hi))
        sections.append(_section(t["values"], f"{where}.values", "values", nnz * vsize, nnz * vsize))
    one_per_base([(name, h["tensors"][name]["base"]) for name in sorted(h["tensors"])], "tensors")
    if integer(h["budget_numel"], "budget_numel", 1 << 62) != budget:
        raise fail(f"budget_numel {h['budget_numel']} is not the {budget} its tensors imply")
    if integer(h["nnz"], "nnz", 1 << 62) != nnz_total:
        raise fail(f"nnz {h['nnz']} is not the sum {nnz_total} of its tensors")

    expected = 0
    for sec in sections:
        if sec.offset != expected:
            raise fail(f"{sec.where} starts at {sec.offset}, expected {expected} (sections must be contiguous)")
        expected += sec.length
        if expected > payload_size:
            raise FormatError(f"{sec.where} runs past the end of the file (truncated?)")
    if expected != payload_size:
        raise FormatError(f"{payload_size - expected} unexpected bytes after the last section")
    return sections


def parse_front(front: memoryview, file_size: int, source: str, hlen: int) -> tuple[dict, list[_Section], int]:
    """After a valid preamble: the header digest, then the header; `front` holds preamble+header+digest."""
    payload_start = PREAMBLE.size + hlen + DIGEST_LEN
    if file_size < payload_start or len(front) < payload_start:
        raise FormatError(f"{source} is truncated inside its header")
    if hashlib.sha256(front[:PREAMBLE.size + hlen]).digest() != front[PREAMBLE.size + hlen:payload_start]:
        raise ChecksumError(f"{source}: header checksum mismatch")
    header = parse_json(front[PREAMBLE.size:PREAMBLE.size + hlen], source)
    sections = validate_header(header, file_size - payload_start)
    return header, sections, payload_start


def front_length(hlen: int) -> int:
    """Bytes after the preamble that read_header needs: the header and its digest."""
    return hlen + DIGEST_LEN


def _sections_of(header: dict) -> Iterator[tuple[str, str, dict]]:
    """(kind, name, header entry) for every section-bearing entry, in payload order."""
    for name in sorted(header["extras"]):
        yield "extra", name, header["extras"][name]
    for name in sorted(header["tensors"]):
        if header["tensors"][name]["nnz"]:
            yield "index", name, header["tensors"][name]
            yield "values", name, header["tensors"][name]


def section_count(header: dict) -> int:
    return sum(2 if t["nnz"] else 0 for t in header["tensors"].values()) + len(header["extras"])


def decode(view: memoryview, source: str, hlen: int) -> tuple[dict, Diff]:
    """Parse, check every checksum and bound, and decode a whole version-1 file held in memory."""
    import numpy as np
    import torch

    header, sections, start = parse_front(view, len(view), source, hlen)
    raw: dict[tuple[str, str], Any] = {}
    for sec, (kind, name, _entry) in zip(sections, _sections_of(header)):
        stored = view[start + sec.offset:start + sec.offset + sec.length]
        if hashlib.sha256(stored).hexdigest() != sec.sha256:
            raise ChecksumError(f"{source}: checksum mismatch in {sec.where}")
        raw[(kind, name)] = codec.decompress(sec.codec, stored, sec.raw_length)

    vtype = VALUE_TYPES[header["values"]]
    extras = {}
    for name, e in header["extras"].items():
        size = DTYPE_SIZES[e["dtype"]]
        extras[name] = from_le_bytes(codec.from_planes(raw[("extra", name)], size), e["dtype"], tuple(e["shape"]))
    tensors = {}
    for name, t in header["tensors"].items():
        shape = tuple(t["shape"])
        if t["nnz"] == 0:
            tensors[name] = TensorDiff.zeros(t["base"], shape, t["dtype"], t["digest"])
            continue
        pos = codec.decode_positions(raw[("index", name)], t["nnz"], numel(shape))
        vals = from_le_bytes(codec.from_planes(raw[("values", name)], DTYPE_SIZES[vtype]), vtype, (t["nnz"],))
        vals = vals.to(torch.float32)
        if not quantize.all_finite(vals.numpy()):
            raise FormatError(f"{source}: tensors[{name!r}] holds NaN or infinite values")
        tensors[name] = TensorDiff(t["base"], shape, t["dtype"], t["digest"], vals,
                                   torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)))
    diff = Diff(tensors, extras, header["config"], header["base"]["ref"], header["base"]["fingerprint"],
                header["meta"])
    return header, diff


def describe(header: dict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per tensor and extra, bytes = its sections) and the values description of a v1 header."""
    from diffcli.weights import is_float

    rows, split = [], {"positions": 0, "values": 0, "dense": 0}
    for name, e in sorted(header["tensors"].items()):
        pos, val = ((e.get(s) or {}).get("length", 0) for s in ("index", "values"))
        split["positions"] += pos
        split["values"] += val
        rows.append({"tensor": name, "kind": "sparse", "shape": list(e["shape"]), "numel": numel(e["shape"]),
                     "nnz": int(e["nnz"]), "bytes": pos + val, "budget": is_float(e["dtype"])})
    for name, e in sorted(header["extras"].items()):
        n = numel(e["shape"])
        split["dense"] += e["data"]["length"]
        rows.append({"tensor": name, "kind": "dense", "shape": list(e["shape"]), "numel": n, "nnz": n,
                     "bytes": e["data"]["length"], "budget": False})
    values = {"quantizer": header["values"], "block": None, "max_abs_error": header["max_abs_error"],
              "max_rel_error": None}
    return rows, {"values": values, "bytes": split}
