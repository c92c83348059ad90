"""The in-memory diff: per-tensor sparse or dense δ against a base, plus dense extras and metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffcli.weights import is_float

if TYPE_CHECKING:
    import torch


def product(b: "torch.Tensor", a: "torch.Tensor") -> "torch.Tensor":
    """A low-rank δ's B·A in float32 (the value every reader adds to the base, before the one cast to its dtype)."""
    import torch

    return torch.matmul(b.to(torch.float32), a.to(torch.float32))


def nonfinite(t: "torch.Tensor") -> bool:
    """A floating-point tensor holding NaN or ±Inf (a diverged run): refused wherever a diff is read or written."""
    return bool(t.is_floating_point() and t.numel() and not bool(t.isfinite().all()))


@dataclass
class TensorDiff:
    """δ for one base tensor: sparse (sorted flat `indices` + `values`), dense (`values` of `shape`) or
    low-rank (`factors` = (B out×r, A r×in), δ = B·A, `values` empty; see `lowrank`).

    `values` are float32 whatever the base dtype; the base tensor is named `base_name` in the base
    folder and has content digest `digest`.
    """

    base_name: str
    shape: tuple[int, ...]
    dtype: str
    digest: str
    values: "torch.Tensor"
    indices: "torch.Tensor | None" = None
    factors: "tuple[torch.Tensor, torch.Tensor] | None" = None

    @property
    def is_dense(self) -> bool:
        return self.indices is None and self.factors is None

    @property
    def is_lowrank(self) -> bool:
        return self.factors is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def nnz(self) -> int:
        """Stored update entries: nonzeros of a sparse or dense δ, B and A entries of a low-rank one."""
        if self.is_lowrank:
            return int(self.factors[0].numel() + self.factors[1].numel())
        if self.is_dense:
            return int((self.values != 0).sum())
        return int(self.indices.numel())

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)

    def dense(self) -> "torch.Tensor":
        """δ as a float32 tensor of the base's shape."""
        import torch

        if self.is_lowrank:
            return product(*self.factors).reshape(self.shape)
        if self.is_dense:
            return self.values.to(torch.float32).reshape(self.shape)
        out = torch.zeros(self.numel, dtype=torch.float32)
        out[self.indices] = self.values.to(torch.float32)
        return out.reshape(self.shape)

    def sparse(self) -> "TensorDiff":
        """The same δ in sparse form (nonzero entries only, sorted positions)."""
        import torch

        if self.is_lowrank:  # exact: every nonzero entry of B·A (float32)
            return TensorDiff(self.base_name, self.shape, self.dtype, self.digest, self.dense()).sparse()
        if not self.is_dense:
            return self
        flat = self.values.reshape(-1).to(torch.float32)
        idx = torch.nonzero(flat, as_tuple=True)[0].to(torch.int64)
        return TensorDiff(self.base_name, self.shape, self.dtype, self.digest, flat[idx].clone(), idx)

    @classmethod
    def zeros(cls, base_name: str, shape: tuple[int, ...], dtype: str, digest: str) -> "TensorDiff":
        import torch

        return cls(base_name, tuple(shape), dtype, digest, torch.zeros(0, dtype=torch.float32),
                   torch.zeros(0, dtype=torch.int64))


@dataclass
class BasisScales:
    """Basis scaling of one 2-D base tensor W = U·diag(σ)·Vᵀ (docs/FORMAT.md, basis records): the rebuilt tensor is
    W + U·diag(σ⊙c)·Vᵀ with c_i = a_i − 1 at the `kept` bases (`values`) and c_i = −1 at the pruned ones (a_i = 0).

    U, σ, V are never stored: `diffcli.svd_basis` recomputes them from the base and checks `probe` against them;
    `max_abs_error` is the packed file's value-cast error, which widens that check.
    """

    rank: int
    kept: "torch.Tensor"
    values: "torch.Tensor"
    probe: list[float]
    max_abs_error: float = 0.0

    @property
    def nkept(self) -> int:
        return int(self.kept.numel())

    def coefficients(self) -> "torch.Tensor":
        """c (float64, one per basis): a − 1 at kept bases, −1 at pruned ones."""
        import torch

        c = torch.full((self.rank,), -1.0, dtype=torch.float64)
        c[self.kept] = self.values.to(torch.float64)
        return c


@dataclass
class Diff:
    """A task diff: `tensors` (target name → δ, one per tensor shared with the base) and `extras`
    (target name → full tensor the base lacks or whose shape changed, e.g. a new classifier head)."""

    tensors: dict[str, TensorDiff]
    extras: dict[str, "torch.Tensor"]
    config: dict[str, Any]
    base_ref: str
    base_fingerprint: str
    meta: dict[str, Any] = field(default_factory=dict)
    bases: dict[str, BasisScales] = field(default_factory=dict)  # target name (also in `tensors`) → basis scales

    @property
    def budget_numel(self) -> int:
        """N of the sparsity budget: entries of all floating-point shared tensors."""
        return sum(t.numel for t in self.tensors.values() if t.is_float)

    @property
    def nnz(self) -> int:
        """Stored update parameters: every tensor's (`TensorDiff.nnz`) and the kept scales of its basis records, as the
        packed header's `nnz` counts them (docs/FORMAT.md)."""
        return sum(t.nnz for t in self.tensors.values()) + sum(bs.nkept for bs in self.bases.values())

    @property
    def extras_numel(self) -> int:
        return sum(int(t.numel()) for t in self.extras.values())

    @property
    def density(self) -> float:
        n = self.budget_numel
        return self.nnz / n if n else 0.0

    @property
    def nonfinite_extra(self) -> str | None:
        """The first extra holding NaN or ±Inf (a diverged head), or None."""
        return next((k for k, t in self.extras.items() if nonfinite(t)), None)

    @property
    def base_digests(self) -> dict[str, str]:
        """base tensor name → content digest, for every base tensor the diff builds on."""
        return {t.base_name: t.digest for t in self.tensors.values()}
