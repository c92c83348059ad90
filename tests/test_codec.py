"""Position (Rice) and value (byte plane, bounded zstd) codecs of the packed format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from diffcli import codec
from diffcli.errors import FormatError


@st.composite
def position_sets(draw, max_numel: int = 1 << 60):
    """Sorted distinct positions inside a tensor of up to 2**60 entries, often clustered."""
    numel = draw(st.integers(1, max_numel))
    k = draw(st.integers(1, min(numel, 300)))
    if draw(st.booleans()) and numel > k:  # a cluster somewhere: small gaps, then one large jump
        start = draw(st.integers(0, numel - k))
        span = draw(st.integers(k, min(numel - start, 4 * k)))
        pos = np.array(sorted(draw(st.sets(st.integers(start, start + span - 1), min_size=k, max_size=k))),
                       dtype=np.int64)
    else:
        pos = np.array(sorted(draw(st.sets(st.integers(0, numel - 1), min_size=k, max_size=k))), dtype=np.int64)
    return pos, numel


@settings(max_examples=300, deadline=None)
@given(position_sets())
def test_positions_round_trip(case):
    pos, numel = case
    raw = codec.encode_positions(pos)
    lo, hi = codec.positions_raw_bounds(pos.size, numel)
    assert lo <= len(raw) <= hi
    assert np.array_equal(codec.decode_positions(raw, pos.size, numel), pos)


@pytest.mark.parametrize("positions", [
    [2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1],
    [0, 2**32 - 1, 2**32, 2**32 + 2**31, 2**33 + 5],
    [5, 2**40, 2**40 + 1, 2**59 + 3],
    [2**60 - 1],
])
def test_positions_beyond_int32(positions):
    pos = np.array(positions, dtype=np.int64)
    numel = int(pos[-1]) + 1
    assert np.array_equal(codec.decode_positions(codec.encode_positions(pos), pos.size, numel), pos)


def test_rice_size_near_information_limit():
    rng = np.random.default_rng(0)
    numel, k = 2_000_000, 10_000
    pos = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    limit_bits = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2)
    size_bits = 8 * len(codec.encode_positions(pos))
    assert size_bits <= 1.03 * limit_bits


def test_rice_parameter_is_the_cheapest():
    gaps = np.random.default_rng(1).geometric(1 / 300, size=5000).astype(np.int64)
    r = codec.rice_parameter(gaps)
    cost = lambda q: gaps.size * (q + 1) + int((gaps >> q).sum())  # noqa: E731
    assert all(cost(r) <= cost(q) for q in range(0, 20))


def test_dense_positions_cost_about_one_bit_each():
    pos = np.arange(10_000, dtype=np.int64)
    raw = codec.encode_positions(pos)
    assert raw[0] == 0 and len(raw) <= 1 + 10_000 // 8
    assert np.array_equal(codec.decode_positions(raw, 10_000, 10_000), pos)


def _stream(positions, numel):
    pos = np.array(positions, dtype=np.int64)
    return bytearray(codec.encode_positions(pos)), pos.size, numel


def test_decode_positions_rejects_wrong_count():
    raw, k, numel = _stream([3, 9, 40], 64)
    with pytest.raises(FormatError, match="holds 3 positions"):
        codec.decode_positions(bytes(raw), 4, numel)
    with pytest.raises(FormatError):
        codec.decode_positions(bytes(raw), 2, numel)


def test_decode_positions_rejects_trailing_and_truncated_bytes():
    raw, k, numel = _stream([3, 9, 40], 64)
    with pytest.raises(FormatError, match="trailing"):
        codec.decode_positions(bytes(raw) + b"\0", k, numel)
    with pytest.raises(FormatError):
        codec.decode_positions(bytes(raw[:1]), k, numel)
    with pytest.raises(FormatError):
        codec.decode_positions(b"", k, numel)


def test_decode_positions_rejects_out_of_range_and_bad_parameter():
    raw, k, numel = _stream([3, 9, 40], 64)
    with pytest.raises(FormatError, match="outside"):
        codec.decode_positions(bytes(raw), k, 40)  # last position 40 needs numel ≥ 41
    bad = bytearray(raw)
    bad[0] = 61
    with pytest.raises(FormatError, match="Rice parameter"):
        codec.decode_positions(bytes(bad), k, numel)


def test_decode_positions_rejects_nonzero_padding():
    raw, k, numel = _stream([1, 2, 5], 8)  # r = 0 or 1; remainder padding bits exist when r > 0
    r = raw[0]
    if r:
        rem_len = (k * r + 7) // 8
        raw[rem_len] |= 1  # lowest bit of the last remainder byte is padding (3·r bits < 8·rem_len)
        with pytest.raises(FormatError, match="padding"):
            codec.decode_positions(bytes(raw), k, numel)
    # r = 2, three 2-bit remainders 00 00 00 then padding bits 11, then quotients 1 1 1 (all zero).
    forced = bytes([2, 0b00000011, 0b11100000])
    with pytest.raises(FormatError, match="padding"):
        codec.decode_positions(forced, 3, 64)


def test_decode_positions_detects_int64_wraparound():
    # Three gaps of nearly 2**60 each cannot stay below numel = 2**60: rejected, never wrapped.
    numel = 1 << 60
    r = 59
    quot = np.array([1, 1, 1], dtype=np.int64)
    rem = np.full(3, (1 << 59) - 1, dtype=np.int64)
    qbits = np.zeros(6, dtype=np.uint8)
    qbits[[1, 3, 5]] = 1
    raw = bytes([r]) + codec._pack_fixed(rem, r) + np.packbits(qbits).tobytes()
    assert int(quot.max()) <= numel >> r
    with pytest.raises(FormatError, match="outside"):
        codec.decode_positions(raw, 3, numel)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([1, 2, 4, 8]))
def test_planes_round_trip(data, size):
    data = data[: len(data) // size * size]
    arr = np.frombuffer(data, dtype=np.uint8)
    planes = codec.to_planes(arr, size)
    assert len(planes) == len(data)
    assert codec.from_planes(planes, size).tobytes() == data


def test_planes_put_high_bytes_first():
    arr = np.array([0x1234, 0xABCD], dtype="<u2").view(np.uint8)
    assert codec.to_planes(arr, 2) == bytes([0x12, 0xAB, 0x34, 0xCD])


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000))
def test_compress_round_trip_and_never_larger(data):
    name, stored = codec.compress(data)
    assert len(stored) <= len(data)
    assert bytes(codec.decompress(name, stored, len(data))) == data


def test_decompress_is_bounded_by_declared_length():
    frame = zstandard.ZstdCompressor(level=3).compress(b"\0" * 1_000_000)  # frame says 1 MB
    with pytest.raises(FormatError, match="more bytes"):
        codec.decompress("zstd", frame, 100)
    with pytest.raises(FormatError, match="fewer bytes"):
        codec.decompress("zstd", frame, 2_000_000)
    assert len(codec.decompress("zstd", frame, 1_000_000)) == 1_000_000


def test_decompress_rejects_trailing_data_and_garbage():
    frame = zstandard.ZstdCompressor(level=3).compress(b"abc" * 100)
    with pytest.raises(FormatError):
        codec.decompress("zstd", frame + frame, 300)
    with pytest.raises(FormatError):
        codec.decompress("zstd", frame + b"junk", 300)
    with pytest.raises(FormatError):
        codec.decompress("zstd", b"\x00" * 20, 300)
    with pytest.raises(FormatError, match="unknown codec"):
        codec.decompress("lz4", b"abc", 3)
    with pytest.raises(FormatError):
        codec.decompress("raw", b"abc", 4)


def test_decompress_refuses_oversized_windows():
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=26, write_content_size=0)
    frame = zstandard.ZstdCompressor(compression_params=params).compress(
        np.random.default_rng(0).bytes(1 << 16) * 200)
    assert zstandard.get_frame_parameters(frame).window_size > codec.ZSTD_MAX_WINDOW
    with pytest.raises(FormatError):
        codec.decompress("zstd", frame, (1 << 16) * 200)


def test_plane_blocks_beat_one_stream_on_fp16_values():
    import torch

    rng = np.random.default_rng(3)
    vals = torch.from_numpy(rng.standard_normal(200_000).astype(np.float32) * 1e-3)
    vals = vals[vals.abs() > 2.5e-3]  # magnitude-pruned values: exponents cluster
    raw = codec.to_planes(vals.half().view(torch.uint8).numpy(), 2)
    name, split = codec.compress(raw, planes=2)
    _, whole = codec.compress(raw, planes=1)
    assert name == "zstd" and len(split) < 0.97 * len(whole) and len(split) < 0.75 * len(raw)
    assert zstandard.get_frame_parameters(split).content_size == len(raw)
    assert bytes(codec.decompress(name, split, len(raw))) == raw


def test_large_streams_use_the_fast_level_and_round_trip():
    raw = np.random.default_rng(4).integers(0, 16, codec.ZSTD_SLOW_LIMIT + 4096, dtype=np.uint8).tobytes()
    name, stored = codec.compress(raw, planes=4)
    assert name == "zstd" and len(stored) < 0.7 * len(raw)
    assert zstandard.get_frame_parameters(stored).window_size <= codec.ZSTD_MAX_WINDOW
    assert bytes(codec.decompress(name, stored, len(raw))) == raw
