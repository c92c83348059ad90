"""Rules and helpers every version of the packed format shares: limits, strict JSON, field checks, tensor bytes."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from typing import TYPE_CHECKING, Any

from diffcli.diff import Diff, TensorDiff, nonfinite
from diffcli.errors import FormatError, InvalidValueError

if TYPE_CHECKING:
    import numpy as np
    import torch

MAGIC = b"DIFFPRUN"
FORMAT_NAME = "diffprune"
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header length: 16 bytes
DIGEST_LEN = 32
MAX_HEADER = 16 << 20
MAX_NUMEL = 1 << 60
MAX_NDIM = 16
MAX_NAME = 1024
MAX_REF = 4096
RESERVED_NAME = "__metadata__"  # a safetensors header's own key: no tensor may take it

DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
               "int64": 8, "uint8": 1, "bool": 1}
FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}

DIGEST_RE = re.compile(r"[0-9a-f]{32}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")


def numel(shape: tuple[int, ...] | list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------- writing

def le_bytes(t: "torch.Tensor") -> "np.ndarray":
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


def from_le_bytes(data: "np.ndarray", dtype: str, shape: tuple[int, ...]) -> "torch.Tensor":
    """Inverse of le_bytes: a writable uint8 array of little-endian elements → tensor of dtype/shape."""
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


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) > MAX_NDIM or not all(isinstance(d, int) and d >= 0 for d in shape) \
            or numel(shape) > MAX_NUMEL:
        raise InvalidValueError(f"{where} has a shape the format cannot hold: {list(shape)}")
    return shape


def check_name(name: Any, where: str) -> None:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME:
        raise InvalidValueError(f"{where} name {name!r} must be a string of 1..{MAX_NAME} characters")
    if name == RESERVED_NAME:
        raise InvalidValueError(f"{where} name {name!r} is reserved: safetensors headers use it for metadata")


def check_diff(diff: Diff) -> None:
    """What any writer checks first: base reference and fingerprint, no name both tensor and extra, one per base."""
    if not isinstance(diff.base_ref, str) or len(diff.base_ref) > MAX_REF:
        raise InvalidValueError("the base reference must be a string of at most 4096 characters")
    if not isinstance(diff.base_fingerprint, str) or not FINGERPRINT_RE.fullmatch(diff.base_fingerprint):
        raise InvalidValueError(f"base fingerprint {diff.base_fingerprint!r} is not 'sha256:' + 64 hex digits")
    clash = sorted(set(diff.tensors) & set(diff.extras))
    if clash:
        raise InvalidValueError(f"{clash[0]!r} is both a diff tensor and an extra")
    by_base: dict[Any, str] = {}
    for name in sorted(diff.tensors):
        base = diff.tensors[name].base_name
        if isinstance(base, str) and by_base.setdefault(base, name) != name:
            raise InvalidValueError(f"diff tensors {by_base[base]!r} and {name!r} both build on base tensor {base!r}; "
                                    "a base tensor takes one")


def check_tensor(name: str, td: TensorDiff) -> tuple[int, ...]:
    """A tensor diff's name, base name, shape, dtype and digest as a writer must check them; returns the shape."""
    check_name(name, "tensor")
    check_name(td.base_name, f"base tensor of {name!r}:")
    shape = check_shape(td.shape, f"tensor {name!r}")
    if td.dtype not in DTYPE_SIZES:
        raise InvalidValueError(f"tensor {name!r} has base dtype {td.dtype}, which the format cannot describe")
    if not isinstance(td.digest, str) or not DIGEST_RE.fullmatch(td.digest):
        raise InvalidValueError(f"tensor {name!r} has digest {td.digest!r}; expected 32 hex digits")
    return shape


def check_extra(name: str, t: "torch.Tensor") -> tuple[str, tuple[int, ...]]:
    """An extra's name, dtype and shape as a writer must check them; returns (dtype, shape)."""
    check_name(name, "extra")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPE_SIZES:
        raise InvalidValueError(f"extra {name!r} has dtype {dtype}, which the format cannot store")
    if nonfinite(t):  # a diverged head: refused as a NaN δ is
        raise InvalidValueError(f"extra {name!r} holds NaN or infinite values")
    return dtype, check_shape(t.shape, f"extra {name!r}")


def sparse_entries(name: str, td: TensorDiff) -> tuple["torch.Tensor", "torch.Tensor"]:
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


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only, no NaN (so one diff gives one byte string)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def canonical_header(header: dict) -> bytes:
    """The canonical header text, or an InvalidValueError when config/meta cannot be stored or it is too big."""
    try:
        text = canonical(header)
    except (TypeError, ValueError) as exc:
        raise InvalidValueError(f"the diff's config or meta cannot be stored as JSON: {exc}") from None
    if len(text) > MAX_HEADER:
        raise InvalidValueError(f"the header would be {len(text)} bytes; the format allows {MAX_HEADER}")
    return text


