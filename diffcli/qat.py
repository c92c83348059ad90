"""Quantization-aware fixed-mask phase (`train --values Q`): the model sees the values a packed file will hold.

The fixed phase writes θ = θ₀ + P(δ) where P is exactly what `pack --values Q` stores for δ
(`quantize.quantize_stored`: block scales per tensor, entries coded 0 dropped, scales refit), while AdamW keeps
the full-precision δ and takes dL/dθ as its gradient (the straight-through estimator, Bengio et al. 2013). The
checkpoint keeps δ; packing it with the same value format rebuilds the very model that was evaluated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from diffcli import quantize

if TYPE_CHECKING:
    import torch


class StoredValues:
    """P(δ) for δ laid out tensor by tensor (`tensor_ids[i]`: the tensor of entry i, non-decreasing)."""

    def __init__(self, tensor_ids: np.ndarray, quantizer: str, block: int | None = None):
        self.quantizer = quantizer
        self.block = quantize.check_spec(quantizer, block)
        self.tensor_ids = np.asarray(tensor_ids, dtype=np.int64)
        self.ntensors = int(self.tensor_ids.max()) + 1 if self.tensor_ids.size else 0

    def __call__(self, values: "torch.Tensor") -> "torch.Tensor":
        import torch

        v = values.detach().float().cpu().numpy()
        nonzero = v != 0  # entries still at 0 are not stored at all (`build_diff`), so they take no block slot
        counts = np.bincount(self.tensor_ids[nonzero], minlength=self.ntensors)
        q, keep, _ = quantize.quantize_stored(v[nonzero], counts, self.quantizer, self.block)
        stored = np.zeros(int(nonzero.sum()), dtype=np.float32)
        stored[keep] = q.values
        out = np.zeros_like(v)
        out[nonzero] = stored
        return torch.from_numpy(out).to(values.device)

    @classmethod
    def for_segments(cls, sizes: list[int], quantizer: str, block: int | None = None) -> "StoredValues":
        """Entries of consecutive tensors holding `sizes` entries each."""
        return cls(np.repeat(np.arange(len(sizes)), sizes), quantizer, block)

    @classmethod
    def for_flat(cls, offsets: list[int], index: "torch.Tensor", quantizer: str,
                 block: int | None = None) -> "StoredValues":
        """Entries at sorted global flat positions `index` of tensors starting at `offsets` (FlatParams layout)."""
        pos = index.detach().cpu().numpy()
        return cls(np.searchsorted(np.asarray(offsets[1:], dtype=np.int64), pos, side="right"), quantizer, block)
