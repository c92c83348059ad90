"""The packed `.diff` artifact: a deterministic writer and a strict, bounded reader (spec: docs/FORMAT.md)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from diffcli import __version__, codec
from diffcli.diff import Diff, TensorDiff
from diffcli.errors import (BaseMismatchError, ChecksumError, FormatError, InvalidValueError, NotFoundError,
                            UnsupportedVersionError)
from diffcli.outputs import atomic_file, check_output
from diffcli.weights import DIGEST_ALGORITHM

MAGIC = b"DIFFPRUN"
VERSION = 1
FORMAT_NAME = "diffprune"
PRODUCER = f"diffprune {__version__}"
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header length: 16 bytes
DIGEST_LEN = 32
MAX_HEADER = 16 << 20
MAX_NUMEL = 1 << 60
MAX_NDIM = 16
MAX_NAME = 1024
MAX_REF = 4096

VALUE_TYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
               "int64": 8, "uint8": 1, "bool": 1}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
CODECS = ("raw", "zstd")

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")

_TOP_KEYS = {"format", "version", "producer", "base", "values", "budget_numel", "nnz", "max_abs_error",
             "tensors", "extras", "config", "meta"}
_TENSOR_KEYS = {"base", "shape", "dtype", "digest", "nnz", "index", "values"}
_EXTRA_KEYS = {"shape", "dtype", "data"}
_SECTION_KEYS = {"offset", "length", "raw_length", "sha256", "codec"}


@dataclass
class PackReport:
    """What `pack` wrote: sizes by region, ratio against a dense fp32 diff, and the cast error."""

    path: str
    bytes: int
    values: str
    tensors: int
    extras: int
    nnz: int
    budget_numel: int
    density: float
    max_abs_error: float
    dense_fp32_bytes: int
    ratio: float
    header_bytes: int
    index_bytes: int
    values_bytes: int
    extras_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifyReport:
    """What `verify` checked; it raises instead of returning when any check fails."""

    path: str
    bytes: int
    version: int
    producer: str
    values: str
    tensors: int
    extras: int
    nnz: int
    sections: int
    fingerprint: str
    base: str | None = None
    base_tensors_checked: int = 0
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- writing

def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _le_bytes(t: "torch.Tensor") -> "np.ndarray":
    """A tensor's elements as little-endian bytes (flat uint8 numpy array)."""
    import torch

    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    size = flat.element_size()
    data = flat.view(torch.uint8).numpy()
    if sys.byteorder != "little" and size > 1:
        data = data.reshape(-1, size)[:, ::-1].reshape(-1)
    return data


def _from_le_bytes(data: "np.ndarray", dtype: str, shape: tuple[int, ...]) -> "torch.Tensor":
    """Inverse of _le_bytes: a writable uint8 array of little-endian elements → tensor of dtype/shape."""
    import numpy as np
    import torch

    from diffcli.weights import torch_dtype

    size = DTYPE_SIZES[dtype]
    if sys.byteorder != "little" and size > 1:
        data = np.ascontiguousarray(data.reshape(-1, size)[:, ::-1]).reshape(-1)
    raw = torch.from_numpy(data)
    if dtype == "bool":
        if raw.numel() and int(raw.max()) > 1:
            raise FormatError("a bool tensor holds bytes other than 0 and 1")
        return raw.to(torch.bool).reshape(shape)
    return raw.view(torch_dtype(dtype)).reshape(shape)


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) > MAX_NDIM or not all(isinstance(d, int) and d >= 0 for d in shape) \
            or _numel(shape) > MAX_NUMEL:
        raise InvalidValueError(f"{where} has a shape the format cannot hold: {list(shape)}")
    return shape


def _check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        raise InvalidValueError(f"{where} name {name!r} must be a string of 1..{MAX_NAME} characters")