# ----------------------------------------------------------------------------------------------- reading

def fail(msg: str) -> FormatError:
    return FormatError(f"invalid header: {msg}")


def keys(obj: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise fail(f"{where} must be an object")
    if set(obj) != allowed:
        extra, missing = sorted(set(obj) - allowed), sorted(allowed - set(obj))
        raise fail(f"{where} has unknown keys {extra}" if extra else f"{where} lacks {missing}")
    return obj


def integer(v: Any, where: str, hi: int = MAX_NUMEL) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise fail(f"{where} must be an integer in 0..{hi}")
    return v


def string(v: Any, where: str, hi: int, lo: int = 0, pattern: re.Pattern | None = None) -> str:
    if not isinstance(v, str) or not lo <= len(v) <= hi or (pattern is not None and not pattern.fullmatch(v)):
        raise fail(f"{where} is not a valid string")
    return v


def one_per_base(pairs: list[tuple[str, str]], what: str) -> None:
    """(name, base name) of every tensor a header lists: two on one base tensor is an error (FORMAT.md §2)."""
    seen: dict[str, str] = {}
    for name, base in pairs:
        if seen.setdefault(base, name) != name:
            raise fail(f"{what} {seen[base]!r} and {name!r} both build on base tensor {base!r}: two records on one "
                       "base tensor")


def tensor_name(v: Any, where: str) -> str:
    """A record's (tensor's) name: 1..1024 characters, not the safetensors header's `__metadata__` key."""
    string(v, where, MAX_NAME, 1)
    if v == RESERVED_NAME:
        raise fail(f"{where} is {v!r}, the key a safetensors header keeps for its metadata (no tensor may take it)")
    return v


def choice(v: Any, allowed: Any, where: str) -> str:
    if not isinstance(v, str) or v not in allowed:
        raise fail(f"{where} {v!r} is not one of {', '.join(allowed)}")
    return v


def shape_of(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise fail(f"{where}.shape must be a list of at most {MAX_NDIM} sizes")
    shape = tuple(integer(d, f"{where}.shape") for d in v)
    if numel(shape) > MAX_NUMEL:
        raise fail(f"{where}.shape has more than 2**60 entries")
    return shape


def error_bound(v: Any, where: str, exact: bool) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or v < 0 or (exact and v != 0):
        raise fail(f"{where} must be a finite number ≥ 0" + (" (0 for fp32 values)" if exact else ""))
    return float(v)


def check_base(base: Any) -> dict:
    """The header's `base` object: ref, fingerprint and the tensor digest algorithm this reader knows."""
    from diffcli.errors import UnsupportedVersionError
    from diffcli.weights import DIGEST_ALGORITHM

    base = keys(base, {"ref", "fingerprint", "digest"}, "base")
    if base["digest"] != DIGEST_ALGORITHM:
        raise UnsupportedVersionError(f"tensor digests use {str(base['digest'])[:40]!r}; this diffprune knows "
                                      f"{DIGEST_ALGORITHM!r}")
    string(base["ref"], "base.ref", MAX_REF)
    string(base["fingerprint"], "base.fingerprint", 71, 71, FINGERPRINT_RE)
    return base


def check_top(h: Any, allowed: set[str], version: int) -> dict:
    """The header's own keys, format name, version, producer, base, config and meta (every version has them)."""
    keys(h, allowed, "header")
    if h["format"] != FORMAT_NAME:
        raise fail(f"format must be {FORMAT_NAME!r}")
    if h["version"] != version or type(h["version"]) is not int:
        raise fail(f"version {h['version']!r} disagrees with the preamble's {version}")
    string(h["producer"], "producer", 256)
    check_base(h["base"])
    for key in ("config", "meta"):
        if not isinstance(h[key], dict):
            raise fail(f"{key} must be an object")
    return h


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in an object")
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


MAX_DIGITS = 4300  # digits of one JSON number (Python's own limit for int text)


def _digits(text: str) -> None:
    if sum(c.isdigit() for c in text) > MAX_DIGITS:
        raise ValueError(f"a number has over {MAX_DIGITS} digits")


def _finite_float(text: str) -> float:
    _digits(text)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows a double")
    return value


def _double_int(text: str) -> int:
    _digits(text)
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise ValueError(f"{text[:40]}... overflows a double") from None
    return value


def parse_json(text: bytes | memoryview, source: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, no number beyond a double or of over 4300 digits."""
    try:
        return json.loads(bytes(text).decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_double_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{source}: header is not valid JSON ({type(exc).__name__})") from None
