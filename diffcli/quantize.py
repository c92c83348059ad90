"""Value quantizers of packed format v2: float casts, block-absmax int8/int4 and block ternary (docs/FORMAT.md §5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffcli.codec import DECODE_CHUNK, chunk_segments
from diffcli.errors import FormatError, InvalidValueError

FLOAT_QUANTIZERS = {"fp16": 2, "bf16": 2, "fp32": 4}  # name → bytes per value
BLOCK_QUANTIZERS = {"int8": 127, "int4": 7, "ternary": 1}  # name → largest |code|
QUANTIZERS = tuple(FLOAT_QUANTIZERS) + tuple(BLOCK_QUANTIZERS)
DEFAULT_BLOCK = {"int8": 256, "int4": 64, "ternary": 256}
TERNARY_THRESHOLD = 0.7  # Δ = 0.7·mean|v| per block (Li & Liu 2016, ternary weight networks)


@dataclass
class Quantized:
    """What the writer stores (`codes`, `scales`) and what a reader will get back (`values`, float32)."""

    codes: bytes
    scales: np.ndarray
    values: np.ndarray
    max_abs_error: float
    max_rel_error: float
    codes_int: np.ndarray | None = None  # the integer codes of block quantizers


def check_spec(quantizer: str, block: int | None) -> int:
    """The block size a quantizer will use (0 for float casts), or an InvalidValueError for a bad request."""
    if quantizer not in QUANTIZERS:
        raise InvalidValueError(f"--values {quantizer!r} is not one of {', '.join(QUANTIZERS)}")
    if quantizer in FLOAT_QUANTIZERS:
        if block is not None:
            raise InvalidValueError(f"--block applies to int8, int4 and ternary, not to {quantizer}")
        return 0
    block = DEFAULT_BLOCK[quantizer] if block is None else block
    if type(block) is not int or not 1 <= block <= 1 << 30:
        raise InvalidValueError(f"--block {block!r} must be an integer in 1..{1 << 30}")
    return block


def codes_length(quantizer: str, nnz: int) -> int:
    """Bytes of the raw values stream for `nnz` values."""
    if quantizer in FLOAT_QUANTIZERS:
        return nnz * FLOAT_QUANTIZERS[quantizer]
    return {"int8": nnz, "int4": (nnz + 1) // 2, "ternary": (nnz + 3) // 4}[quantizer]


def block_starts(counts: np.ndarray, block: int) -> np.ndarray:
    """Start index of every block: blocks of `block` values, restarting at each tensor (counts > 0 only)."""
    counts = counts[counts > 0].astype(np.int64)
    if counts.size == 0:
        return np.zeros(0, dtype=np.int64)
    nblocks = -(-counts // block)
    first_block = np.cumsum(nblocks) - nblocks
    starts = np.full(int(nblocks.sum()), block, dtype=np.int64)  # steps from the block before: `block` within a
    starts[first_block[1:]] = counts[:-1] - (nblocks[:-1] - 1) * block  # tensor, its last block's size after it
    starts[0] = 0
    return np.cumsum(starts, out=starts)  # one int64 a block, no temporaries of that size


def scale_count(counts: np.ndarray, block: int) -> int:
    """Number of scales the blocks of these per-tensor value counts need."""
    return int((-(-counts.astype(np.int64) // block)).sum()) if block else 0


def _float_codes(values: np.ndarray, quantizer: str) -> tuple[bytes, np.ndarray]:
    import torch

    from diffcli.codec import to_planes

    if values.size == 0:
        return b"", values
    t = torch.from_numpy(values)
    if quantizer == "fp32":
        cast = t
    else:
        cast = t.to(torch.float16 if quantizer == "fp16" else torch.bfloat16)
    size = FLOAT_QUANTIZERS[quantizer]
    le = cast.view(torch.uint8).numpy() if size > 1 else cast.numpy()
    return to_planes(le, size), cast.to(torch.float32).numpy()


def _block_ids(n: int, starts: np.ndarray) -> np.ndarray:
    lengths = np.diff(np.append(starts, n))
    return np.repeat(np.arange(starts.size, dtype=np.int64), lengths)


def quantize(values: np.ndarray, counts: np.ndarray, quantizer: str, block: int, refit: bool = False) -> Quantized:
    """Quantize the concatenated float32 values of tensors holding `counts` values each (in order).

    `refit`: the values are what a first pass kept (codes ≠ 0); ternary then keeps them all (threshold 0),
    each block's scale being the mean |v| of its values."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    n = values.size
    if quantizer in FLOAT_QUANTIZERS:
        codes, back = _float_codes(values, quantizer)
        scales = np.zeros(0, dtype=np.float32)
    else:
        starts = block_starts(counts, block)
        ids = _block_ids(n, starts)
        mag = np.abs(values)
        if quantizer == "ternary":
            per = np.diff(np.append(starts, n)).astype(np.float32)
            factor = 0.0 if refit else TERNARY_THRESHOLD
            thr = (factor * np.add.reduceat(mag, starts) / per).astype(np.float32) if n else per
            kept = mag > thr[ids]
            count = np.add.reduceat(kept.astype(np.int64), starts) if n else np.zeros(0, np.int64)
            total = np.add.reduceat(np.where(kept, mag, 0), starts) if n else np.zeros(0, np.float32)
            scales = np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)
            q = (np.sign(values) * kept).astype(np.int8)
        else:
            top = BLOCK_QUANTIZERS[quantizer]
            absmax = np.maximum.reduceat(mag, starts) if n else np.zeros(0, np.float32)
            scales = np.where(absmax > 0, absmax / np.float32(top), 1.0).astype(np.float32)
            scales[scales <= 0] = np.float32(np.finfo(np.float32).tiny)  # a subnormal block max: round to 0s
            q = np.clip(np.rint(values / scales[ids]), -top, top).astype(np.int8)
        scales[~np.isfinite(scales) | (scales <= 0)] = np.float32(np.finfo(np.float32).tiny)
        codes = pack_codes(q, quantizer)
        back = q.astype(np.float32) * scales[ids]
    max_abs, max_rel = errors(values, back, counts)
    return Quantized(codes, scales, back, max_abs, max_rel, None if quantizer in FLOAT_QUANTIZERS else q)


