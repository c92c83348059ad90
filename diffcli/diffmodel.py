"""The reparameterised task model θ = θ₀ + δ over one flat buffer: gated (L0 phase) and masked (fixed-mask phase).

Every gated model parameter becomes a view into one flat buffer `theta`, and its gradient a view into
one flat buffer `grad`, so the model runs (and DistributedDataParallel reduces gradients) exactly as in
full finetuning. Before each step the gate maths writes θ = θ₀ + z⊙z_g⊙w into `theta` with a few fused
in-place passes; after the backward pass it turns dL/dθ into dL/dw and dL/dlog α by hand:

    dL/dw_i      = g_i · z_i · z_g,k                       (g = dL/dθ, i in tensor k)
    dL/dlog α_i  = g_i · w_i · z_g,k · (r−l)/β · s_i(1−s_i) · [0 < s_i(r−l)+l < 1]  +  λ·p_i(1−p_i)
    dL/dz_g,k    = Σ_{i∈k} g_i · z_i · w_i

with s the pre-stretch sample and p_i = σ(log α_i − β log(−l/r)) (the penalty's derivative). No per-step
allocation of parameter-sized tensors happens on the hot path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from diffcli.gates import U_EPS, HardConcrete

if TYPE_CHECKING:
    import torch


class Layout:
    """Where each shared tensor sits in the flat order (names, shapes, offsets), without N-sized buffers."""

    def __init__(self, model, names: list[str]):
        params = dict(model.named_parameters())
        self.names = list(names)
        self.shapes = [tuple(params[n].shape) for n in self.names]
        self.sizes = [int(math.prod(s)) for s in self.shapes]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.numel = self.offsets[-1]


class FlatParams(Layout):
    """θ₀, θ and dL/dθ of the gated parameters as flat buffers; the model's parameters are views into them."""

    def __init__(self, model, names: list[str], device: "torch.device"):
        import torch

        super().__init__(model, names)
        params = dict(model.named_parameters())
        self.theta0 = torch.empty(self.numel, dtype=torch.float32, device=device)
        for name, a, b in zip(self.names, self.offsets, self.offsets[1:]):
            self.theta0[a:b].copy_(params[name].detach().reshape(-1))
        self.theta = self.theta0.clone()
        self.grad = torch.zeros_like(self.theta0)
        for name, shape, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:]):
            p = params[name]
            p.data = self.theta[a:b].view(shape)
            p.requires_grad_(True)
            p.grad = self.grad[a:b].view(shape)
        self.params = [params[n] for n in self.names]

    def segments(self, flat: "torch.Tensor") -> list["torch.Tensor"]:
        return list(flat.split(self.sizes))

    def zero_grad(self) -> None:
        self.grad.zero_()
        for p, (a, b), shape in zip(self.params, zip(self.offsets, self.offsets[1:]), self.shapes):
            if p.grad is None or p.grad.data_ptr() != self.grad[a:b].data_ptr():  # something replaced it
                p.grad = self.grad[a:b].view(shape)

    def collect_grads_(self) -> None:
        """Make sure dL/dθ sits in `grad`: copy back any gradient that a wrapper stored elsewhere."""
        for p, (a, b), shape in zip(self.params, zip(self.offsets, self.offsets[1:]), self.shapes):
            view = self.grad[a:b]
            if p.grad is None:
                view.zero_()
                p.grad = view.view(shape)
            elif p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1))
                p.grad = view.view(shape)

    def locate(self, flat_index: "torch.Tensor") -> list[tuple[str, "torch.Tensor"]]:
        """Split sorted flat positions into (name, positions within that tensor)."""
        import torch

        out = []
        bounds = torch.tensor(self.offsets, dtype=torch.int64)
        cuts = torch.searchsorted(flat_index.cpu(), bounds).tolist()
        for name, a, lo, hi in zip(self.names, self.offsets, cuts, cuts[1:]):
            out.append((name, flat_index[lo:hi].cpu() - a))
        return out


