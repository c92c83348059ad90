"""Fixed-mask sparse finetuning in less memory than full finetuning: δ and its optimizer live at k entries only.

The model keeps its own parameters (θ = θ₀ + δ written in place at the kept positions after every step).
A post-accumulate-grad hook per masked tensor gathers its gradient at the kept flat positions into one
k-sized buffer and frees the dense gradient at once, so at most one tensor's dense gradient exists at a
time; tensors without kept positions are frozen (no weight gradient is computed for them at all). δ (k
entries) and the dense head are updated by one AdamW (bias-corrected, linear warmup/decay, gradients
clipped jointly): the same δ as dense AdamW on a diff whose gradient is zero outside the mask.

    trainer = SparseDiffTrainer(model, mask, head=["classifier.weight", "classifier.bias"], lr=1e-3,
                                total_steps=len(loader) * epochs)
    for batch in loader:
        model(**batch).loss.backward()
        trainer.step()
        trainer.zero_grad()
    diff = trainer.to_diff(task_model, model_ref="minilm")   # a Diff that `pack` writes
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from diffcli.diff import Diff


@dataclass
class _Layout:
    """The masked tensors in `order` and where each one's kept entries sit in the k-sized buffers."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    offsets: list[int]          # global flat offsets, as training's FlatParams (for `build_diff`)


