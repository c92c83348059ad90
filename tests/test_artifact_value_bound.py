"""What a file may claim and what reading it costs: the recorded value error stays within the quantizer's bound,
and a reader's peak memory stays near what it returns."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from diffcli import artifact
from diffcli.errors import FormatError
from diff_bytes import build2, check_consistent2, split2, with_golden_bases
from test_artifact import golden_diff



# ------------------------------------------------------------------------------------------ the recorded value error

@pytest.mark.parametrize("values", ["fp16", "bf16", "int8", "int4", "ternary"])
def test_every_file_the_writer_makes_keeps_its_value_error_within_the_bound(values):
    """The bound a reader checks max_abs_error against holds for sparse, dense, low-rank and basis records."""
    from test_lowrank import golden_lowrank

    diffs = (golden_diff(), golden_lowrank(), with_golden_bases(golden_diff()), with_golden_bases(golden_lowrank()))
    for diff in diffs:
        for block in ((None, 1, 2, 3, 1000) if values in ("int8", "int4", "ternary") else (None,)):
            data = artifact.pack(diff, values, block=block)
            check_consistent2(artifact.loads(data), split2(data)[0])


def test_the_golden_files_keep_their_value_error_within_the_bound():
    from test_artifact import DATA

    for path in sorted(DATA.glob("golden_*.diff")):
        artifact.load(path)


def test_v2_a_value_error_above_what_the_quantizer_can_make_is_refused():
    for values, lie in (("fp32", 1e-30), ("fp16", 2.0**-9), ("bf16", 2.0**-6), ("int8", 0.1), ("int4", 1.0),
                        ("ternary", 10.0)):
        header, payload = split2(artifact.pack(golden_diff(), values))  # largest |δ| 3: fp16 half-ulp 2^-10
        header["values"]["max_abs_error"] = lie
        with pytest.raises(FormatError, match="max_abs_error"):
            artifact.loads(build2(header, payload))


_MAGNITUDES = st.sampled_from([0.0, 1e-45, 1e-40, 2.0**-126, 6e-8, 2.0**-14, 1e-3, 0.3, 1.0, 7.0, 1e4, 65519.0, 1e30])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["fp16", "bf16", "int8", "int4", "ternary"]),
       st.lists(st.lists(st.tuples(_MAGNITUDES, st.floats(-1, 1, width=32)), max_size=40), min_size=1, max_size=5),
       st.lists(st.booleans(), min_size=5, max_size=5), st.integers(1, 64))
def test_the_writers_value_error_never_exceeds_the_bound_a_reader_checks(values, segments, droppable, block):
    """quantize_stored (both passes, dropped entries included) against quantize.error_limit over what it stores."""
    from diffcli import quantize

    if values in ("fp16", "bf16") and any(m >= 1e30 for seg in segments for m, _ in seg):
        segments = [[(m, f) for m, f in seg if m < 1e30] for seg in segments]  # beyond fp16: refused at pack
    if values == "fp16":
        segments = [[(m, f) for m, f in seg if m * abs(f) < 65504] for seg in segments]
    vals = np.asarray([m * f for seg in segments for m, f in seg], dtype=np.float32)
    counts = np.asarray([len(seg) for seg in segments], dtype=np.int64)
    block = 0 if values in ("fp16", "bf16") else block
    keep = np.asarray(droppable[:counts.size])
    q, _keep, kept = quantize.quantize_stored(vals, counts, values, block, droppable=keep)
    limit = quantize.error_limit(q.values, q.scales, kept, values, quantize.fit_block(block, kept))
    assert q.max_abs_error <= limit, (q.max_abs_error, limit)


def test_a_writer_refuses_values_its_quantizer_cannot_store_within_the_bound():
    """A ternary block whose magnitudes sum past float32 would code nothing and store an error readers refuse."""
    from diffcli.diff import Diff, TensorDiff
    from diffcli.errors import InvalidValueError
    from diffcli.weights import fingerprint

    td = TensorDiff("w", (4,), "float32", "0" * 32, torch.tensor([3e38, -3e38, 1.0, 2.0]), torch.arange(4))
    diff = Diff({"w": td}, {}, {}, "b", fingerprint([td.digest]), {})
    with np.errstate(over="ignore"), pytest.raises(InvalidValueError, match="within its error bound"):
        artifact.pack(diff, "ternary")
    assert artifact.loads(artifact.pack(diff, "int8")).tensors["w"].nnz == 2  # 1 and 2 round to 0 beside 3e38


@pytest.mark.parametrize("values", ["int8", "int4", "ternary"])
def test_a_subnormal_entry_dropped_with_its_whole_segment_keeps_within_the_bound(values):
    """2^-149 alone: its int8 scale underflows, it codes 0 and is dropped; the error it leaves is within the floor."""
    from diffcli import quantize

    vals = np.asarray([1e-45], dtype=np.float32)
    q, _keep, kept = quantize.quantize_stored(vals, np.asarray([1]), values, 1)
    assert q.max_abs_error <= quantize.error_limit(q.values, q.scales, kept, values, quantize.fit_block(1, kept))


# ------------------------------------------------------------------------------------------------- reader memory

def _returned_bytes(diff) -> int:
    """Bytes of the arrays a loaded Diff holds: values, positions, low-rank factors, basis scales, extras."""
    arrays = [t for td in diff.tensors.values() for t in (td.values, td.indices, *(td.factors or ())) if t is not None]
    arrays += [bs.kept for bs in diff.bases.values()] + [bs.values for bs in diff.bases.values()]
    return sum(t.numel() * t.element_size() for t in arrays + list(diff.extras.values()))


def _peak_of_loading(data: bytes) -> tuple[object, int]:
    tracemalloc.start()  # counts numpy's allocations, which hold everything the v2 reader decodes
    try:
        diff = artifact.loads(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return diff, peak


def test_v2_a_tiny_low_rank_file_costs_a_reader_little_beyond_its_decoded_values():
    """A 600-byte file (one low-rank record of zeros, ternary, one RLE zstd frame) decodes to 32 MiB of float32
    factors (FORMAT.md §3: raw_length ≤ 32768 × length allows it); the reader once held 4.3x that (int64 block ids,
    float temporaries, copies of B and A), now the factors, the 2 MiB raw stream and a few MB of work buffers."""
    from diffcli import codec

    n, rank = 4096, 1024
    nnz = 2 * n * rank
    codes = zstandard.ZstdCompressor(level=19).compress(b"\x55" * (nnz // 4))  # q = 0: code 01, four a byte
    scales = codec.to_planes(np.ones(2, dtype="<f4").view(np.uint8), 4)  # one block for B, one for A
    def desc(stored, raw_length, kind="raw"):  # noqa: E306
        return {"length": len(stored), "raw_length": raw_length, "sha256": hashlib.sha256(stored).hexdigest(),
                "codec": kind}
    header = {"format": "diffprune", "version": 2, "producer": "x",
              "base": {"ref": "x", "fingerprint": "sha256:" + "0" * 64, "digest": "xxh3-128"},
              "values": {"quantizer": "ternary", "block": n * rank, "max_abs_error": 0, "max_rel_error": 0},
              "budget_numel": n * n, "nnz": nnz, "records": [["lowrank", "w", None, "float32", [n, n], "0" * 32, rank]],
              "streams": {"positions": desc(b"", 0), "values": desc(codes, nnz // 4, "zstd"),
                          "scales": desc(scales, 8), "dense": desc(b"", 0)},
              "config": {}, "meta": {}}
    data = build2(header, codes + scales)
    assert len(data) < 1000
    diff, peak = _peak_of_loading(data)
    b, a = diff.tensors["w"].factors
    assert tuple(b.shape) == (n, rank) and tuple(a.shape) == (rank, n) and not b.any() and not a.any()
    returned = _returned_bytes(diff)
    assert returned == 4 * nnz
    assert peak <= 1.5 * returned + (4 << 20), (peak, returned)


@pytest.mark.parametrize("values", ["ternary", "int4", "int8", "fp16"])
def test_v2_the_reader_holds_what_it_returns_its_raw_streams_and_a_few_mb(values):
    """The writer's own tiny files of huge regular content (every position of a tensor, one value; a low-rank
    record of zeros): a reader's peak is the float32 values and int64 positions it returns, one copy of the raw
    streams and work buffers of a few MB, whatever the quantizer (before: 4-6x what it returned)."""
    from diffcli import lowrank
    from diffcli.diff import Diff, TensorDiff

    m, n, rank = 1 << 21, 2048, 256
    sparse = TensorDiff("s", (m,), "float32", "0" * 32, torch.full((m,), 0.5), torch.arange(m))
    low = lowrank.make("w", (n, n), "float32", "1" * 32, torch.zeros(n, rank), torch.zeros(rank, n))
    data = artifact.pack(Diff({"s": sparse, "w": low}, {}, {}, "x", "sha256:" + "0" * 64, {}), values)
    raw = sum(s["raw_length"] for s in split2(data)[0]["streams"].values())
    assert len(data) < 1 << 16 < raw
    diff, peak = _peak_of_loading(data)
    assert diff.tensors["s"].indices.tolist()[-3:] == [m - 3, m - 2, m - 1]
    returned = _returned_bytes(diff)
    assert returned == 12 * m + 8 * n * rank
    assert peak <= returned + raw + (4 << 20), (peak, returned, raw)