class GatedDiff:
    """L0 phase state: w (zeros), log α per entry and, if structured, one group log α per tensor."""

    def __init__(self, flat: FlatParams, gate: HardConcrete, *, log_alpha_init: float, structured: bool,
                 generator: "torch.Generator"):
        import torch

        self.flat, self.gate, self.structured, self.generator = flat, gate, structured, generator
        dev = flat.theta.device
        n = flat.numel
        self.w = torch.zeros(n, device=dev, requires_grad=True)
        self.w.grad = torch.zeros(n, device=dev)
        self.log_alpha = torch.full((n,), float(log_alpha_init), device=dev, requires_grad=True)
        self.log_alpha.grad = torch.zeros(n, device=dev)
        self.group_log_alpha = None
        if structured:
            t = len(flat.sizes)
            self.group_log_alpha = torch.full((t,), float(log_alpha_init), device=dev, requires_grad=True)
            self.group_log_alpha.grad = torch.zeros(t, device=dev)
        self._s = torch.empty(n, device=dev)  # logistic noise, then the pre-stretch sample s
        self._sg: "torch.Tensor | None" = None
        self._zg: list[float] | None = None
        # s lies strictly inside the stretch region (0 < s(r−l)+l < 1) iff lo < s < hi
        span = gate.r - gate.l
        self._lo, self._hi = -gate.l / span, (1.0 - gate.l) / span
        self._l = torch.tensor(float(gate.l), dtype=torch.float32)
        self._segment_sums = SegmentSums(flat.sizes, dev)
        # z_g broadcast to entries with one gather: per-tensor loops of small elementwise ops are slow
        # (each pays a thread-pool round trip), so the group factor is applied in whole-buffer passes
        self._seg_ids = self._zg_full = None
        if structured:
            self._seg_ids = torch.repeat_interleave(torch.arange(len(flat.sizes), dtype=torch.int32, device=dev),
                                                    torch.tensor(flat.sizes, device=dev), output_size=n)
            self._zg_full = torch.empty(n, device=dev)
        self._kernels = fused_kernels(n, dev)
        self._lam_t = torch.zeros((), device=dev)
        self._one = torch.ones((), device=dev)

    # -- parameters for the optimisers -------------------------------------------------------------
    def gate_params(self) -> list["torch.Tensor"]:
        return [self.log_alpha] + ([self.group_log_alpha] if self.structured else [])

    # -- forward ---------------------------------------------------------------------------------
    def _stretch_into(self, out: "torch.Tensor", s: "torch.Tensor") -> "torch.Tensor":
        """out = clamp(s·(r−l) + l, 0, 1) in two passes (out may alias s)."""
        import torch

        g = self.gate
        return torch.add(self._l, s, alpha=g.r - g.l, out=out).clamp_(0.0, 1.0)

    def sample_(self) -> None:
        """Draw the gates and write θ = θ₀ + z⊙z_g⊙w into the model's parameters."""
        import torch

        g, s = self.gate, self._s
        with torch.no_grad():
            if self._kernels is not None:
                s.uniform_(U_EPS, 1.0 - U_EPS, generator=self.generator)
            else:
                g.noise(s.shape, self.generator, out=s)
            if self.structured:
                gnoise = g.noise(self.group_log_alpha.shape, self.generator).to(s.device)
                self._sg = torch.sigmoid((gnoise + self.group_log_alpha) / g.beta)
                zg = (self._sg * (g.r - g.l) + g.l).clamp(0.0, 1.0)
                self._zg = zg.tolist()
                torch.index_select(zg, 0, self._seg_ids, out=self._zg_full)
            if self._kernels is not None:
                zg_full = self._zg_full if self.structured else self._one
                try:
                    self._kernels[0](s, self.log_alpha.detach(), self.w.detach(), self.flat.theta0, zg_full,
                                     self.flat.theta, g.beta, g.r - g.l, g.l)
                    return
                except Exception:  # noqa: BLE001 - compilation failed (before any write): go eager
                    self._kernels = None
                    s.logit_()
            s.add_(self.log_alpha)
            if g.beta != 1.0:
                s.div_(g.beta)
            s.sigmoid_()
            theta = self._stretch_into(self.flat.theta, s)  # z
            if self.structured:
                theta.mul_(self._zg_full)
            torch.addcmul(self.flat.theta0, theta, self.w.detach(), out=theta)  # θ₀ + z·z_g·w

    def _scale_groups(self, flat: "torch.Tensor", factors: list[float] | None) -> None:
        if factors is None:
            return
        for seg, f in zip(self.flat.segments(flat), factors):
            if f != 1.0:
                seg.mul_(f)

    def deterministic_gates(self) -> tuple["torch.Tensor", list[float] | None]:
        """ẑ (flat, new tensor) and the group ẑ_g as floats (None if not structured)."""
        import torch

        with torch.no_grad():
            z = self.gate.deterministic(self.log_alpha.detach())
            zg = self.gate.deterministic(self.group_log_alpha.detach()).tolist() if self.structured else None
        return z, zg

    def delta(self) -> "torch.Tensor":
        """The deterministic δ = ẑ⊙ẑ_g⊙w as a new flat tensor."""
        import torch

        with torch.no_grad():
            z, zg = self.deterministic_gates()
            self._scale_groups(z, zg)
            return z.mul_(self.w)

    def set_deterministic_(self) -> None:
        """Write the evaluation model θ = θ₀ + δ (deterministic gates) into the model's parameters."""
        import torch

        with torch.no_grad():
            theta = self.flat.theta
            torch.sigmoid(self.log_alpha.detach(), out=theta)
            self._stretch_into(theta, theta)
            if self.structured:
                self._scale_groups(theta, self.gate.deterministic(self.group_log_alpha.detach()).tolist())
            theta.mul_(self.w).add_(self.flat.theta0)

    def deterministic_density(self) -> float:
        """Fraction of entries whose deterministic mask ẑ⊙ẑ_g is nonzero (log α > logit(−l/(r−l)))."""
        import torch

        with torch.no_grad():
            thr = math.log(self._lo / (1.0 - self._lo))
            open_ = [int((seg > thr).sum()) for seg in self.flat.segments(self.log_alpha.detach())]
            if self.structured:
                zg = self.gate.deterministic(self.group_log_alpha.detach()).tolist()
                open_ = [c if f > 0 else 0 for c, f in zip(open_, zg)]
        return sum(open_) / max(self.flat.numel, 1)

    # -- backward --------------------------------------------------------------------------------
    def backward_(self, lam: float) -> dict[str, float]:
        """Turn dL/dθ (in flat.grad) into the gradients of w, log α and group log α, adding λ·penalty'.

        Returns the expected density of z⊙z_g and the penalty's value λ·(Σp + Σp_g).
        """
        import torch

        aten = torch.ops.aten
        self.flat.collect_grads_()
        g, gate, s = self.flat.grad, self.gate, self._s
        w = self.w.detach()
        span = gate.r - gate.l
        zg = self._zg
        with torch.no_grad():
            gw, gla = self.w.grad, self.log_alpha.grad
            if self._kernels is not None:  # one fused pass: gw = z·z_g·g, gla incl. the penalty, s ← p
                self._lam_t.fill_(lam)
                zg_full = self._zg_full if self.structured else self._one
                try:
                    self._kernels[1](g, w, s, self.log_alpha.detach(), zg_full, self._lam_t, gw, gla, self._lo,
                                     self._hi, span / gate.beta, span, gate.l, gate.shift)
                except Exception:  # noqa: BLE001 - compilation failed (before any write): go eager
                    self._kernels = None
                    return self.backward_(lam)
            else:
                self._stretch_into(gw, s).mul_(g)  # z·g
                if self.structured:
                    gw.mul_(self._zg_full)  # z·z_g·g
                # dL/dlog α = g·w·z_g·(r−l)/β·s(1−s) where 0 < s(r−l)+l < 1, i.e. lo < s < hi
                torch.mul(g, w, out=gla)
                aten.hardtanh_backward.grad_input(gla, s, self._lo, self._hi, grad_input=gla)  # in place
                aten.sigmoid_backward.grad_input(gla, s, grad_input=gla)
                if self.structured:
                    gla.mul_(self._zg_full)
                gla.mul_(span / gate.beta)
                # the penalty λ·Σ σ(log α − shift): its value and its derivative λ·p(1−p) = λ·(p − p²)
                torch.sub(self.log_alpha.detach(), gate.shift, out=s).sigmoid_()
                gla.add_(s, alpha=lam).addcmul_(s, s, value=-lam)
            sums = self._segment_sums(s)  # Σ p per tensor
            if self.structured:
                # dL/dz_g,k = Σ_k z·g·w = Σ_k gw·w / z_g,k; not needed where z_g = 0 (dz_g/dlog α_g = 0 there)
                torch.mul(gw, w, out=s)
                zg_t = torch.tensor(zg, device=s.device)
                gz_group = torch.where(zg_t > 0, self._segment_sums(s) / zg_t.clamp_min(1e-30), 0.0)
            penalty_sum = float(sums.sum())
            if self.structured:
                gla_g = self.group_log_alpha.detach()
                sg = self._sg
                dzg = sg * (1 - sg) * (span / gate.beta) * ((sg > self._lo) & (sg < self._hi))
                pg = gate.prob_nonzero(gla_g)
                self.group_log_alpha.grad.copy_(gz_group * dzg + lam * pg * (1 - pg))
                penalty_sum += float(pg.sum())
                density = float((pg * sums).sum()) / max(self.flat.numel, 1)
            else:
                density = float(sums.sum()) / max(self.flat.numel, 1)
        return {"expected_density": density, "penalty": lam * penalty_sum}