def _sparse_entries(name: str, td: TensorDiff) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(positions int64, values float32) of a tensor diff; dense diffs keep only their nonzeros."""
    import torch

    if td.is_dense:
        flat = td.values.detach().reshape(-1).to(torch.float32)
        if flat.numel() != td.numel:
            raise InvalidValueError(f"dense diff {name!r} has {flat.numel()} entries, its shape needs {td.numel}")
        idx = torch.nonzero(flat, as_tuple=True)[0].to(torch.int64)
        return idx, flat[idx]
    idx = td.indices.detach().reshape(-1)
    vals = td.values.detach().reshape(-1).to(torch.float32)
    if idx.dtype != torch.int64 or idx.numel() != vals.numel():
        raise InvalidValueError(f"sparse diff {name!r} needs int64 positions, one per value")
    if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= td.numel or bool((idx[1:] <= idx[:-1]).any())):
        raise InvalidValueError(f"sparse diff {name!r} has unsorted or out-of-range positions")
    return idx, vals


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _encode(diff: Diff, values: str) -> tuple[bytes, dict[str, int | float]]:
    """Serialise a Diff; returns the file bytes and size statistics."""
    import torch

    from diffcli.weights import torch_dtype

    if values not in VALUE_TYPES:
        raise InvalidValueError(f"--values {values!r} is not one of {', '.join(VALUE_TYPES)}")
    vdtype = torch_dtype(VALUE_TYPES[values])
    vsize = DTYPE_SIZES[VALUE_TYPES[values]]
    if not isinstance(diff.base_ref, str) or len(diff.base_ref) > MAX_REF:
        raise InvalidValueError("the base reference must be a string of at most 4096 characters")
    if not isinstance(diff.base_fingerprint, str) or not _FINGERPRINT_RE.fullmatch(diff.base_fingerprint):
        raise InvalidValueError(f"base fingerprint {diff.base_fingerprint!r} is not 'sha256:' + 64 hex digits")
    clash = sorted(set(diff.tensors) & set(diff.extras))
    if clash:
        raise InvalidValueError(f"{clash[0]!r} is both a diff tensor and an extra")

    sections: list[tuple[dict[str, Any], bytes, str]] = []  # payload order: extras, then tensors

    def section(raw: bytes, kind: str, planes: int = 1) -> dict[str, Any]:
        name, stored = codec.compress(raw, planes)
        sec = {"offset": 0, "length": len(stored), "raw_length": len(raw),
               "sha256": hashlib.sha256(stored).hexdigest(), "codec": name}
        sections.append((sec, stored, kind))
        return sec

    extras: dict[str, Any] = {}
    for name in sorted(diff.extras):
        _check_name(name, "extra")
        t = diff.extras[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPE_SIZES:
            raise InvalidValueError(f"extra {name!r} has dtype {dtype}, which the format cannot store")
        shape = _check_shape(t.shape, f"extra {name!r}")
        data = section(codec.to_planes(_le_bytes(t), DTYPE_SIZES[dtype]), "extras", DTYPE_SIZES[dtype])
        extras[name] = {"shape": list(shape), "dtype": dtype, "data": data}

    tensors: dict[str, Any] = {}
    max_err = 0.0
    nnz_total = 0
    for name in sorted(diff.tensors):
        _check_name(name, "tensor")
        td = diff.tensors[name]
        _check_name(td.base_name, f"base tensor of {name!r}:")
        shape = _check_shape(td.shape, f"tensor {name!r}")
        if td.dtype not in DTYPE_SIZES:
            raise InvalidValueError(f"tensor {name!r} has base dtype {td.dtype}, which the format cannot describe")
        if not isinstance(td.digest, str) or not _DIGEST_RE.fullmatch(td.digest):
            raise InvalidValueError(f"tensor {name!r} has digest {td.digest!r}; expected 32 hex digits")
        idx, vals = _sparse_entries(name, td)
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
            entry["values"] = section(codec.to_planes(_le_bytes(cast), vsize), "values", vsize)
        nnz_total += int(idx.numel())
        tensors[name] = entry

    offset = 0
    for sec, stored, _kind in sections:
        sec["offset"] = offset
        offset += len(stored)
    header = {"format": FORMAT_NAME, "version": VERSION, "producer": PRODUCER,
              "base": {"ref": diff.base_ref, "fingerprint": diff.base_fingerprint, "digest": DIGEST_ALGORITHM},
              "values": values,
              "budget_numel": sum(_numel(tuple(e["shape"])) for e in tensors.values() if e["dtype"] in FLOAT_DTYPES),
              "nnz": nnz_total, "max_abs_error": max_err, "tensors": tensors, "extras": extras,
              "config": diff.config, "meta": diff.meta}
    try:
        text = _canonical(header)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"the diff's config or meta cannot be stored as JSON: {exc}") from None
    if len(text) > MAX_HEADER:
        raise InvalidValueError(f"the header would be {len(text)} bytes; the format allows {MAX_HEADER}")
    pre = PREAMBLE.pack(MAGIC, VERSION, 0, len(text))
    digest = hashlib.sha256(pre + text).digest()
    parts = [pre, text, digest] + [stored for _sec, stored, _kind in sections]
    stats = {"header_bytes": len(pre) + len(text) + DIGEST_LEN, "index_bytes": 0, "values_bytes": 0,
             "extras_bytes": 0, "max_abs_error": max_err, "nnz": nnz_total,
             "budget_numel": header["budget_numel"]}
    for sec, stored, kind in sections:
        stats[f"{kind}_bytes"] += len(stored)
    return b"".join(parts), stats


def _umask_mode(path: Path) -> None:
    """Give a temporary file the mode a plain open() would have (mkstemp makes it owner-only)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def pack(diff: Diff, values: str = "fp16") -> bytes:
    """Serialise a Diff to the packed format; the same Diff always gives the same bytes."""
    return _encode(diff, values)[0]


