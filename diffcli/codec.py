"""Byte codecs of the packed format: Rice-coded position gaps, byte planes and bounded zstd (docs/FORMAT.md)."""

from __future__ import annotations

import numpy as np

from diffcli.errors import FormatError

ZSTD_LEVEL = 19  # for raw streams up to ZSTD_SLOW_LIMIT; level 19 costs ~1 s per MB on random-ish data
ZSTD_FAST_LEVEL = 3  # beyond it (dense diffs): as small on such data, and ~100x faster
ZSTD_SLOW_LIMIT = 8 << 20
ZSTD_MAX_WINDOW = 1 << 23  # level 19 never uses a larger window; readers refuse larger ones
# A zstd block holds at most 128 KiB and takes at least 4 bytes (3-byte header + 1 RLE byte),
# so no valid frame expands by more than this factor: a hard bound on what a section may declare.
ZSTD_MAX_RATIO = 32768
MAX_RICE = 60  # tensors hold at most 2**60 entries, so a larger parameter is never needed
_CHUNK = 1 << 20  # entries per vectorised bit-packing chunk (a multiple of 8 keeps chunks byte-aligned)


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Strictly increasing positions → gaps: the first position, then differences minus one (all ≥ 0)."""
    gaps = np.empty_like(positions)
    gaps[0] = positions[0]
    np.subtract(positions[1:], positions[:-1], out=gaps[1:])
    gaps[1:] -= 1
    return gaps


def rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter r minimising the coded size k·(r+1) + Σ(g >> r), searched near log2(mean gap)."""
    k = gaps.size
    mean = float(gaps.mean()) if k else 0.0
    guess = int(np.log2(mean + 1.0))
    best, best_bits = 0, None
    for r in range(max(0, guess - 3), min(MAX_RICE, guess + 3) + 1):
        bits = k * (r + 1) + int((gaps >> r).sum())
        if best_bits is None or bits < best_bits:
            best, best_bits = r, bits
    return best


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative ints into `width` bits each, most significant bit first, zero-padded."""
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    parts = []
    for start in range(0, values.size, _CHUNK):
        chunk = values[start:start + _CHUNK]
        bits = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        parts.append(np.packbits(bits.reshape(-1)).tobytes())
    return b"".join(parts)


def _unpack_fixed(data: memoryview | bytes, count: int, width: int) -> np.ndarray:
    """Inverse of _pack_fixed; `data` must be exactly ceil(count·width/8) bytes with zero padding."""
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    buf = np.frombuffer(data, dtype=np.uint8)
    weights = (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    step = _CHUNK  # multiple of 8 entries → each chunk starts on a byte boundary
    for start in range(0, count, step):
        n = min(step, count - start)
        b0 = start * width // 8
        nbits = n * width
        bits = np.unpackbits(buf[b0:b0 + (nbits + 7) // 8])
        if start + n == count and bits[nbits:].any():
            raise FormatError("position stream has non-zero padding bits")
        out[start:start + n] = bits[:nbits].reshape(n, width).astype(np.int64) @ weights
    return out


def encode_positions(positions: np.ndarray) -> bytes:
    """Rice-code sorted flat positions: [r:u8][k remainders of r bits][unary quotients, 0…01]."""
    positions = np.ascontiguousarray(positions, dtype=np.int64)
    if positions.size == 0:
        raise ValueError("no positions to encode")
    gaps = _gaps(positions)
    r = rice_parameter(gaps)
    rem = gaps & ((np.int64(1) << r) - 1)
    quot = gaps >> r
    ends = np.cumsum(quot + 1) - 1  # bit index of each quotient's terminating 1
    nbits = int(ends[-1]) + 1
    qbits = np.zeros(nbits, dtype=np.uint8)
    qbits[ends] = 1
    return bytes([r]) + _pack_fixed(rem, r) + np.packbits(qbits).tobytes()


def positions_raw_bounds(nnz: int, numel: int) -> tuple[int, int]:
    """Smallest and largest byte length a valid position stream of nnz positions in numel can have."""
    lo = 1 + (nnz + 7) // 8
    hi = 1 + (nnz * MAX_RICE + 7) // 8 + (nnz + numel + 7) // 8
    return lo, hi


def decode_positions(raw: bytes | memoryview, nnz: int, numel: int) -> np.ndarray:
    """Decode a Rice position stream, checking structure, padding, order and range; int64 array."""
    raw = memoryview(raw)
    lo, hi = positions_raw_bounds(nnz, numel)
    if not lo <= len(raw) <= hi:
        raise FormatError(f"position stream is {len(raw)} bytes; {nnz} positions need {lo}..{hi}")
    r = raw[0]
    if r > MAX_RICE or (1 << r) > 2 * max(numel, 1):
        raise FormatError(f"position stream has an invalid Rice parameter {r}")
    rem_len = (nnz * r + 7) // 8
    if 1 + rem_len >= len(raw):
        raise FormatError("position stream is truncated")
    qbytes = np.frombuffer(raw[1 + rem_len:], dtype=np.uint8)
    if qbytes[-1] == 0:
        raise FormatError("position stream has trailing bytes")
    ends = np.flatnonzero(np.unpackbits(qbytes))
    if ends.size != nnz:
        raise FormatError(f"position stream holds {ends.size} positions, header says {nnz}")
    quot = np.diff(ends, prepend=-1) - 1
    if int(quot.max()) > (numel >> r):
        raise FormatError("position stream points outside its tensor")
    gaps = (quot << r) | _unpack_fixed(raw[1:1 + rem_len], nnz, r)
    positions = np.cumsum(gaps + 1) - 1
    # Increments are positive, so an int64 wrap-around would show up as a negative position.
    if int(positions.min()) < 0 or int(positions[-1]) >= numel:
        raise FormatError("position stream points outside its tensor")
    return positions


def to_planes(data: np.ndarray, itemsize: int) -> bytes:
    """Little-endian element bytes → byte planes, most significant plane first."""
    if itemsize == 1:
        return data.tobytes()
    return np.ascontiguousarray(data.reshape(-1, itemsize)[:, ::-1].T).tobytes()


def from_planes(data: bytes | memoryview, itemsize: int) -> np.ndarray:
    """Byte planes → little-endian element bytes (uint8 array, a fresh writable copy)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if itemsize == 1:
        return buf.copy()
    return np.array(buf.reshape(itemsize, -1).T[:, ::-1], order="C", copy=True).reshape(-1)


