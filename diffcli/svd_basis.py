"""The deterministic SVD basis of a base matrix, the probe that checks a rebuild, and basis scales folded into δ.

W = U·diag(σ)·Vᵀ is recomputed in float64 (thin SVD, σ descending) with canonical signs: in each left singular
vector the entry of largest magnitude (first one on ties) is positive, and v_i flips with u_i. Scales c (a − 1)
rebuild W' = W + U·diag(σ⊙c)·Vᵀ. The probe is K = 4 numbers p_k = w_kᵀ·U·diag(σ⊙c)·Vᵀ·x_k for fixed unit vectors
w_k, x_k derived from a stateless splitmix64 stream (docs/FORMAT.md, "Basis records"), so any reader can
recompute them without a random-number library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from diffcli.diff import BasisScales, Diff, TensorDiff
from diffcli.errors import BaseMismatchError, FormatError

if TYPE_CHECKING:
    import torch

PROBES = 4  # numbers per matrix
PROBE_TOLERANCE = 1e-6  # τ of the probe check (docs/FORMAT.md)
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def canonical_svd(w: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """U (m×r), σ (r), Vᵀ (r×n) of a 2-D tensor in float64, r = min(m, n), with canonical signs."""
    import torch

    u, s, vh = torch.linalg.svd(w.detach().to(device="cpu", dtype=torch.float64), full_matrices=False)
    lead = u.abs().argmax(dim=0)
    sign = torch.sign(u[lead, torch.arange(u.shape[1])])
    sign[sign == 0] = 1.0
    return u * sign, s, vh * sign[:, None]


def probe_vector(stream: int, n: int) -> np.ndarray:
    """Unit vector of n float64 entries: splitmix64 of (stream·2³² + j + 1), top 53 bits mapped to [−1, 1)."""
    with np.errstate(over="ignore"):
        z = (np.uint64(stream) << np.uint64(32)) + np.arange(1, n + 1, dtype=np.uint64)
        z = z * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
    v = (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -52 - 1.0
    return v / np.linalg.norm(v)


def _probe_terms(u: "torch.Tensor", s: "torch.Tensor", vh: "torch.Tensor") -> "torch.Tensor":
    """T[k, i] = σ_i·(w_kᵀu_i)·(v_iᵀx_k): p = T·c, and Σ|T|·|c| bounds its rounding."""
    import torch

    m, n = u.shape[0], vh.shape[1]
    left = torch.from_numpy(np.stack([probe_vector(2 * k, m) for k in range(PROBES)]))  # K×m
    right = torch.from_numpy(np.stack([probe_vector(2 * k + 1, n) for k in range(PROBES)]))  # K×n
    return (left @ u) * (right @ vh.T) * s


def probe(u: "torch.Tensor", s: "torch.Tensor", vh: "torch.Tensor", c: "torch.Tensor") -> list[float]:
    """The K probe numbers of the update U·diag(σ⊙c)·Vᵀ (float64)."""
    return [float(x) for x in _probe_terms(u, s, vh) @ c.to(u.dtype)]


def probe_error(u, s, vh, bs: BasisScales) -> tuple[float, float]:
    """(error, allowed): the largest |p'_k − p_k| over its tolerance τ·Σ|T|(1+|c|) + ε·Σ_kept|T| (FORMAT.md)."""
    import torch

    terms = _probe_terms(u, s, vh)
    c = bs.coefficients()
    got = terms @ c
    want = torch.tensor(bs.probe, dtype=torch.float64)
    kept = torch.zeros(bs.rank, dtype=torch.float64)
    kept[bs.kept] = 1.0
    allowed = PROBE_TOLERANCE * (terms.abs() @ (1 + c.abs())) + bs.max_abs_error * (terms.abs() @ kept)
    ratio = (got - want).abs() / allowed.clamp_min(1e-300)
    k = int(ratio.argmax())
    return float((got - want).abs()[k] / (terms.abs() @ (1 + c.abs())).clamp_min(1e-300)[k]), float(ratio[k])