def write(diff: Diff, out: str | Path, values: str = "fp16", force: bool = False) -> PackReport:
    """Pack `diff` into `out` atomically ("-" writes the bytes to stdout); nothing is left on failure."""
    _check_destination(out, force)
    data, stats = _encode(diff, values)
    if str(out) == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with atomic_file(out, force) as tmp:
            tmp.write_bytes(data)
            _umask_mode(tmp)
    extras_raw = sum(int(t.numel()) * t.element_size() for t in diff.extras.values())
    dense = 4 * int(stats["budget_numel"]) + extras_raw
    budget, nnz = int(stats["budget_numel"]), int(stats["nnz"])
    return PackReport(path=str(out), bytes=len(data), values=values, tensors=len(diff.tensors),
                      extras=len(diff.extras), nnz=nnz, budget_numel=budget, density=nnz / budget if budget else 0.0,
                      max_abs_error=float(stats["max_abs_error"]), dense_fp32_bytes=dense,
                      ratio=dense / len(data), header_bytes=int(stats["header_bytes"]),
                      index_bytes=int(stats["index_bytes"]), values_bytes=int(stats["values_bytes"]),
                      extras_bytes=int(stats["extras_bytes"]))


def pack_checkpoint(ckpt_path: str | Path, out: str | Path, values: str = "fp16", force: bool = False) -> PackReport:
    """`diffprune pack`: read a checkpoint folder (or re-read a .diff) and write the packed file."""
    from diffcli.sources import load_diff

    if values not in VALUE_TYPES:
        raise InvalidValueError(f"--values {values!r} is not one of {', '.join(VALUE_TYPES)}")
    _check_destination(out, force)
    return write(load_diff(ckpt_path), out, values=values, force=force)


def _check_destination(out: str | Path, force: bool) -> None:
    """Fail before any work: an existing file without force, a missing folder, or binary to a terminal."""
    if str(out) != "-":
        check_output(Path(out), force)
    elif sys.stdout.isatty():
        raise InvalidValueError("refusing to write a binary file to the terminal",
                                hint="redirect stdout, or pass -o FILE")


# ----------------------------------------------------------------------------------------------- reading

def _fail(msg: str) -> FormatError:
    return FormatError(f"invalid header: {msg}")