class SparseDiffTrainer:
    """An optimizer-like trainer of δ at fixed kept positions (`mask`: name → sorted int64 flat positions)
    plus dense `head` parameters; every other parameter of `model` is frozen while it is attached."""

    def __init__(self, model: "torch.nn.Module", mask: Mapping[str, "torch.Tensor"], head: Iterable[str] = (), *,
                 lr: float = 1e-3, head_lr: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 total_steps: int | None = None, warmup_steps: int = 0, values: str | None = None):
        import torch

        params = dict(model.named_parameters())
        self.model = model
        self.head = list(head)
        for name in list(mask) + self.head:
            if name not in params:
                raise InvalidValueError(f"the model has no parameter {name!r}")
        overlap = set(mask) & set(self.head)
        if overlap:
            raise InvalidValueError(f"{sorted(overlap)[0]!r} is both masked and a dense head parameter")
        if total_steps is not None and total_steps < 1:
            raise InvalidValueError(f"total_steps must be at least 1, got {total_steps}")
        self.max_grad_norm = float(max_grad_norm)
        self.total_steps, self.warmup_steps = total_steps, int(warmup_steps)
        self.names = [n for n in params if n in mask]  # the model's order
        self.index: dict[str, "torch.Tensor"] = {}
        self._seg: dict[str, tuple[int, int]] = {}
        k = 0
        for name in self.names:
            p = params[name]
            idx = torch.as_tensor(mask[name], dtype=torch.int64).reshape(-1).to(p.device)
            if idx.numel() and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= p.numel()):
                raise InvalidValueError(f"mask positions of {name!r} must be strictly increasing in [0, {p.numel()})")
            if not p.is_contiguous():
                raise InvalidValueError(f"parameter {name!r} is not contiguous; its flat positions are ambiguous")
            self.index[name] = idx
            self._seg[name] = (k, k + int(idx.numel()))
            k += int(idx.numel())
        self.k = k
        self.stored = None  # `qat.StoredValues`: θ gets what `pack --values` will store for δ (quantization-aware)
        if values is not None:
            from diffcli.qat import StoredValues

            self.stored = StoredValues.for_segments([b - a for a, b in self._seg.values()], values)
        dev = params[self.names[0]].device if self.names else torch.device("cpu")
        self.base_values = torch.empty(k, dtype=torch.float32, device=dev)
        with torch.no_grad():
            for name in self.names:
                a, b = self._seg[name]
                self.base_values[a:b] = params[name].detach().reshape(-1)[self.index[name]].float()
        self.delta = torch.zeros(k, dtype=torch.float32, device=dev, requires_grad=True)
        self.delta.grad = torch.zeros_like(self.delta)
        self._params = params
        self._flags = {n: p.requires_grad for n, p in params.items()}
        self._hooks = []
        for n, p in params.items():
            live = (n in self._seg and self._seg[n][1] > self._seg[n][0]) or n in self.head
            p.requires_grad_(live)
            p.grad = None
            if live and n in self._seg:
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, n=n: self._gather(p, n)))
        groups = [{"params": [self.delta], "lr": lr}]
        head_params = [params[n] for n in self.head]
        if head_params:
            groups.append({"params": head_params, "lr": lr if head_lr is None else head_lr})
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                           foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: self._lr_factor(step))

    def _lr_factor(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then linear decay to 0 at `total_steps` (constant without it)."""
        if self.warmup_steps and step < self.warmup_steps:
            return step / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def _gather(self, p: "torch.Tensor", name: str) -> None:
        """dL/dθ at the kept positions into the k-sized buffer (summed over micro-batches); the dense grad goes."""
        a, b = self._seg[name]
        self.delta.grad[a:b].add_(p.grad.reshape(-1)[self.index[name]].float())
        p.grad = None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self) -> None:
        """Clip (δ and head jointly), AdamW, advance the schedule, write θ = θ₀ + δ at the kept positions."""
        import torch

        if self.max_grad_norm > 0:  # takes the parameters and scales their .grad
            torch.nn.utils.clip_grad_norm_([self.delta] + [self._params[n] for n in self.head], self.max_grad_norm,
                                           foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self._write()

    def _write(self) -> None:
        import torch

        with torch.no_grad():
            delta = self.delta if self.stored is None else self.stored(self.delta)
            for name in self.names:
                a, b = self._seg[name]
                if b > a:
                    p = self._params[name]
                    p.view(-1).index_copy_(0, self.index[name], (self.base_values[a:b] + delta[a:b]).to(p.dtype))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.delta.grad.zero_()
        for n in self.head:
            p = self._params[n]
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def close(self) -> None:
        """Detach from the model: remove the hooks and restore every parameter's requires_grad (θ stays)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for n, p in self._params.items():
            p.requires_grad_(self._flags[n])

    def __enter__(self) -> "SparseDiffTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def deltas(self) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
        """name → (kept flat positions, δ there), on the CPU."""
        out = {}
        for name in self.names:
            a, b = self._seg[name]
            out[name] = (self.index[name].cpu(), self.delta.detach()[a:b].cpu().clone())
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: positions, θ₀ and δ there, the head, AdamW and the schedule."""
        return {"names": list(self.names), "head_names": list(self.head),
                "index": {n: self.index[n].cpu() for n in self.names},
                "base_values": self.base_values.detach().cpu().clone(), "delta": self.delta.detach().cpu().clone(),
                "head": {n: self._params[n].detach().cpu().clone() for n in self.head},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the mask must be this trainer's; θ at the kept positions and the head are rewritten."""
        import torch

        if list(state["names"]) != self.names or list(state["head_names"]) != self.head or any(
                not torch.equal(state["index"][n].cpu(), self.index[n].cpu()) for n in self.names):
            raise InvalidValueError("the saved state was made with another mask or head than this trainer's")
        with torch.no_grad():
            self.base_values.copy_(state["base_values"])
            self.delta.copy_(state["delta"])
            for n in self.head:
                self._params[n].copy_(state["head"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._write()

    def to_diff(self, task_model: Any, *, model_ref: str, meta: Mapping[str, Any] | None = None) -> "Diff":
        """The trained diff in the layout `train` writes (sparse δ per shared tensor, the head as extras).

        `task_model` describes the model against its base as `training.TaskModel` does (`model`, `base_dir`,
        `gated`, `head`, `base_names`, `base_info`); every masked name must be one of its gated tensors.
        """
        import torch

        from diffcli.trained_diff import build_diff

        gated = list(task_model.gated)
        stray = sorted(set(self.names) - set(gated))
        if stray:
            raise InvalidValueError(f"masked tensor {stray[0]!r} is not one of the model's tensors shared with the base")
        shapes = [tuple(self._params[n].shape) for n in gated]
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + int(torch.Size(s).numel()))
        layout = _Layout(gated, shapes, offsets)
        idx, vals = [], []
        for name, a in zip(gated, offsets):
            if name in self._seg:
                lo, hi = self._seg[name]
                idx.append(self.index[name].cpu() + a)
                vals.append(self.delta.detach()[lo:hi].cpu())
        best = {"best/values": torch.cat(vals) if vals else torch.zeros(0)}
        best.update({f"best/head/{n}": self._params[n].detach() for n in task_model.head})
        index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
        return build_diff(task_model, layout, index, best, model_ref=model_ref, meta=dict(meta or {}))