def check_scales(name: str, shape: tuple[int, ...], dtype: str, bs: BasisScales, error=FormatError) -> None:
    """The rules a basis record obeys without the base: a 2-D float tensor, rank = min(shape), sorted kept
    indices below the rank, one finite value per kept basis, K finite probe numbers."""
    import torch

    from diffcli.weights import is_float

    if len(shape) != 2 or not is_float(dtype):
        raise error(f"basis scales of {name!r} need a 2-D float tensor, not {dtype} {list(shape)}")
    if bs.rank != min(shape):
        raise error(f"basis scales of {name!r} count {bs.rank} bases; its {shape[0]}×{shape[1]} matrix has "
                    f"min(out, in) = {min(shape)}")
    kept, vals = bs.kept.reshape(-1), bs.values.reshape(-1)
    if kept.dtype != torch.int64 or kept.numel() != vals.numel() or kept.numel() > bs.rank:
        raise error(f"basis scales of {name!r} need one int64 basis index per value, at most {bs.rank}")
    if kept.numel() and (int(kept[0]) < 0 or int(kept[-1]) >= bs.rank or bool((kept[1:] <= kept[:-1]).any())):
        raise error(f"basis scales of {name!r} have unsorted or out-of-range basis indices")
    if vals.numel() and not bool(torch.isfinite(vals).all()):
        raise error(f"basis scales of {name!r} hold NaN or infinite values")
    if len(bs.probe) != PROBES or not all(isinstance(p, float) and np.isfinite(p) for p in bs.probe):
        raise error(f"basis scales of {name!r} need {PROBES} finite probe numbers")


def make_scales(u, s, vh, scale: "torch.Tensor") -> BasisScales:
    """Basis scales of a learned scale vector a (0 = pruned), with the probe of the update they make."""
    import torch

    a = scale.detach().to("cpu", torch.float64)
    kept = torch.nonzero(a != 0, as_tuple=True)[0].to(torch.int64)
    values = (a[kept] - 1).to(torch.float32)
    bs = BasisScales(int(a.numel()), kept, values, [])
    bs.probe = probe(u, s, vh, bs.coefficients())
    return bs


def basis_delta(u, s, vh, c: "torch.Tensor") -> "torch.Tensor":
    """U·diag(σ⊙c)·Vᵀ (float64), over the bases with c ≠ 0 only."""
    import torch

    idx = torch.nonzero(c, as_tuple=True)[0]
    return (u[:, idx] * (s[idx] * c[idx])) @ vh[idx]


def check_probe(name: str, base: "torch.Tensor", td: TensorDiff, bs: BasisScales):
    """Recompute the basis of `base` and check the record's probe against it: (U, σ, Vᵀ, relative error), or
    BaseMismatchError when the error is beyond the tolerance (another base, or an SVD that came out otherwise)."""
    check_scales(name, tuple(base.shape), td.dtype, bs)
    u, s, vh = canonical_svd(base)
    err, ratio = probe_error(u, s, vh, bs)
    if not ratio <= 1.0:
        raise BaseMismatchError(f"the basis of {name!r} recomputed from this base misses the diff's probe "
                                f"(error {err:.3g}, {ratio:.3g}× the tolerance)",
                                hint="use the base the diff was made on (--force cannot override this)")
    return u, s, vh, err


def resolve(name: str, base: "torch.Tensor", td: TensorDiff, bs: BasisScales) -> tuple[TensorDiff, float]:
    """δ of one tensor with its basis scales folded in: dense float32 U·diag(σ⊙c)·Vᵀ + the sparse δ, after the
    probe check (BaseMismatchError when the recomputed basis differs); also returns the probe error."""
    import torch

    u, s, vh, err = check_probe(name, base, td, bs)
    delta = basis_delta(u, s, vh, bs.coefficients())
    if td.nnz:
        delta += td.dense().to(torch.float64)
    return TensorDiff(td.base_name, td.shape, td.dtype, td.digest, delta.to(torch.float32)), err


def resolve_diff(diff: Diff, base_of: Callable[[str], "torch.Tensor"]) -> tuple[Diff, float]:
    """The diff with every basis record folded into a dense δ (base tensors from `base_of(base_name)`); the
    largest probe error. A diff without basis records comes back as it is."""
    if not diff.bases:
        return diff, 0.0
    tensors, worst = dict(diff.tensors), 0.0
    for name, bs in diff.bases.items():
        td = diff.tensors.get(name)
        if td is None:
            raise FormatError(f"basis scales of {name!r} have no tensor record")
        tensors[name], err = resolve(name, base_of(td.base_name), td, bs)
        worst = max(worst, err)
    return Diff(tensors, diff.extras, diff.config, diff.base_ref, diff.base_fingerprint, diff.meta), worst