class SegmentSums:
    """Σ of a flat buffer over each parameter's contiguous segment, in a few whole-buffer ops.

    A reduction per tensor is slow on a busy CPU and `torch.segment_reduce` is slow on cuda (4.7 ms per call on
    a BERT-base buffer on an H100). Instead: block sums over fixed blocks of `BLOCK` entries (one pass), their
    prefix sums in float64, and at every segment boundary x the partial sum of the block x falls in (one
    gather of BLOCK entries per boundary): P(x) = Σ blocks before x + partial, and Σ[a, b) = P(b) − P(a).
    """

    BLOCK = 1024

    def __init__(self, sizes: list[int], device: "torch.device"):
        import torch

        self.numel = n = int(sum(sizes))
        bounds = torch.tensor([0] + list(sizes), dtype=torch.int64).cumsum(0)
        B = self.BLOCK
        self.full_blocks = n // B
        block = bounds // B                                              # the block each boundary falls in
        cols = torch.arange(B, dtype=torch.int64)
        self.mask = (cols[None, :] < (bounds % B)[:, None]).to(device)   # its entries before the boundary
        self.gather = (block[:, None] * B + cols[None, :]).clamp_max(max(n - 1, 0)).to(device)
        self.block = block.to(device)

    def __call__(self, flat: "torch.Tensor") -> "torch.Tensor":
        import torch

        B, nb = self.BLOCK, self.full_blocks
        # float32 within a block (a float64 accumulator is 17x slower on the CPU), float64 across blocks
        blocks = flat[: nb * B].view(nb, B).sum(1)
        if self.numel > nb * B:
            blocks = torch.cat([blocks, flat[nb * B:].sum(0).view(1)])
        before = torch.cat([blocks.new_zeros(1, dtype=torch.float64), blocks.double().cumsum(0)])
        partial = torch.where(self.mask, flat[self.gather], 0.0).sum(1).double()
        prefix = before[self.block] + partial
        return (prefix[1:] - prefix[:-1]).to(flat.dtype)


