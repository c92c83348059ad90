"""Packed format version 2: a compressed JSON header of typed records and four checksummed streams (docs/FORMAT.md)."""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Any

import numpy as np

from diffcli import codec, lowrank, quantize
from diffcli.diff import BasisScales, Diff, TensorDiff
from diffcli.errors import ChecksumError, FormatError, InvalidValueError
from diffcli.format_common import (DIGEST_LEN, DIGEST_RE, DTYPE_SIZES, FLOAT_DTYPES, FORMAT_NAME, MAGIC, MAX_HEADER,
                                   PREAMBLE, SHA_RE, canonical_header, check_diff, check_top, check_extra,
                                   check_tensor, choice, error_bound, fail, from_le_bytes, integer, keys, le_bytes,
                                   numel, one_per_base, parse_json, shape_of, sparse_entries, string,
                                   tensor_name)

VERSION = 2
RAW_LEN = struct.Struct("<I")  # after the preamble: the header's JSON length before compression
FRONT = PREAMBLE.size + RAW_LEN.size  # 20 bytes before the compressed header
KINDS = ("sparse", "dense", lowrank.KIND, "basis")  # record kinds this reader knows; later versions add more
STREAMS = ("positions", "values", "scales", "dense")  # payload order
CODECS = ("raw", "zstd")
HEADER_LEVEL = 19  # the header is small: the best level costs milliseconds
STREAM_LEVEL = 1  # data streams: as small as level 19 on int codes, 2.7% larger on fp16 planes, 40-130x faster

_TOP_KEYS = {"format", "version", "producer", "base", "values", "budget_numel", "nnz", "records", "streams",
             "config", "meta"}
_STREAM_KEYS = {"length", "raw_length", "sha256", "codec"}
_FLOAT_VALUE_KEYS = {"quantizer", "max_abs_error", "max_rel_error"}
_BLOCK_VALUE_KEYS = _FLOAT_VALUE_KEYS | {"block"}
_RECORD_LEN = {"sparse": 8, "dense": 4, lowrank.KIND: lowrank.RECORD_LEN, "basis": 6}
_COUNT = {"sparse": 6, "basis": 3}  # field holding a positioned record's number of stored values


def _entries(name: str, td: TensorDiff) -> tuple[np.ndarray, np.ndarray]:
    """(positions int64, values float32) as numpy; order and range are checked for all tensors at once."""
    if td.is_dense:
        idx, vals = sparse_entries(name, td)
        return idx.numpy(), vals.numpy()
    idx = td.indices.detach().reshape(-1)
    vals = td.values.detach().reshape(-1)
    if str(idx.dtype) != "torch.int64" or idx.numel() != vals.numel():
        raise InvalidValueError(f"sparse diff {name!r} needs int64 positions, one per value")
    return idx.numpy(), vals.float().numpy()


def _check_positions(parts: list[np.ndarray], counts: np.ndarray, numels: list[int]) -> None:
    """Every tensor's positions strictly increasing and within its tensor (one vectorised pass)."""
    if not counts.sum():
        return
    pos = np.concatenate(parts)
    ends = np.cumsum(counts)
    firsts = (ends - counts)[counts > 0]
    step_ok = np.ones(pos.size, dtype=bool)
    step_ok[1:] = pos[1:] > pos[:-1]
    step_ok[firsts] = pos[firsts] >= 0
    if not step_ok.all():
        raise InvalidValueError("a sparse diff has unsorted or out-of-range positions")
    if bool((pos[ends[counts > 0] - 1] >= np.asarray(numels, dtype=np.int64)[counts > 0]).any()):
        raise InvalidValueError("a sparse diff has unsorted or out-of-range positions")