def compress(raw: bytes, planes: int = 1) -> tuple[str, bytes]:
    """('zstd', frame) when zstd is smaller, else ('raw', raw): never worse than storing.

    With `planes` > 1 the stream is that many equal byte planes and each gets its own zstd blocks
    (a block flush between planes), so the compressible sign/exponent plane keeps its own entropy
    tables and the near-random low planes fall back to stored blocks: about 8% smaller on fp16 values.
    """
    import zstandard

    if not raw:
        return "raw", raw
    level = ZSTD_LEVEL if len(raw) <= ZSTD_SLOW_LIMIT else ZSTD_FAST_LEVEL
    cobj = zstandard.ZstdCompressor(level=level, write_checksum=False, write_content_size=True) \
        .compressobj(size=len(raw))
    step = len(raw) // planes if planes > 1 and len(raw) % planes == 0 else len(raw)
    parts = []
    for start in range(0, len(raw), step):
        parts.append(cobj.compress(raw[start:start + step]))
        if start + step < len(raw):
            parts.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    parts.append(cobj.flush())
    frame = b"".join(parts)
    return ("zstd", frame) if len(frame) < len(raw) else ("raw", raw)


def decompress(codec: str, stored: bytes | memoryview, raw_length: int) -> bytes | memoryview:
    """Undo `compress`, producing exactly raw_length bytes; never allocates more than that."""
    if codec == "raw":
        if len(stored) != raw_length:
            raise FormatError(f"stored section is {len(stored)} bytes, declared {raw_length}")
        return stored
    if codec != "zstd":
        raise FormatError(f"unknown codec {codec!r}")
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    try:
        reader = dctx.stream_reader(stored, read_across_frames=False)
        out = reader.read(raw_length + 1) if raw_length else b""
        extra = reader.read(1)
    except zstandard.ZstdError as exc:
        raise FormatError(f"corrupt zstd frame: {exc}") from None
    if len(out) != raw_length:
        raise FormatError(f"zstd frame decodes to {'more' if len(out) > raw_length else 'fewer'} "
                          f"bytes than the declared {raw_length}")
    if extra:
        raise FormatError("zstd section has trailing data")
    return out