def torch_mul_out(a: "torch.Tensor", b, out: "torch.Tensor") -> "torch.Tensor":
    """out = a·b (out may alias a)."""
    import torch

    if out is a:
        return out.mul_(b)
    return torch.mul(a, b, out=out)


class MaskedDiff:
    """Fixed-mask phase state: δ lives only on sorted flat positions `index` with trainable `values`."""

    def __init__(self, flat: FlatParams, index: "torch.Tensor", values: "torch.Tensor", stored=None):
        import torch

        self.flat = flat
        dev = flat.theta.device
        self.index = index.to(dev)
        self.values = values.detach().to(dev, torch.float32).clone().requires_grad_(True)
        self.values.grad = torch.zeros_like(self.values)
        self.stored = stored  # `qat.StoredValues`: θ gets what a packed file will hold (train --values)
        with torch.no_grad():
            flat.theta.copy_(flat.theta0)
        self.write_()

    def write_(self) -> None:
        """θ = θ₀ + δ on the kept positions (everything else stays exactly θ₀); δ as stored under `train --values`."""
        import torch

        with torch.no_grad():
            delta = self.values if self.stored is None else self.stored(self.values)
            self.flat.theta.index_copy_(0, self.index, self.flat.theta0.index_select(0, self.index) + delta)

    def backward_(self) -> None:
        """dL/dvalues = dL/dθ at the kept positions."""
        import torch

        self.flat.collect_grads_()
        with torch.no_grad():
            torch.index_select(self.flat.grad, 0, self.index, out=self.values.grad)