def fit_block(block: int, counts: np.ndarray) -> int:
    """The block size stored: 0 for float casts, else the requested size but never more than the values."""
    return min(block, max(int(counts.sum()), 1)) if block else 0


def quantize_stored(values: np.ndarray, counts: np.ndarray, quantizer: str, block: int,
                    droppable: np.ndarray | None = None) -> tuple[Quantized, np.ndarray, np.ndarray]:
    """What a v2 file stores for these values (docs/FORMAT.md §5): quantize; in `droppable` segments (default all)
    entries coded 0 add nothing, so they are dropped and the scales refit to the rest (a second pass).

    Returns the Quantized kept values (its errors measured against all of `values`), the keep mask and the kept
    count per segment."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    counts = np.asarray(counts, dtype=np.int64)
    q = quantize(values, counts, quantizer, fit_block(block, counts))
    if q.codes_int is None or not values.size or q.codes_int.all():
        return q, np.ones(values.size, dtype=bool), counts
    drop = np.ones(counts.size, dtype=bool) if droppable is None else np.asarray(droppable, dtype=bool)
    keep = (q.codes_int != 0) | np.repeat(~drop, counts)
    seg = np.repeat(np.arange(counts.size), counts)
    kept_counts = np.bincount(seg[keep], minlength=counts.size).astype(np.int64)
    q2 = quantize(values[keep], kept_counts, quantizer, fit_block(block, kept_counts), refit=True)
    back = np.zeros_like(values)
    back[keep] = q2.values
    q2.max_abs_error, q2.max_rel_error = errors(values, back, counts)
    return q2, keep, kept_counts


def errors(values: np.ndarray, back: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """max |v − v′|, and the largest over tensors of max |v − v′| / max |v| (0 for an all-zero tensor)."""
    if not values.size:
        return 0.0, 0.0
    err = np.abs(values - back)
    tstarts = (np.cumsum(counts) - counts)[counts > 0].astype(np.int64)
    top_err = np.maximum.reduceat(err, tstarts)
    top_val = np.maximum.reduceat(np.abs(values), tstarts)
    rel = np.where(top_val > 0, top_err / np.where(top_val > 0, top_val, 1), 0)
    return float(err.max()), float(rel.max())


ERROR_MARGIN = 2.0 ** -10  # relative slack of the block quantizers' bound: float32 rounding of v/s, q·s and means
ERROR_FLOOR = 2.0 ** -100  # absolute slack: a subnormal scale rounds by up to 2^-150 per code step
_HALF_ULP = {"fp16": (11, -14, 2.0 ** -25), "bf16": (8, -126, 2.0 ** -134)}  # bits kept, smallest normal, below it


def error_limit(values: np.ndarray, scales: np.ndarray, counts: np.ndarray, quantizer: str, block: int) -> float:
    """The largest max_abs_error the decoded `values` (and their block scales) allow (docs/FORMAT.md §5)."""
    import math

    n = int(values.size)
    if quantizer in FLOAT_QUANTIZERS:  # fp32 exact; fp16/bf16: half a unit in the last place of the largest value
        if quantizer == "fp32" or n == 0:
            return 0.0
        bits, smallest, below = _HALF_ULP[quantizer]
        top = max(float(values.max()), -float(values.min()))  # max |v| without a copy of the values
        return below if top < 2.0 ** smallest else math.ldexp(1.0, math.frexp(top)[1] - 1 - bits)
    if n == 0:  # every entry dropped: only entries too small for their block scale (below 2^-142) can be
        return ERROR_FLOOR
    starts = block_starts(counts, block)
    coded = np.zeros(starts.size, dtype=np.int64)  # per block, q·s ≠ 0 exactly where q ≠ 0 (s > 0)
    for lo in range(0, n, DECODE_CHUNK):
        b0, b1, edges = chunk_segments(starts, lo, min(lo + DECODE_CHUNK, n))
        nonzero = values[lo:lo + DECODE_CHUNK] != 0
        if b1 - b0 == 1:
            coded[b0] += np.count_nonzero(nonzero)
        else:
            coded[b0:b1] += np.add.reduceat(nonzero, edges, dtype=np.int64)
    scale = scales.astype(np.float64)
    if quantizer == "ternary":  # s·(codes ≠ 0): the block's L1 mass, which no entry's error exceeds
        bound = float(np.multiply(scale, coded, out=scale).max())
    else:  # round to nearest: half a step of the coarsest block that codes anything
        bound = float(np.max(scale, where=coded > 0, initial=-np.inf)) / 2 if bool(coded.any()) else 0.0
    return bound * (1 + ERROR_MARGIN) + ERROR_FLOOR


def pack_codes(q: np.ndarray, quantizer: str) -> bytes:
    """Integer codes → bytes: int8 as is, int4 as q+8 nibbles (high first), ternary as q+1 in 2 bits (MSB first)."""
    if quantizer == "int8":
        return q.astype(np.int8).tobytes()
    per = 2 if quantizer == "int4" else 4
    c = (q.astype(np.int16) + (8 if quantizer == "int4" else 1)).astype(np.uint8)
    pad = (-c.size) % per
    if pad:
        c = np.concatenate([c, np.zeros(pad, dtype=np.uint8)])
    c = c.reshape(-1, per)
    if per == 2:
        return ((c[:, 0] << 4) | c[:, 1]).astype(np.uint8).tobytes()
    return ((c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]).astype(np.uint8).tobytes()


def _decode_codes(raw: bytes | memoryview, n: int, quantizer: str, out: np.ndarray) -> None:
    """Stored codes → their float32 integer values in `out` (chunk by chunk), rejecting codes outside the
    quantizer's range and non-zero padding. Codes: int8 as is, int4 as q+8 nibbles (high first), ternary as
    q+1 in 2 bits (MSB first), the inverse of pack_codes."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if buf.size != codes_length(quantizer, n):
        raise FormatError(f"values stream is {buf.size} bytes; {n} {quantizer} values need "
                          f"{codes_length(quantizer, n)}")
    if quantizer == "int8":
        q = buf.view(np.int8)
        if n and int(q.min()) < -127:
            raise FormatError("values stream holds the int8 code -128, which the format forbids")
        np.copyto(out, q, casting="safe")
        return
    per, offset, bad = (2, 8, 0) if quantizer == "int4" else (4, 1, 3)  # codes a byte, q = code − offset, forbidden
    bits = 8 // per
    if n % per and int(buf[-1]) & ((1 << bits * (per - n % per)) - 1):  # the codes after the last value
        raise FormatError(f"{quantizer} values stream has non-zero padding bits")
    step = DECODE_CHUNK // per  # bytes per chunk
    for b0 in range(0, buf.size, step):
        part = buf[b0:b0 + step]
        c = np.empty((part.size, per), dtype=np.uint8)
        for j in range(per):  # most significant code first
            np.right_shift(part, 8 - bits * (j + 1), out=c[:, j])
            c[:, j] &= (1 << bits) - 1
        c = c.reshape(-1)
        v0 = b0 * per
        k = min(c.size, n - v0)
        c = c[:k]
        if bool((c == bad).any()):
            raise FormatError(f"values stream holds a code outside the {quantizer} range")
        np.subtract(c, np.float32(offset), out=out[v0:v0 + k])  # exact: small integers