def _keys(obj: Any, keys: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise _fail(f"{where} must be an object")
    if set(obj) != keys:
        extra, missing = sorted(set(obj) - keys), sorted(keys - set(obj))
        raise _fail(f"{where} has unknown keys {extra}" if extra else f"{where} lacks {missing}")
    return obj


def _int(v: Any, where: str, hi: int = MAX_NUMEL) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise _fail(f"{where} must be an integer in 0..{hi}")
    return v


def _str(v: Any, where: str, hi: int, lo: int = 0, pattern: re.Pattern | None = None) -> str:
    if not isinstance(v, str) or not lo <= len(v) <= hi or (pattern is not None and not pattern.fullmatch(v)):
        raise _fail(f"{where} is not a valid string")
    return v


def _choice(v: Any, allowed: Any, where: str) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise _fail(f"{where} {v!r} is not one of {', '.join(allowed)}")
    return v


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise _fail(f"{where}.shape must be a list of at most {MAX_NDIM} sizes")
    shape = tuple(_int(d, f"{where}.shape") for d in v)
    if _numel(shape) > MAX_NUMEL:
        raise _fail(f"{where}.shape has more than 2**60 entries")
    return shape


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
    s = _keys(v, _SECTION_KEYS, where)
    sec = _Section(where, kind, _int(s["offset"], f"{where}.offset", 1 << 62),
                   _int(s["length"], f"{where}.length", 1 << 62),
                   _int(s["raw_length"], f"{where}.raw_length", 1 << 62),
                   _str(s["sha256"], f"{where}.sha256", 64, 64, _SHA_RE), _choice(s["codec"], CODECS, f"{where}.codec"))
    if not raw_lo <= sec.raw_length <= raw_hi:
        raise _fail(f"{where}.raw_length {sec.raw_length} is not what its shape and nnz imply "
                    f"({raw_lo}..{raw_hi})" if raw_lo != raw_hi else
                    f"{where}.raw_length {sec.raw_length} is not the {raw_lo} bytes its shape and nnz imply")
    if sec.codec == "raw" and sec.length != sec.raw_length:
        raise _fail(f"{where} is stored raw but its length differs from raw_length")
    if sec.codec == "zstd" and sec.raw_length > codec.ZSTD_MAX_RATIO * sec.length:
        raise _fail(f"{where} declares {sec.raw_length} bytes from {sec.length}: beyond any zstd frame")
    return sec


def validate_header(h: Any, payload_size: int) -> list[_Section]:
    """Check a parsed header against every rule of the spec; returns its sections in payload order."""
    _keys(h, _TOP_KEYS, "header")
    if h["format"] != FORMAT_NAME:
        raise _fail(f"format must be {FORMAT_NAME!r}")
    if h["version"] != VERSION or type(h["version"]) is not int:
        raise _fail(f"version {h['version']!r} disagrees with the preamble's {VERSION}")
    _str(h["producer"], "producer", 256)
    base = _keys(h["base"], {"ref", "fingerprint", "digest"}, "base")
    if base["digest"] != DIGEST_ALGORITHM:
        raise UnsupportedVersionError(f"tensor digests use {str(base['digest'])[:40]!r}; this diffprune knows "
                                      f"{DIGEST_ALGORITHM!r}")
    _str(base["ref"], "base.ref", MAX_REF)
    _str(base["fingerprint"], "base.fingerprint", 71, 71, _FINGERPRINT_RE)
    _choice(h["values"], VALUE_TYPES, "values")
    vsize = DTYPE_SIZES[VALUE_TYPES[h["values"]]]
    err = h["max_abs_error"]
    if type(err) not in (int, float) or not math.isfinite(err) or err < 0 or (h["values"] == "fp32" and err != 0):
        raise _fail("max_abs_error must be a finite number ≥ 0 (0 for fp32 values)")
    for key in ("config", "meta"):
        if not isinstance(h[key], dict):
            raise _fail(f"{key} must be an object")
    if not isinstance(h["tensors"], dict) or not isinstance(h["extras"], dict):
        raise _fail("tensors and extras must be objects")

    sections: list[_Section] = []
    for name in sorted(h["extras"]):
        where = f"extras[{name!r}]"
        _str(name, where, MAX_NAME, 1)
        e = _keys(h["extras"][name], _EXTRA_KEYS, where)
        shape = _shape(e["shape"], where)
        _choice(e["dtype"], DTYPE_SIZES, f"{where}.dtype")
        raw = _numel(shape) * DTYPE_SIZES[e["dtype"]]
        sections.append(_section(e["data"], f"{where}.data", "extra", raw, raw))
    budget = nnz_total = 0
    for name in sorted(h["tensors"]):
        where = f"tensors[{name!r}]"
        _str(name, where, MAX_NAME, 1)
        if name in h["extras"]:
            raise _fail(f"{name!r} is both a tensor and an extra")
        t = _keys(h["tensors"][name], _TENSOR_KEYS, where)
        _str(t["base"], f"{where}.base", MAX_NAME, 1)
        shape = _shape(t["shape"], where)
        _choice(t["dtype"], DTYPE_SIZES, f"{where}.dtype")
        _str(t["digest"], f"{where}.digest", 32, 32, _DIGEST_RE)
        numel = _numel(shape)
        nnz = _int(t["nnz"], f"{where}.nnz")
        if nnz > numel:
            raise _fail(f"{where}.nnz {nnz} exceeds its {numel} entries")
        if t["dtype"] in FLOAT_DTYPES:
            budget += numel
        nnz_total += nnz
        if nnz == 0:
            if t["index"] is not None or t["values"] is not None:
                raise _fail(f"{where} has nnz 0, so index and values must be null")
            continue
        lo, hi = codec.positions_raw_bounds(nnz, numel)
        sections.append(_section(t["index"], f"{where}.index", "index", lo, hi))
        sections.append(_section(t["values"], f"{where}.values", "values", nnz * vsize, nnz * vsize))
    if _int(h["budget_numel"], "budget_numel", 1 << 62) != budget:
        raise _fail(f"budget_numel {h['budget_numel']} is not the {budget} its tensors imply")
    if _int(h["nnz"], "nnz", 1 << 62) != nnz_total:
        raise _fail(f"nnz {h['nnz']} is not the sum {nnz_total} of its tensors")

    expected = 0
    for sec in sections:
        if sec.offset != expected:
            raise _fail(f"{sec.where} starts at {sec.offset}, expected {expected} (sections must be contiguous)")
        expected += sec.length
        if expected > payload_size:
            raise FormatError(f"{sec.where} runs past the end of the file (truncated?)")
    if expected != payload_size:
        raise FormatError(f"{payload_size - expected} unexpected bytes after the last section")
    return sections


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a double")
    return value


def _parse_front(front: bytes, file_size: int, source: str) -> tuple[dict, list[_Section], int]:
    """Check preamble, header digest and header; `front` holds at least preamble+header+digest."""
    if file_size < PREAMBLE.size:
        raise FormatError(f"{source} is too short to be a packed diff ({file_size} bytes)")
    magic, version, flags, hlen = PREAMBLE.unpack_from(front)
    if magic != MAGIC:
        raise FormatError(f"{source} is not a packed diff (wrong magic bytes)")
    if version != VERSION:
        raise UnsupportedVersionError(f"{source} has format version {version}; this diffprune reads version {VERSION}")
    if flags:
        raise FormatError(f"{source} sets reserved flags {flags:#06x}")
    if hlen > MAX_HEADER:
        raise FormatError(f"{source} declares a {hlen}-byte header; the limit is {MAX_HEADER}")
    payload_start = PREAMBLE.size + hlen + DIGEST_LEN
    if file_size < payload_start or len(front) < payload_start:
        raise FormatError(f"{source} is truncated inside its header")
    text = front[PREAMBLE.size:PREAMBLE.size + hlen]
    if hashlib.sha256(front[:PREAMBLE.size + hlen]).digest() != front[PREAMBLE.size + hlen:payload_start]:
        raise ChecksumError(f"{source}: header checksum mismatch")
    try:
        header = json.loads(bytes(text).decode("utf-8"), object_pairs_hook=_no_duplicates,
                            parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{source}: header is not valid JSON ({type(exc).__name__})") from None
    sections = validate_header(header, file_size - payload_start)
    return header, sections, payload_start


def _open_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise FormatError(f"{path} is a folder, not a packed diff file",
                          hint="pack a checkpoint folder first: diffprune pack FOLDER -o FILE.diff")
    return path


def read_header(path: str | Path) -> dict:
    """The validated header of a packed file, without reading or decoding its payload."""
    path = _open_path(path)
    with open(path, "rb") as fh:
        import os

        size = os.fstat(fh.fileno()).st_size
        front = fh.read(PREAMBLE.size)
        if len(front) == PREAMBLE.size and front[:8] == MAGIC:
            hlen = PREAMBLE.unpack_from(front)[3]
            if hlen <= MAX_HEADER:
                front += fh.read(hlen + DIGEST_LEN)
    return _parse_front(front, size, str(path))[0]


def loads_header(data: bytes) -> dict:
    """The validated header of a packed file held in memory (payload checksums not checked)."""
    view = memoryview(data)
    return _parse_front(view, len(view), "<bytes>")[0]


def _sections_of(header: dict) -> Iterator[tuple[str, str, dict]]:
    """(kind, name, header entry) for every section-bearing entry, in payload order."""
    for name in sorted(header["extras"]):
        yield "extra", name, header["extras"][name]
    for name in sorted(header["tensors"]):
        if header["tensors"][name]["nnz"]:
            yield "index", name, header["tensors"][name]
            yield "values", name, header["tensors"][name]


def _decode(data: bytes | memoryview, source: str) -> tuple[dict, Diff]:
    """Parse, check every checksum and bound, and decode a whole file held in memory."""
    import numpy as np
    import torch

    view = memoryview(data)
    header, sections, start = _parse_front(view, len(view), source)
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
        extras[name] = _from_le_bytes(codec.from_planes(raw[("extra", name)], size), e["dtype"], tuple(e["shape"]))
    tensors = {}
    for name, t in header["tensors"].items():
        shape = tuple(t["shape"])
        if t["nnz"] == 0:
            tensors[name] = TensorDiff.zeros(t["base"], shape, t["dtype"], t["digest"])
            continue
        pos = codec.decode_positions(raw[("index", name)], t["nnz"], _numel(shape))
        vals = _from_le_bytes(codec.from_planes(raw[("values", name)], DTYPE_SIZES[vtype]), vtype, (t["nnz"],))
        vals = vals.to(torch.float32)
        if not np.isfinite(vals.numpy()).all():
            raise FormatError(f"{source}: tensors[{name!r}] holds NaN or infinite values")
        tensors[name] = TensorDiff(t["base"], shape, t["dtype"], t["digest"], vals,
                                   torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64)))
    diff = Diff(tensors, extras, header["config"], header["base"]["ref"], header["base"]["fingerprint"],
                header["meta"])
    return header, diff