def encode(diff: Diff, values: str, producer: str, block: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """Serialise a Diff as version 2; returns the file bytes and size statistics."""
    from diffcli.weights import DIGEST_ALGORITHM

    block = quantize.check_spec(values, block)
    check_diff(diff)
    records: list[list[Any]] = []
    idx_parts: list[np.ndarray] = []  # one per positioned record (sparse, basis)
    value_parts: list[np.ndarray] = []  # one per segment of the values stream: a sparse or basis record, B or A
    value_names: list[str] = []
    factor_seg: list[bool] = []  # which segments hold low-rank factors (no positions: every value stored)
    seg_kind: list[str] = []  # each segment's record kind: only sparse entries coded 0 are dropped
    numels: list[int] = []
    dense: list[bytes] = []
    budget = 0
    for name in sorted(set(diff.tensors) | set(diff.extras)):
        if name in diff.extras:
            dtype, shape = check_extra(name, diff.extras[name])
            dense.append(codec.to_planes(le_bytes(diff.extras[name]), DTYPE_SIZES[dtype]))
            records.append(["dense", name, dtype, list(shape)])
            continue
        td = diff.tensors[name]
        shape = check_tensor(name, td)
        budget += numel(shape) if td.dtype in FLOAT_DTYPES else 0
        if td.is_lowrank:
            record, parts = lowrank.encode_record(name, td)
            records.append(record)
            value_parts += parts
            value_names += [name, name]
            factor_seg += [True, True]
            seg_kind += [lowrank.KIND, lowrank.KIND]
            if name in diff.bases:
                raise InvalidValueError(f"diff {name!r} has both a low-rank δ and basis scales; a tensor takes one")
            continue
        idx, vals = _entries(name, td)
        idx_parts.append(idx)
        value_parts.append(vals)
        value_names.append(name)
        factor_seg.append(False)
        seg_kind.append("sparse")
        numels.append(numel(shape))
        records.append(["sparse", name, None if td.base_name == name else td.base_name, td.dtype, list(shape),
                        td.digest, 0, 0])
        if name in diff.bases:  # basis scales: kept indices in the positions stream, a − 1 in the values stream
            idx, vals = _basis_entries(name, td, shape, diff.bases[name])
            idx_parts.append(idx)
            value_parts.append(vals)
            value_names.append(name)
            factor_seg.append(False)
            seg_kind.append("basis")
            numels.append(diff.bases[name].rank)
            records.append(["basis", name, diff.bases[name].rank, 0, 0, list(diff.bases[name].probe)])
    all_values = np.concatenate(value_parts) if value_parts else np.zeros(0, np.float32)
    if not np.isfinite(all_values).all():
        bad = next(n for n, v in zip(value_names, value_parts) if not np.isfinite(v).all())
        raise InvalidValueError(f"diff {bad!r} holds NaN or infinite values")
    count_arr = np.asarray([v.size for v in value_parts], dtype=np.int64)
    _check_positions(idx_parts, np.asarray([p.size for p in idx_parts], dtype=np.int64), numels)
    # sparse entries coded 0 add nothing: dropped from the positions, the scales refit to the rest (low-rank
    # factors keep every entry: B·A needs them all; a basis scale coded 0 stays: dropping it would prune its basis)
    q, keep, kept_counts = quantize.quantize_stored(all_values, count_arr, values, block,
                                                    droppable=np.asarray([k == "sparse" for k in seg_kind], dtype=bool))
    if not keep.all():
        ends = np.cumsum(count_arr)[~np.asarray(factor_seg, dtype=bool)]
        idx_parts = [p[keep[e - p.size:e]] for p, e in zip(idx_parts, ends.tolist())]
    count_arr = kept_counts
    block = quantize.fit_block(block, count_arr)
    nnz = int(count_arr.sum())  # every stored value: sparse entries, low-rank factors, basis scales
    if nnz and not np.isfinite(q.values).all():
        raise InvalidValueError(f"the diff has values beyond the {values} range", hint="pack with --values bf16 or fp32")
    if q.max_abs_error > quantize.error_limit(q.values, q.scales, count_arr, values, block):  # what readers check
        raise InvalidValueError(f"the diff has values the {values} quantizer cannot store within its error bound",
                                hint="pack with --values bf16 or fp32")
    streams = iter(codec.encode_many([p for p in idx_parts if p.size]))
    positions = []
    positioned = [c for c, f in zip(count_arr.tolist(), factor_seg) if not f]
    for rec, k in zip([r for r in records if r[0] in _COUNT], positioned):
        rec[_COUNT[rec[0]]] = k
        if k:
            positions.append(next(streams))
            rec[_COUNT[rec[0]] + 1] = len(positions[-1])
    vsize = quantize.FLOAT_QUANTIZERS.get(values, 1)
    # positions: zstd only when it is smaller (clustered positions, e.g. whole rows an L0 run kept; random ones are not)
    stored = {"positions": codec.compress(b"".join(positions), 1, level=STREAM_LEVEL),
              "values": codec.compress(q.codes, vsize, level=STREAM_LEVEL),
              "scales": codec.compress(codec.to_planes(q.scales.astype("<f4").view(np.uint8), 4), 4,
                                       level=STREAM_LEVEL),
              "dense": codec.compress(b"".join(dense), 1, level=STREAM_LEVEL)}
    raw_len = {"positions": sum(len(p) for p in positions), "values": len(q.codes), "scales": 4 * q.scales.size,
               "dense": sum(len(d) for d in dense)}
    value_info: dict[str, Any] = {"quantizer": values, "max_abs_error": q.max_abs_error,
                                  "max_rel_error": q.max_rel_error}
    if block:
        value_info["block"] = block
    header = {"format": FORMAT_NAME, "version": VERSION, "producer": producer,
              "base": {"ref": diff.base_ref, "fingerprint": diff.base_fingerprint, "digest": DIGEST_ALGORITHM},
              "values": value_info, "budget_numel": budget, "nnz": nnz, "records": records,
              "streams": {s: {"length": len(stored[s][1]), "raw_length": raw_len[s],
                              "sha256": hashlib.sha256(stored[s][1]).hexdigest(), "codec": stored[s][0]}
                          for s in STREAMS},
              "config": diff.config, "meta": diff.meta}
    text = canonical_header(header)
    frame = codec.compress(text, 1, level=HEADER_LEVEL, force=True)[1]
    front = PREAMBLE.pack(MAGIC, VERSION, 0, len(frame)) + RAW_LEN.pack(len(text)) + frame
    parts = [front, hashlib.sha256(front).digest()] + [stored[s][1] for s in STREAMS]
    stats = {"header_bytes": len(front) + DIGEST_LEN, "index_bytes": len(stored["positions"][1]),
             "values_bytes": len(stored["values"][1]) + len(stored["scales"][1]),
             "extras_bytes": len(stored["dense"][1]), "max_abs_error": q.max_abs_error,
             "max_rel_error": q.max_rel_error, "nnz": nnz, "budget_numel": budget, "block": block or None}
    return b"".join(parts), stats


# ----------------------------------------------------------------------------------------------- reading

def _stream(v: Any, name: str, raw_lo: int, raw_hi: int) -> dict:
    where = f"streams.{name}"
    s = keys(v, _STREAM_KEYS, where)
    integer(s["length"], f"{where}.length", 1 << 62)
    integer(s["raw_length"], f"{where}.raw_length", 1 << 62)
    string(s["sha256"], f"{where}.sha256", 64, 64, SHA_RE)
    choice(s["codec"], CODECS, f"{where}.codec")
    if not raw_lo <= s["raw_length"] <= raw_hi:
        raise fail(f"{where}.raw_length {s['raw_length']} is not the {raw_lo} bytes its records imply"
                   if raw_lo == raw_hi else
                   f"{where}.raw_length {s['raw_length']} is not what its records imply ({raw_lo}..{raw_hi})")
    if s["codec"] == "raw" and s["length"] != s["raw_length"]:
        raise fail(f"{where} is stored raw but its length differs from raw_length")
    if s["codec"] == "zstd" and s["raw_length"] > codec.ZSTD_MAX_RATIO * s["length"]:
        raise fail(f"{where} declares {s['raw_length']} bytes from {s['length']}: beyond any zstd frame")
    return s


def _values(v: Any) -> tuple[str, int]:
    if not isinstance(v, dict):
        raise fail("values must be an object")
    q = v.get("quantizer")
    if not isinstance(q, str) or q not in quantize.QUANTIZERS:
        raise FormatError(f"unknown value quantizer {str(q)[:40]!r}; this diffprune knows "
                          f"{', '.join(quantize.QUANTIZERS)}", hint="upgrade diffprune to read this file")
    keys(v, _BLOCK_VALUE_KEYS if q in quantize.BLOCK_QUANTIZERS else _FLOAT_VALUE_KEYS, "values")
    error_bound(v["max_abs_error"], "values.max_abs_error", q == "fp32")
    error_bound(v["max_rel_error"], "values.max_rel_error", q == "fp32")
    block = 0
    if q in quantize.BLOCK_QUANTIZERS:
        block = v["block"]
        if type(block) is not int or block < 1:
            raise fail(f"values.block {block!r} must be an integer ≥ 1")
    return q, block


def _basis_entries(name: str, td: TensorDiff, shape: tuple[int, ...], bs) -> tuple[np.ndarray, np.ndarray]:
    """(kept basis indices int64, a − 1 float32) of a basis record, checked as the reader will check them."""
    from diffcli.svd_basis import check_scales

    check_scales(name, shape, td.dtype, bs, InvalidValueError)
    return bs.kept.detach().reshape(-1).numpy(), bs.values.detach().reshape(-1).float().numpy()


def _counted(count: Any, length: Any, n: int, where: str, field: str, what: str) -> tuple[int, int]:
    """A record's stored count (at most its n entries or bases) and the bytes of its position stream."""
    k = integer(count, f"{where}.{field}")
    if k > n:
        raise fail(f"{where}.{field} {k} exceeds its {n} {what}")
    plen = integer(length, f"{where} positions length", 1 << 62)
    lo, hi = codec.positions_raw_bounds(k, n) if k else (0, 0)
    if not lo <= plen <= hi:
        raise fail(f"{where} positions length {plen} is outside {lo}..{hi} for {k} positions")
    return k, plen


def _basis_record(r: Any, i: int, prev: tuple[str, dict[str, Any]] | None) -> tuple[str, dict[str, Any]]:
    """A basis record: right after the sparse record of the same 2-D float tensor, rank = min(out, in)."""
    from diffcli.svd_basis import PROBES

    where = f"records[{i}]"
    if len(r) != _RECORD_LEN["basis"]:
        raise fail(f"{where} (basis) must have {_RECORD_LEN['basis']} fields")
    name = tensor_name(r[1], f"{where} name")
    if prev is None or prev[0] != name or prev[1]["kind"] != "sparse":
        raise fail(f"{where} basis record {name!r} must follow the sparse record of the same name")
    shape, dtype = prev[1]["shape"], prev[1]["dtype"]
    where = f"records[{name!r}] (basis)"
    if len(shape) != 2 or dtype not in FLOAT_DTYPES:
        raise fail(f"{where} needs a 2-D float tensor, not {dtype} {list(shape)}")
    rank = integer(r[2], f"{where}.rank", 1 << 62)
    if rank != min(shape):
        raise fail(f"{where}.rank {rank} is not min(out, in) = {min(shape)} of its {shape[0]}×{shape[1]} tensor")
    kept, plen = _counted(r[3], r[4], rank, where, "kept", "bases")
    probe = r[5]
    if (not isinstance(probe, list) or len(probe) != PROBES
            or not all(type(p) in (int, float) and math.isfinite(p) for p in probe)):
        raise fail(f"{where}.probe must be {PROBES} finite numbers")
    return name, {"kind": "basis", "rank": rank, "nnz": kept, "positions": plen, "probe": [float(p) for p in probe],
                  "counts": [kept]}


def _record(r: Any, i: int, prev: str | None) -> tuple[str, dict[str, Any]]:
    where = f"records[{i}]"
    if not isinstance(r, list) or not r or not isinstance(r[0], str):
        raise fail(f"{where} must be a list starting with its kind")
    if r[0] not in KINDS:
        raise FormatError(f"{where} has record kind {r[0][:40]!r}, which this diffprune does not know "
                          f"({', '.join(KINDS)})", hint="upgrade diffprune to read this file")
    if len(r) != _RECORD_LEN[r[0]]:
        raise fail(f"{where} ({r[0]}) must have {_RECORD_LEN[r[0]]} fields")
    name = tensor_name(r[1], f"{where} name")
    if prev is not None and not prev < name:
        raise fail(f"{where} name {name!r} is not after {prev!r}: records must be sorted with unique names")
    where = f"records[{name!r}]"
    if r[0] == "dense":
        shape = shape_of(r[3], where)
        return name, {"kind": "dense", "dtype": choice(r[2], DTYPE_SIZES, f"{where}.dtype"), "shape": shape}
    base = name if r[2] is None else tensor_name(r[2], f"{where} base")
    dtype = choice(r[3], DTYPE_SIZES, f"{where}.dtype")
    shape = shape_of(r[4], where)
    digest = string(r[5], f"{where}.digest", 32, 32, DIGEST_RE)
    if r[0] == lowrank.KIND:
        return name, lowrank.parse_record(r, where, base, dtype, shape, digest)
    nnz, plen = _counted(r[6], r[7], numel(shape), where, "nnz", "entries")
    return name, {"kind": "sparse", "base": base, "dtype": dtype, "shape": shape, "digest": digest, "nnz": nnz,
                  "positions": plen, "counts": [nnz]}


def validate_header(h: Any, payload_size: int) -> list[tuple[str, dict[str, Any]]]:
    """Check a parsed version-2 header against every rule of the spec; returns its records in order."""
    check_top(h, _TOP_KEYS, VERSION)
    quantizer, block = _values(h["values"])
    if not isinstance(h["records"], list) or not isinstance(h["streams"], dict):
        raise fail("records must be a list and streams an object")
    records, prev = [], None
    for i, r in enumerate(h["records"]):
        if isinstance(r, list) and r and r[0] == "basis":
            records.append(_basis_record(r, i, records[-1] if records else None))
            continue
        prev, rec = _record(r, i, prev)
        records.append((prev, rec))
    updates = [rec for _n, rec in records if rec["kind"] in ("sparse", lowrank.KIND)]  # one per base tensor
    one_per_base([(n, rec["base"]) for n, rec in records if rec["kind"] in ("sparse", lowrank.KIND)], "records")
    coded = [rec for _n, rec in records if rec["kind"] != "dense"]  # every record in the values stream
    budget = sum(numel(rec["shape"]) for rec in updates if rec["dtype"] in FLOAT_DTYPES)
    counts = _value_counts(coded)
    nnz = int(counts.sum())  # every stored value: sparse entries, low-rank factors, basis scales
    if integer(h["budget_numel"], "budget_numel", 1 << 62) != budget:
        raise fail(f"budget_numel {h['budget_numel']} is not the {budget} its records imply")
    if integer(h["nnz"], "nnz", 1 << 62) != nnz:
        raise fail(f"nnz {h['nnz']} is not the sum {nnz} of its records")
    if block > max(nnz, 1):
        raise fail(f"values.block {block} is larger than the {nnz} stored values")
    plen = sum(rec["positions"] for rec in coded if rec["kind"] in _COUNT)
    dense = sum(numel(rec["shape"]) * DTYPE_SIZES[rec["dtype"]] for _n, rec in records if rec["kind"] == "dense")
    expect = {"positions": plen, "values": quantize.codes_length(quantizer, nnz),
              "scales": 4 * quantize.scale_count(counts, block), "dense": dense}
    keys(h["streams"], set(STREAMS), "streams")
    total = 0
    for s in STREAMS:
        total += _stream(h["streams"][s], s, expect[s], expect[s])["length"]
    if total > payload_size:
        raise FormatError(f"the streams run past the end of the file by {total - payload_size} bytes (truncated?)")
    if total != payload_size:
        raise FormatError(f"{payload_size - total} unexpected bytes after the last stream")
    return records


def front_length(hlen: int) -> int:
    """Bytes after the 16-byte preamble that read_header needs: raw length, header frame, digest."""
    return RAW_LEN.size + hlen + DIGEST_LEN


def parse_front(front: memoryview, file_size: int, source: str, hlen: int) -> tuple[dict, list, int]:
    """After a valid preamble: header digest, bounded decompression, strict JSON, header rules."""
    payload_start = FRONT + hlen + DIGEST_LEN
    if file_size < payload_start or len(front) < payload_start:
        raise FormatError(f"{source} is truncated inside its header")
    if hashlib.sha256(front[:FRONT + hlen]).digest() != front[FRONT + hlen:payload_start]:
        raise ChecksumError(f"{source}: header checksum mismatch")
    raw_len = RAW_LEN.unpack_from(front, PREAMBLE.size)[0]
    if raw_len > MAX_HEADER or raw_len > codec.ZSTD_MAX_RATIO * hlen:
        raise FormatError(f"{source} declares a {raw_len}-byte header from {hlen} bytes; the limit is {MAX_HEADER}")
    text = codec.decompress("zstd", front[FRONT:FRONT + hlen], raw_len)
    header = parse_json(text, source)
    records = validate_header(header, file_size - payload_start)
    return header, records, payload_start


def decode(view: memoryview, source: str, hlen: int) -> tuple[dict, Diff]:
    """Parse, check every checksum and bound, and decode a whole version-2 file held in memory."""
    import torch

    header, records, start = parse_front(view, len(view), source, hlen)
    raw = {}
    offset = start
    for s in STREAMS:
        sec = header["streams"][s]
        stored = view[offset:offset + sec["length"]]
        offset += sec["length"]
        if hashlib.sha256(stored).digest().hex() != sec["sha256"]:
            raise ChecksumError(f"{source}: checksum mismatch in the {s} stream")
        raw[s] = codec.decompress(sec["codec"], stored, sec["raw_length"])
    quantizer, block = header["values"]["quantizer"], header["values"].get("block", 0)
    counts = _value_counts([rec for _n, rec in records if rec["kind"] != "dense"])
    scales = codec.from_planes(raw["scales"], 4).view("<f4").astype(np.float32, copy=False)
    # the decoded values are the one array here that grows with the file (4 bytes a value); lowrank, sparse and
    # basis records hold views into it, and every pass over it works a chunk at a time (FORMAT.md §3)
    values = quantize.dequantize(raw.pop("values"), scales, counts, quantizer, block)
    if values.size and not quantize.all_finite(values):
        raise FormatError(f"{source}: the values stream holds NaN or infinite values")
    limit = quantize.error_limit(values, scales, counts, quantizer, block)
    if header["values"]["max_abs_error"] > limit:  # the probe check trusts it (§11): a lie must not widen it
        raise FormatError(f"{source}: values.max_abs_error {header['values']['max_abs_error']:.6g} exceeds the "
                          f"{limit:.6g} that its {quantizer} values can be off by")
    stored = [rec for _n, rec in records if rec["kind"] in _COUNT and rec["nnz"]]
    positions = iter(codec.decode_many(raw["positions"], [rec["nnz"] for rec in stored],
                                       [rec["positions"] for rec in stored],
                                       [rec["rank"] if rec["kind"] == "basis" else numel(rec["shape"])
                                        for rec in stored]))
    tensors, extras, bases = {}, {}, {}
    vpos = dpos = 0
    for name, rec in records:
        if rec["kind"] == "dense":
            size = DTYPE_SIZES[rec["dtype"]]
            n = numel(rec["shape"]) * size
            planes = codec.from_planes(raw["dense"][dpos:dpos + n], size)
            extras[name] = from_le_bytes(planes, rec["dtype"], rec["shape"])
            dpos += n
            continue
        if rec["kind"] == lowrank.KIND:
            k = sum(rec["counts"])
            tensors[name] = lowrank.decode_record(rec, values[vpos:vpos + k], source)
            vpos += k
            continue
        k = rec["nnz"]
        if rec["kind"] == "basis":
            kept = torch.from_numpy(next(positions)) if k else torch.zeros(0, dtype=torch.int64)
            bases[name] = BasisScales(rec["rank"], kept, torch.from_numpy(values[vpos:vpos + k]), rec["probe"],
                                      float(header["values"]["max_abs_error"]))
            vpos += k
            continue
        if k == 0:
            tensors[name] = TensorDiff.zeros(rec["base"], rec["shape"], rec["dtype"], rec["digest"])
            continue
        tensors[name] = TensorDiff(rec["base"], rec["shape"], rec["dtype"], rec["digest"],
                                   torch.from_numpy(values[vpos:vpos + k]), torch.from_numpy(next(positions)))
        vpos += k
    diff = Diff(tensors, extras, header["config"], header["base"]["ref"], header["base"]["fingerprint"],
                header["meta"], bases)
    return header, diff


def _value_counts(updates: list[dict[str, Any]]) -> np.ndarray:
    """Values per segment of the values stream, in record order (blocks restart at each segment)."""
    return np.asarray([c for rec in updates for c in rec["counts"]], dtype=np.int64)


def describe(header: dict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per record) and the values and byte split of a v2 header; a record's share of the values
    and scales streams is in proportion to its entries."""
    from diffcli.weights import is_float

    streams = header["streams"]
    nvalues = header["nnz"]  # every stored value (validated against the records)
    per_value = (streams["values"]["length"] + streams["scales"]["length"]) / nvalues if nvalues else 0.0
    dense_raw = streams["dense"]["raw_length"]
    rows = []
    for r in header["records"]:
        if r[0] == "dense":
            n = numel(r[3])
            share = n * DTYPE_SIZES[r[2]] / dense_raw if dense_raw else 0.0
            rows.append({"tensor": r[1], "kind": "dense", "shape": list(r[3]), "numel": n, "nnz": n,
                         "bytes": round(share * streams["dense"]["length"]), "budget": False})
        elif r[0] == lowrank.KIND:
            params = r[6] * (r[4][0] + r[4][1])
            rows.append({"tensor": r[1], "kind": lowrank.KIND, "shape": list(r[4]), "numel": numel(r[4]),
                         "nnz": params, "rank": r[6], "bytes": round(per_value * params), "budget": is_float(r[3])})
        elif r[0] == "basis":  # numel: the bases; nnz: the kept scales (pruned bases cost their absence)
            rows.append({"tensor": r[1], "kind": "basis", "shape": [r[2]], "numel": r[2], "nnz": r[3],
                         "bytes": r[4] + round(per_value * r[3]), "budget": False})
        else:
            rows.append({"tensor": r[1], "kind": "sparse", "shape": list(r[4]), "numel": numel(r[4]), "nnz": r[6],
                         "bytes": r[7] + round(per_value * r[6]), "budget": is_float(r[3])})
    split = {"positions": streams["positions"]["length"],
             "values": streams["values"]["length"] + streams["scales"]["length"], "dense": streams["dense"]["length"]}
    values = {"quantizer": header["values"]["quantizer"], "block": header["values"].get("block"),
              "max_abs_error": header["values"]["max_abs_error"], "max_rel_error": header["values"]["max_rel_error"]}
    return rows, {"values": values, "bytes": split}
