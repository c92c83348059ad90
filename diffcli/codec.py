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
DECODE_CHUNK = 1 << 16  # entries per step of a reader's passes (a multiple of 8): work buffers of a few MB at most
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


def chunk_segments(starts: np.ndarray, lo: int, hi: int) -> tuple[int, int, np.ndarray]:
    """Segments s0..s1 that entries lo..hi (hi > lo) of back-to-back segments touch, given their strictly
    increasing `starts` (starts[0] = 0), and where each begins within lo..hi (counted from 0)."""
    s0 = int(np.searchsorted(starts, lo, side="right")) - 1
    s1 = int(np.searchsorted(starts, hi, side="left"))
    edges = starts[s0:s1] - lo
    edges[0] = 0
    return s0, s1, edges


def rice_parameter(gaps: np.ndarray) -> int:
    """The Rice parameter r minimising the coded size k·(r+1) + Σ(g >> r), searched near log2(mean gap)."""
    gaps = np.asarray(gaps, dtype=np.int64)
    one = np.zeros(1, dtype=np.int64)
    return int(_rice_parameters(gaps, one, np.array([gaps.size]), np.zeros(gaps.size, dtype=np.int64))[0])


def _pack_fixed(values: np.ndarray, width: int) -> bytes:
    """Pack non-negative ints into `width` bits each, most significant bit first, zero-padded."""
    if width == 0 or values.size == 0:
        return b""
    if width <= 8:  # 8 values fill `width` whole bytes: build them in one uint64 per group
        n = values.size
        groups = np.zeros((n + 7) // 8 * 8, dtype=np.uint64)
        groups[:n] = values
        shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(width)
        words = np.bitwise_or.reduce(groups.reshape(-1, 8) << shifts, axis=1)
        out = words.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width:]
        return out.tobytes()[:(n * width + 7) // 8]
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
    nbits = count * width
    if nbits % 8 and buf[-1] & ((1 << (8 - nbits % 8)) - 1):
        raise FormatError("position stream has non-zero padding bits")
    if width <= 8:  # each group of 8 values is `width` whole bytes: read them as one big-endian uint64
        groups = (count + 7) // 8
        padded = np.zeros(groups * width, dtype=np.uint8)
        padded[:buf.size] = buf
        words = np.zeros((groups, 8), dtype=np.uint8)
        words[:, 8 - width:] = padded.reshape(groups, width)
        words = words.view(">u8").reshape(groups, 1).astype(np.uint64)
        shifts = np.arange(7, -1, -1, dtype=np.uint64) * np.uint64(width)
        out = (words >> shifts) & np.uint64((1 << width) - 1)
        return out.reshape(-1)[:count].astype(np.int64)
    weights = (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    step = max(8, DECODE_CHUNK // width // 8 * 8)  # multiple of 8 entries → each chunk starts on a byte boundary; its
    # bits (one int64 each in the product below) stay within DECODE_CHUNK
    for start in range(0, count, step):
        n = min(step, count - start)
        b0 = start * width // 8
        bits = np.unpackbits(buf[b0:b0 + (n * width + 7) // 8])
        out[start:start + n] = bits[:n * width].reshape(n, width).astype(np.int64) @ weights
    return out


def encode_positions(positions: np.ndarray) -> bytes:
    """Rice-code sorted flat positions: [r:u8][k remainders of r bits][unary quotients, 0…01]."""
    return encode_many([positions])[0]


def _rice_parameters(gaps: np.ndarray, starts: np.ndarray, counts: np.ndarray, tid: np.ndarray) -> np.ndarray:
    """Per tensor, the r minimising f(r) = k·(r+1) + Σ(g >> r), from r = log2(mean gap + 1) downhill.

    f is convex in r (each step right saves Σ(⌊g/2^r⌋ − ⌊g/2^(r+1)⌋), which shrinks as r grows), so a local
    minimum is the minimum; ties keep the smaller r.
    """
    mean = np.add.reduceat(gaps, starts).astype(np.float64) / counts
    r = np.clip(np.log2(mean + 1.0).astype(np.int64), 0, MAX_RICE)

    def cost(rr: np.ndarray) -> np.ndarray:
        return counts * (rr + 1) + np.add.reduceat(_shift_right(gaps, rr, tid), starts)

    here = cost(r)
    for step in (-1, 1):
        moving = np.ones(r.size, dtype=bool)
        while True:
            cand = np.clip(r + step, 0, MAX_RICE)
            moving &= cand != r
            if not moving.any():
                break
            there = cost(cand)
            better = moving & ((there < here) if step > 0 else (there <= here))
            if not better.any():
                break
            r, here, moving = np.where(better, cand, r), np.where(better, there, here), better
    return r


_EXACT = 1 << 53  # integers below this are exact in float64


def _shift_right(values: np.ndarray, r: np.ndarray, tid: np.ndarray) -> np.ndarray:
    """values >> r[tid] for non-negative values. numpy's shift by a varying count is ~50x slower than a float
    multiply by 2**-r and floor, which is exact below 2**53: `values` may be given as float64 when all are."""
    if values.dtype == np.float64:
        return np.floor(values * np.ldexp(1.0, -r)[tid]).astype(np.int64)
    return values >> r[tid]


def _padded_slots(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each tensor's entries rounded up to a multiple of 8 (so its bit-packed part starts on a byte): sizes, starts."""
    slots = (counts + 7) // 8 * 8
    return slots, np.cumsum(slots) - slots


def encode_many(parts: list[np.ndarray]) -> list[bytes]:
    """Rice-code the sorted positions of several tensors in one vectorised pass; one stream per tensor.

    Raises ValueError for an empty part, unsorted or negative positions (range is the caller's to check).
    """
    counts = np.asarray([p.size for p in parts], dtype=np.int64)
    if counts.size == 0:
        return []
    if not counts.all():
        raise ValueError("no positions to encode")
    pos = np.concatenate([np.asarray(p, dtype=np.int64).reshape(-1) for p in parts])
    starts = np.cumsum(counts) - counts
    gaps = np.empty_like(pos)
    np.subtract(pos[1:], pos[:-1], out=gaps[1:])
    gaps[1:] -= 1
    gaps[starts] = pos[starts]
    if int(gaps.min()) < 0:
        raise ValueError("positions must be non-negative and strictly increasing")
    tid = np.repeat(np.arange(counts.size), counts)
    shiftable = gaps.astype(np.float64) if int(gaps.max()) < _EXACT else gaps
    r = _rice_parameters(shiftable, starts, counts, tid)
    quot = _shift_right(shiftable, r, tid)
    # remainders: tensors grouped by r, each padded to 8 entries so its bytes stand alone
    rem = gaps - quot * (np.int64(1) << r)[tid]
    rem_bytes: list[bytes] = [b""] * counts.size
    for width in np.unique(r).tolist():
        if width == 0:
            continue
        sel = np.flatnonzero(r == width).tolist()
        slots, slot_start = _padded_slots(counts[sel])
        padded = np.zeros(int(slots.sum()), dtype=np.int64)
        for t, s0 in zip(sel, slot_start.tolist()):
            padded[s0:s0 + counts[t]] = rem[starts[t]:starts[t] + counts[t]]
        packed = _pack_fixed(padded, width)
        for t, s0 in zip(sel, (slot_start * width // 8).tolist()):
            rem_bytes[t] = packed[s0:s0 + (int(counts[t]) * width + 7) // 8]
    # quotients: unary, each tensor's bits padded to a whole byte
    step = quot + 1
    total = np.cumsum(step)
    before = np.concatenate([[0], total[starts[1:] - 1]])
    nbits = total[starts + counts - 1] - before
    nbytes = (nbits + 7) // 8
    region = 8 * (np.cumsum(nbytes) - nbytes)
    bits = np.zeros(8 * int(nbytes.sum()), dtype=np.uint8)
    bits[region[tid] + total - 1 - before[tid]] = 1
    qbytes = np.packbits(bits).tobytes()
    q0 = (region // 8).tolist()
    return [bytes([int(r[t])]) + rem_bytes[t] + qbytes[q0[t]:q0[t] + int(nbytes[t])] for t in range(counts.size)]


def positions_raw_bounds(nnz: int, numel: int) -> tuple[int, int]:
    """Smallest and largest byte length a valid position stream of nnz positions in numel can have."""
    lo = 1 + (nnz + 7) // 8
    hi = 1 + (nnz * MAX_RICE + 7) // 8 + (nnz + numel + 7) // 8
    return lo, hi


def decode_positions(raw: bytes | memoryview, nnz: int, numel: int) -> np.ndarray:
    """Decode a Rice position stream, checking structure, padding, order and range; int64 array."""
    return decode_many(raw, [nnz], [len(memoryview(raw))], [numel])[0]


def decode_many(raw: bytes | memoryview, counts: list[int], lengths: list[int], numels: list[int]) -> list[np.ndarray]:
    """Decode back-to-back position streams (tensor t: counts[t] ≥ 1 positions in lengths[t] bytes, < numels[t])
    in one vectorised pass, checking structure, padding, order and range of each; int64 arrays."""
    raw = memoryview(raw)
    if sum(lengths) != len(raw):
        raise FormatError(f"position streams take {len(raw)} bytes, their records say {sum(lengths)}")
    T = len(counts)
    if T == 0:
        return []
    buf = np.frombuffer(raw, dtype=np.uint8)
    rs, rem_at, q_at, q_len = [], [], [], []
    off = 0
    for k, size, n in zip(counts, lengths, numels):
        lo, hi = positions_raw_bounds(k, n)
        if k < 1 or not lo <= size <= hi:
            raise FormatError(f"position stream is {size} bytes; {k} positions need {lo}..{hi}")
        r = raw[off]
        if r > MAX_RICE or (1 << r) > 2 * max(n, 1):
            raise FormatError(f"position stream has an invalid Rice parameter {r}")
        rem_len = (k * r + 7) // 8
        if 1 + rem_len >= size:
            raise FormatError("position stream is truncated")
        if raw[off + size - 1] == 0:
            raise FormatError("position stream has trailing bytes")
        if (k * r) % 8 and raw[off + rem_len] & ((1 << (8 - (k * r) % 8)) - 1):
            raise FormatError("position stream has non-zero padding bits")
        rs.append(r)
        rem_at.append(off + 1)
        q_at.append(off + 1 + rem_len)
        q_len.append(size - 1 - rem_len)
        off += size
    counts_a = np.asarray(counts, dtype=np.int64)
    r_a = np.asarray(rs, dtype=np.int64)
    starts = np.cumsum(counts_a) - counts_a
    q_len_a = np.asarray(q_len, dtype=np.int64)
    qstart = np.cumsum(q_len_a) - q_len_a  # where each tensor's unary quotients begin in qbytes
    qbytes = buf[q_at[0]:q_at[0] + q_len[0]] if T == 1 else np.concatenate(
        [buf[a:a + n] for a, n in zip(q_at, q_len)])
    # Memory: the int64 positions returned (8 bytes each), qbytes (a copy of the quotient bytes) and work buffers
    # of DECODE_CHUNK entries; every pass below goes a chunk at a time (docs/FORMAT.md §3).
    found = np.zeros(T, dtype=np.int64)  # each quotient ends at a 1 bit: one per position
    step = DECODE_CHUNK // 8
    for lo in range(0, qbytes.size, step):
        t0, t1, edges = chunk_segments(qstart, lo, min(lo + step, qbytes.size))
        found[t0:t1] += np.add.reduceat(_POPCOUNT[qbytes[lo:lo + step]], edges, dtype=np.int64)
    if not np.array_equal(found, counts_a):
        t = int(np.flatnonzero(found != counts_a)[0])
        raise FormatError(f"position stream holds {int(found[t])} positions, header says {counts[t]}")
    total = int(counts_a.sum())
    out = np.empty(total, dtype=np.int64)
    k = 0
    for lo in range(0, qbytes.size, step):  # the bit index of every quotient's end, in order
        ends = np.flatnonzero(np.unpackbits(qbytes[lo:lo + step]))
        ends += 8 * lo
        out[k:k + ends.size] = ends
        k += ends.size
    region = 8 * qstart  # bit where each tensor's quotients begin
    numel_a = np.asarray(numels, dtype=np.int64)
    limit = numel_a >> r_a  # quot ≤ numel >> r: the gap quot·2^r + rem then stays below 2^61
    last_end = np.int64(0)
    for lo in range(0, total, DECODE_CHUNK):  # ends → quotients → gaps' high bits, in place
        hi = min(lo + DECODE_CHUNK, total)
        t0, t1, edges = chunk_segments(starts, lo, hi)
        ends = out[lo:hi].copy()
        prev = np.empty_like(ends)
        prev[1:] = ends[:-1]
        prev[0] = last_end
        first = 1 if starts[t0] < lo else 0  # tensors that start in this chunk
        prev[edges[first:]] = region[t0 + first:t1] - 1
        last_end = ends[-1]
        quot = ends - prev - 1
        tid = np.repeat(np.arange(t0, t1), np.diff(np.append(edges, hi - lo)))
        if bool((quot > limit[tid]).any()):
            raise FormatError("position stream points outside its tensor")
        np.left_shift(quot, r_a[tid], out=out[lo:hi])  # below numel: quot ≤ numel >> r was checked
    for width in np.unique(r_a).tolist():  # remainders: a batch of up to DECODE_CHUNK entries at a time
        if width == 0:
            continue
        batch: list[tuple[int, int, int]] = []  # (first entry in out, first remainder byte in buf, entries)
        slots = 0
        for t in np.flatnonzero(r_a == width).tolist():
            for c0 in range(0, counts[t], DECODE_CHUNK):  # pieces of a multiple of 8 entries start on a byte
                m = min(DECODE_CHUNK, counts[t] - c0)
                if batch and slots + m > DECODE_CHUNK:
                    _or_remainders(out, buf, batch, slots, width)
                    batch, slots = [], 0
                batch.append((int(starts[t]) + c0, rem_at[t] + c0 * width // 8, m))
                slots += (m + 7) // 8 * 8
        if batch:
            _or_remainders(out, buf, batch, slots, width)
    run = before = np.int64(0)  # running sum of gap + 1 (modular: exact per tensor even if it wraps); its value
    for lo in range(0, total, DECODE_CHUNK):  # before the current tensor's first entry
        hi = min(lo + DECODE_CHUNK, total)
        t0, t1, edges = chunk_segments(starts, lo, hi)
        part = out[lo:hi]
        part += 1
        np.cumsum(part, out=part)
        part += run
        bases = np.empty(t1 - t0, dtype=np.int64)
        bases[0] = before if starts[t0] < lo else run
        bases[1:] = part[edges[1:] - 1]
        before, run = bases[-1], part[-1]
        part -= 1
        part -= np.repeat(bases, np.diff(np.append(edges, hi - lo)))
        # Increments are positive and below 2**63, so an int64 wrap-around shows up as a negative position.
        if int(part.min()) < 0:
            raise FormatError("position stream points outside its tensor")
    if bool((out[starts + counts_a - 1] >= numel_a).any()):
        raise FormatError("position stream points outside its tensor")
    return np.split(out, (starts[1:]).tolist()) if T > 1 else [out]


def _or_remainders(out: np.ndarray, buf: np.ndarray, batch: list[tuple[int, int, int]], slots: int,
                   width: int) -> None:
    """OR the `width`-bit remainders of a batch of pieces (each padded to 8 entries) into their entries of out."""
    padded = np.zeros(slots * width // 8, dtype=np.uint8)
    s0 = 0
    for _at, src, m in batch:
        n = (m * width + 7) // 8
        padded[s0 * width // 8:s0 * width // 8 + n] = buf[src:src + n]
        s0 += (m + 7) // 8 * 8
    rem = _unpack_fixed(padded, slots, width)
    s0 = 0
    for at, _src, m in batch:
        out[at:at + m] |= rem[s0:s0 + m]
        s0 += (m + 7) // 8 * 8


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


def compress(raw: bytes, planes: int = 1, level: int | None = None, force: bool = False) -> tuple[str, bytes]:
    """('zstd', frame) when zstd is smaller (or `force`), else ('raw', raw): never worse than storing.

    With `planes` > 1 the stream is that many equal byte planes and each gets its own zstd blocks
    (a block flush between planes), so the compressible sign/exponent plane keeps its own entropy
    tables and the near-random low planes fall back to stored blocks: about 8% smaller on fp16 values.
    """
    import zstandard

    if not raw and not force:
        return "raw", raw
    if level is None or len(raw) > ZSTD_SLOW_LIMIT:
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
    return ("zstd", frame) if force or len(frame) < len(raw) else ("raw", raw)


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