def loads(data: bytes) -> Diff:
    """Decode a packed file held in memory, verifying every checksum and bound."""
    return _decode(data, "<bytes>")[1]


def load(path: str | Path) -> Diff:
    """Read and fully verify a packed file into a Diff."""
    path = _open_path(path)
    return _decode(path.read_bytes(), str(path))[1]


def verify(path: str | Path, base: str | None = None) -> VerifyReport:
    """Check a packed file end to end and, with `base`, that it was made on that base; writes nothing."""
    from diffcli.weights import WeightStore, fingerprint, resolve_model, tensor_digest

    path = _open_path(path)
    data = path.read_bytes()
    header, diff = _decode(data, str(path))
    n_sections = sum(2 if t["nnz"] else 0 for t in header["tensors"].values()) + len(header["extras"])
    report = VerifyReport(path=str(path), bytes=len(data), version=VERSION, producer=header["producer"],
                          values=header["values"], tensors=len(diff.tensors), extras=len(diff.extras),
                          nnz=header["nnz"], sections=n_sections, fingerprint=header["base"]["fingerprint"])
    report.checks += ["preamble (magic, version, flags, header length)", "header checksum and schema",
                      f"{n_sections} section checksums and bounds",
                      f"{header['nnz']} positions and values decoded"]
    if base is None:
        return report
    store = WeightStore(resolve_model(base))
    differ: list[tuple[str, str]] = []
    digests = []
    for name in sorted(header["tensors"]):
        t = header["tensors"][name]
        bname = t["base"]
        if bname not in store:
            differ.append((name, f"base has no tensor {bname!r}"))
            continue
        if list(store.shape(bname)) != t["shape"] or store.dtype(bname) != t["dtype"]:
            differ.append((name, f"shape/dtype {list(store.shape(bname))} {store.dtype(bname)} "
                                 f"!= {t['shape']} {t['dtype']}"))
            continue
        digest = tensor_digest(store[bname])
        digests.append(digest)
        if digest != t["digest"]:
            differ.append((name, "content differs"))
    if differ:
        first, why = differ[0]
        raise BaseMismatchError(f"{len(differ)} of {len(header['tensors'])} base tensors differ from the base "
                                f"the diff was made on; first: {first!r} ({why})",
                                hint="pass the base the diff was made on")
    if fingerprint(digests) != header["base"]["fingerprint"]:
        raise BaseMismatchError("the base's fingerprint differs from the one the diff records",
                                hint="pass the base the diff was made on")
    report.base = base
    report.base_tensors_checked = len(digests)
    report.checks.append(f"base {base}: {len(digests)} tensor digests and the fingerprint match")
    return report