# ------------------------------------------------------------------------------------------ fused kernels

COMPILE_MIN_NUMEL = 1 << 20
_KERNELS: dict = {}


def _fwd_math(u, la, w, theta0, zg, theta, beta: float, span: float, l: float):
    """u ← s = σ((logit u + log α)/β);  θ ← θ₀ + clamp(s·span + l, 0, 1)·z_g·w."""
    import torch

    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / beta)
    theta.copy_(theta0 + (s * span + l).clamp(0.0, 1.0) * zg * w)
    u.copy_(s)


def _bwd_math(g, w, s, la, zg, lam, gw, gla, lo: float, hi: float, span_beta: float, span: float, l: float,
              shift: float):
    """gw ← z·z_g·g;  gla ← g·w·z_g·span/β·s(1−s)·[lo<s<hi] + λ·p(1−p);  s ← p = σ(log α − shift)."""
    import torch

    gw.copy_((s * span + l).clamp(0.0, 1.0) * zg * g)
    inside = (s > lo) & (s < hi)
    p = torch.sigmoid(la - shift)
    gla.copy_(torch.where(inside, g * w * zg * (s * (1.0 - s)) * span_beta, 0.0) + lam * (p - p * p))
    s.copy_(p)


def fused_kernels(numel: int, device: "torch.device"):
    """torch.compile'd forward/backward gate passes for big models (one memory pass each), or None.

    DIFFPRUNE_COMPILE=0 turns them off, =1 forces them on whatever the size; any compile failure
    falls back to the eager passes (same maths, more memory passes).
    """
    import os

    import torch

    mode = os.environ.get("DIFFPRUNE_COMPILE", "auto")
    if mode == "0" or (mode != "1" and numel < COMPILE_MIN_NUMEL):
        return None
    key = device.type
    if key in _KERNELS:
        return _KERNELS[key]
    try:
        _KERNELS[key] = (torch.compile(_fwd_math, dynamic=False, fullgraph=True),
                         torch.compile(_bwd_math, dynamic=False, fullgraph=True))
    except Exception:  # noqa: BLE001 - no compiler, unsupported device...: the eager passes are exact too
        _KERNELS[key] = None
    return _KERNELS[key]
