"""Hard-concrete gates (Louizos et al. 2018) and the L0 penalty of diff pruning, as plain tensor maths.

A gate with parameter log α, stretch interval (l, r) and temperature β is sampled as

    u ~ U(0, 1),  s = σ((log u − log(1−u) + log α) / β),  z = clamp(s·(r − l) + l, 0, 1)

and evaluated deterministically as ẑ = clamp(σ(log α)·(r − l) + l, 0, 1). The probability that a
sampled gate is nonzero is P(z ≠ 0) = σ(log α − β·log(−l/r)); the penalty sums it over all gates.
These reference functions are differentiable with autograd; `diffmodel` uses fused in-place versions
of the same formulas over one flat buffer and is tested against them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

U_EPS = 1e-6  # u is drawn from [U_EPS, 1 − U_EPS] so that log u and log(1−u) stay finite


@dataclass(frozen=True)
class HardConcrete:
    """Stretch limits (l < 0 < 1 < r) and temperature β of the hard-concrete distribution."""

    l: float = -1.5
    r: float = 1.5
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not (self.l < 0 and self.r > 1 and math.isfinite(self.l) and math.isfinite(self.r)):
            raise InvalidValueError(f"gate limits must satisfy l < 0 and r > 1, got l={self.l}, r={self.r}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise InvalidValueError(f"gate temperature beta must be positive, got {self.beta}")

    @property
    def shift(self) -> float:
        """β·log(−l/r): P(z ≠ 0) = σ(log α − shift)."""
        return self.beta * math.log(-self.l / self.r)

    def noise(self, shape, generator: "torch.Generator | None" = None, out: "torch.Tensor | None" = None):
        """Logistic noise log u − log(1−u), the only random part of a sample."""
        import torch

        u = torch.empty(shape, device=generator.device if generator is not None else None) if out is None else out
        u.uniform_(U_EPS, 1.0 - U_EPS, generator=generator)
        return u.logit_()

    def sample(self, log_alpha: "torch.Tensor", noise: "torch.Tensor") -> "torch.Tensor":
        """z for given logistic noise (differentiable in log α)."""
        import torch

        s = torch.sigmoid((noise + log_alpha) / self.beta)
        return (s * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def deterministic(self, log_alpha: "torch.Tensor") -> "torch.Tensor":
        """The evaluation-time gate ẑ = clamp(σ(log α)(r − l) + l, 0, 1): no sampling."""
        import torch

        return (torch.sigmoid(log_alpha) * (self.r - self.l) + self.l).clamp(0.0, 1.0)

    def prob_nonzero(self, log_alpha: "torch.Tensor") -> "torch.Tensor":
        """P(z ≠ 0) = σ(log α − β·log(−l/r)), the expected L0 norm contribution of each gate."""
        import torch

        return torch.sigmoid(log_alpha - self.shift)


def l0_penalty(gate: HardConcrete, log_alpha: "torch.Tensor", group_log_alpha: "torch.Tensor | None",
               lam: float) -> "torch.Tensor":
    """λ·(Σ_entries P(z ≠ 0) + Σ_tensors P(z_g ≠ 0)); the group term only with structured gates."""
    total = gate.prob_nonzero(log_alpha).sum()
    if group_log_alpha is not None:
        total = total + gate.prob_nonzero(group_log_alpha).sum()
    return lam * total


def expected_density(gate: HardConcrete, log_alpha: "torch.Tensor", group_log_alpha: "torch.Tensor | None",
                     sizes: list[int]) -> float:
    """E[fraction of nonzero mask entries] of z·z_g: Σ_k P(z_g,k ≠ 0)·Σ_{i∈k} P(z_i ≠ 0) / N."""
    p = gate.prob_nonzero(log_alpha.detach())
    n = p.numel()
    if group_log_alpha is None:
        return float(p.sum()) / max(n, 1)
    pg = gate.prob_nonzero(group_log_alpha.detach())
    sums = [float(seg.sum()) for seg in p.split(sizes)]
    return sum(float(g) * s for g, s in zip(pg, sums)) / max(n, 1)
