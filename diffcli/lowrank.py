"""Low-rank updates δ = B·A of one 2-D tensor: building, checking, computing, and the format-v2 record kind.

A low-rank TensorDiff holds `factors` = (B of shape out×r, A of shape r×in), 1 ≤ r ≤ min(out, in), float32,
finite. The packed record is `["lowrank", name, base|null, dtype, shape, digest, rank]`; its values are B's
out·r entries then A's r·in entries (row-major), two segments of the shared values stream (docs/FORMAT.md §10).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffcli.diff import TensorDiff, product
from diffcli.errors import FormatError, InvalidValueError

if TYPE_CHECKING:
    import numpy as np
    import torch

KIND = "lowrank"
RECORD_LEN = 7


def make(base_name: str, shape: tuple[int, ...], dtype: str, digest: str, b: "torch.Tensor",
         a: "torch.Tensor") -> "TensorDiff":
    """A low-rank TensorDiff (factors stored float32, contiguous)."""
    import torch

    return TensorDiff(base_name, tuple(shape), dtype, digest, torch.zeros(0, dtype=torch.float32), None,
                      (b.detach().to(torch.float32).contiguous(), a.detach().to(torch.float32).contiguous()))


def rank_problem(shape: tuple[int, ...], b_shape: tuple[int, ...], a_shape: tuple[int, ...]) -> str | None:
    """Why factors of these shapes cannot be a low-rank δ of `shape` (None when they can)."""
    if len(shape) != 2:
        return f"a low-rank update needs a 2-D tensor, not shape {list(shape)}"
    out, inp = shape
    if len(b_shape) != 2 or len(a_shape) != 2:
        return f"B {list(b_shape)} and A {list(a_shape)} must both be matrices"
    r = b_shape[1]
    if tuple(b_shape) != (out, r) or tuple(a_shape) != (r, inp):
        return f"B {list(b_shape)} and A {list(a_shape)} do not multiply to {list(shape)} at one rank"
    if not 1 <= r <= min(out, inp):
        return f"rank {r} is outside 1..{min(out, inp)} (the smaller dimension of {list(shape)})"
    return None


def check(name: str, td: "TensorDiff", error: type = InvalidValueError) -> int:
    """Shapes, rank, float base and finite factors of a low-rank δ; returns the rank."""
    import torch

    from diffcli.weights import is_float

    b, a = td.factors
    why = rank_problem(tuple(td.shape), tuple(b.shape), tuple(a.shape))
    if why:
        raise error(f"low-rank diff {name!r}: {why}")
    if not is_float(td.dtype):
        raise error(f"low-rank diff {name!r} is on a {td.dtype} tensor; only float tensors take one")
    if not (bool(torch.isfinite(b).all()) and bool(torch.isfinite(a).all())):
        raise error(f"low-rank diff {name!r} holds NaN or infinite values")
    return int(b.shape[1])


def rows(b: "torch.Tensor", a: "torch.Tensor", lo: int, hi: int) -> "torch.Tensor":
    """Flat entries lo..hi of B·A (row-major, float32), computing only the rows they touch."""
    inp = a.shape[1]
    r0, r1 = lo // inp, -(-hi // inp)
    block = product(b[r0:r1], a).reshape(-1)
    return block[lo - r0 * inp:hi - r0 * inp]


# ----------------------------------------------------------------------------------------------- format v2

def encode_record(name: str, td: "TensorDiff") -> tuple[list[Any], list["np.ndarray"]]:
    """The record and its two value segments (B then A, float32 numpy) as a writer checks and stores them."""
    rank = check(name, td)
    b, a = td.factors
    record = [KIND, name, None if td.base_name == name else td.base_name, td.dtype, list(td.shape), td.digest, rank]
    return record, [b.detach().reshape(-1).float().numpy(), a.detach().reshape(-1).float().numpy()]


def parse_record(r: list, where: str, base: str, dtype: str, shape: tuple[int, ...], digest: str) -> dict[str, Any]:
    """The lowrank-specific rules of a record whose common fields are already checked."""
    from diffcli.format_common import FLOAT_DTYPES, fail, integer

    if dtype not in FLOAT_DTYPES:
        raise fail(f"{where} is low-rank on a {dtype} tensor; only float tensors take one")
    if len(shape) != 2:
        raise fail(f"{where} is low-rank but its shape {list(shape)} is not 2-D")
    rank = integer(r[6], f"{where}.rank")
    if not 1 <= rank <= min(shape):
        raise fail(f"{where}.rank {rank} is outside 1..{min(shape)} for shape {list(shape)}")
    return {"kind": KIND, "base": base, "dtype": dtype, "shape": shape, "digest": digest, "rank": rank,
            "counts": [shape[0] * rank, rank * shape[1]]}


def decode_record(rec: dict[str, Any], values: "np.ndarray", source: str) -> "TensorDiff":
    """The TensorDiff of a parsed record from its B-then-A values."""
    import torch

    out, inp = rec["shape"]
    r = rec["rank"]
    if values.size != r * (out + inp):
        raise FormatError(f"{source}: low-rank record {rec['base']!r} has {values.size} values, rank {r} needs "
                          f"{r * (out + inp)}")
    b = torch.from_numpy(values[:out * r]).reshape(out, r)  # views of the decoded values, as sparse records'
    a = torch.from_numpy(values[out * r:]).reshape(r, inp)  # (a copy would double a reader's memory)
    return make(rec["base"], rec["shape"], rec["dtype"], rec["digest"], b, a)