def _decode_floats(raw: bytes | memoryview, n: int, quantizer: str) -> np.ndarray:
    """fp16/bf16/fp32 byte planes → float32 values, chunk by chunk into one output array."""
    import torch

    size = FLOAT_QUANTIZERS[quantizer]
    if len(raw) != n * size:
        raise FormatError(f"values stream is {len(raw)} bytes; {n} {quantizer} values need {n * size}")
    out = np.empty(n, dtype=np.float32)
    if not n:
        return out
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(size, n)  # most significant plane first
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[quantizer]
    for lo in range(0, n, DECODE_CHUNK):
        hi = min(lo + DECODE_CHUNK, n)
        le = np.empty((hi - lo, size), dtype=np.uint8)
        for j in range(size):
            le[:, j] = planes[size - 1 - j, lo:hi]
        torch.from_numpy(out[lo:hi]).copy_(torch.from_numpy(le.reshape(-1)).view(dtype))
    return out


def dequantize(raw: bytes | memoryview, scales: np.ndarray, counts: np.ndarray, quantizer: str,
               block: int) -> np.ndarray:
    """The float32 values a stored values stream (and its scales) stands for.

    Memory: the float32 output (4 bytes a value) plus the block starts (8 bytes a scale) and work buffers of
    DECODE_CHUNK values; nothing else grows with the stream (docs/FORMAT.md §3)."""
    n = int(counts.sum())
    if quantizer in FLOAT_QUANTIZERS:
        return _decode_floats(raw, n, quantizer)
    out = np.empty(n, dtype=np.float32)
    _decode_codes(raw, n, quantizer, out)
    starts = block_starts(counts, block)
    if scales.size != starts.size:
        raise FormatError(f"{scales.size} scales for {starts.size} blocks")
    if scales.size and not (np.isfinite(scales).all() and (scales > 0).all()):
        raise FormatError("a scale is NaN, infinite, zero or negative")
    scales = scales.astype(np.float32, copy=False)
    for lo in range(0, n, DECODE_CHUNK):  # code · its block's scale, in float32
        hi = min(lo + DECODE_CHUNK, n)
        b0, b1, edges = chunk_segments(starts, lo, hi)
        part = out[lo:hi]
        if b1 - b0 == 1:
            part *= scales[b0]
        else:
            part *= np.repeat(scales[b0:b1], np.diff(np.append(edges, hi - lo)))
    return out


def all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all(), a chunk at a time."""
    return all(bool(np.isfinite(values[lo:lo + DECODE_CHUNK]).all()) for lo in range(0, values.size, DECODE_CHUNK))
