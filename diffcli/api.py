"""The public library API: train a diff for any `torch.nn.Module` loaded from a base checkpoint, in your own loop.

    pruner = DiffPruner(model, "minilm", method="l0", sparsity=0.005, total_steps=len(loader))
    for batch in loader:                 # the L0 phase (l0 only; the mask methods choose their mask at once)
        pruner.begin()                   # sample the gates: θ = θ₀ + z⊙z_g⊙w
        model(**batch).loss.backward()
        pruner.finish()                  # dL/dw, dL/dlog α (+ the L0 penalty's gradient), its own AdamW steps
    pruner.project()                     # exactly k = round(S·N) entries (`choose_mask` for fisher/random/magnitude)
    opt = pruner.start_fixed(total_steps=len(loader))   # δ and AdamW at the k entries only
    for batch in loader:
        model(**batch).loss.backward()
        pruner.fixed_step()              # clip, AdamW, θ = θ₀ + δ at the kept entries
    diff = pruner.export()               # a Diff: `diffcli.checkpoint.save(diff, folder)` then `diffprune pack`

`diffprune train` drives a DiffPruner (`for_task_model`) from its own loop (data, evaluation, resume, DDP);
`DiffPruningCallback` drives one from a `transformers.Trainer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from diffcli.errors import InvalidValueError
from diffcli.train_options import TrainOptions

if TYPE_CHECKING:
    import torch

    from diffcli.diff import Diff


class DiffPruner:
    """Diff training of `model` against the base it was loaded from (`base`: folder, alias or hub id).

    `options` are `train`'s (`TrainOptions` fields: sparsity, lr, alpha_lr, fixmask_lr, ...); `own_head=False`
    leaves the new head to your optimizer (as `DiffPruningCallback` does), else the pruner trains it too.
    """

    def __init__(self, model: "torch.nn.Module", base: str | Path, *, method: str = "l0", total_steps: int = 1,
                 own_head: bool = True, **options: Any):
        from diffcli.methods import get_method
        from diffcli.taskmodel import attach_base
        from diffcli.weights import resolve_model

        unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__))
        if unknown:
            raise InvalidValueError(f"unknown option {unknown[0]!r}; the options are TrainOptions' fields")
        opts = TrainOptions(method=method, **options)
        opts.validate()
        if get_method(method).own_fixed_phase:  # swr: gates over whole-tensor updates, not a sparse mask
            raise InvalidValueError(f"DiffPruner trains sparse masks; --method {method} runs through `diffprune "
                                    f"train` (or diffcli.training.train)")
        if method == "basis":  # its scales, pruning and basis records run in `train` only, for now
            raise InvalidValueError("DiffPruner runs l0 and the mask methods, not --method basis",
                                    hint="train basis scaling with `diffprune train --method basis`")
        tm = attach_base(model, resolve_model(str(base)))
        self._setup(tm, opts, str(base), next(model.parameters()).device, total_steps, own_head)

    @classmethod
    def for_task_model(cls, tm, opts: TrainOptions, device, total_steps: int, *, base_ref: str,
                       flat: bool = False) -> "DiffPruner":
        """`train`'s pruner, on a task model already split against its base; `flat=True` keeps δ's gradient and
        the fixed phase on N-sized flat buffers (`fixmask.FlatEngine`: DDP's gradient averaging needs them)."""
        self = cls.__new__(cls)
        self._setup(tm, opts, base_ref, device, total_steps, True, flat)
        return self

    def _setup(self, tm, opts: TrainOptions, base_ref: str, device, total_steps: int, own_head: bool,
               flat: bool = False) -> None:
        from diffcli.diffmodel import FlatParams, Layout
        from diffcli.methods.l0 import L0Trainer

        model = tm.model
        self.opts, self.base_ref, self.tm, self.device, self.own_head = opts, base_ref, tm, device, own_head
        params = dict(model.named_parameters())
        self.head = [params[n] for n in tm.head] if own_head else []
        self.l0 = (L0Trainer(model, tm.gated, tm.head if own_head else [], opts, device, total_steps)
                   if opts.method == "l0" else None)
        if self.l0 is not None:
            self.layout = self.l0.flat
        else:
            self.layout = FlatParams(model, tm.gated, device) if flat else Layout(model, tm.gated)
        self.flat_engine = flat
        self.method_state: Any = None  # what a method keeps beside the mask (basis: its `BasisScaling`)
        self.index: "torch.Tensor | None" = None
        self.values: "torch.Tensor | None" = None
        self.trainer = None
        self.engine = None
        self.info: dict[str, Any] = {}

    # -- the L0 phase (method l0) ------------------------------------------------------------------------------
    def begin(self) -> None:
        """Before each forward pass of the L0 phase: sample the gates and clear dL/dθ."""
        self._need_l0().begin()

    def finish(self) -> dict[str, float]:
        """After `loss.backward()`: the gates' and w's gradients (with the L0 penalty's, λ·∂E‖z‖₀), their steps."""
        return self._need_l0().finish()

    def project(self, batches: Iterable[dict] | None = None, world: int = 1) -> dict[str, Any]:
        """End the L0 phase: exactly k entries of the deterministic δ, topped up by `fill` (`batches` for fisher;
        `world`: the DDP processes whose Fisher sums are added)."""
        from diffcli.methods.l0 import gate_mask

        l0 = self._need_l0()
        if self.opts.fill == "fisher" and batches is None:
            raise InvalidValueError("fill='fisher' needs batches of training data: project(batches)")
        self.index, self.values, self.info = gate_mask(self.tm, l0, self.opts, lambda: batches, world)
        self.l0 = None  # free w, log α and their optimisers
        return self.info

    # -- the mask methods -------------------------------------------------------------------------------------
    def choose_mask(self, batches: Iterable[dict] | None = None, world: int = 1) -> dict[str, Any]:
        """fisher (over `batches`, on the model as it is), random (`seed`), or magnitude (|θ − θ₀| of the model
        as you finetuned it, which then returns to θ₀): exactly k = round(S·N) entries."""
        import torch

        from diffcli.methods import get_method
        from diffcli.methods.fixed_masks import MaskMethod
        from diffcli.projection import budget
        from diffcli.trained_diff import join_index

        method = get_method(self.opts.method)
        if not isinstance(method, MaskMethod):
            raise InvalidValueError(f"--method {method.name} learns its mask: call project() after its phase")
        if method.name == "fisher" and batches is None:
            raise InvalidValueError("the Fisher mask needs batches of training data")
        mask, values, info = method.mask(self.tm, self.layout, self.opts, lambda: batches, world)
        self.index = join_index(self.layout, mask)
        self.values = (torch.zeros(self.index.numel()) if values is None else values.cpu().to(torch.float32))
        info.update({"sparsity": self.opts.sparsity, "k": budget(self.opts.sparsity, self.layout.numel),
                     "n": self.layout.numel, "kept": int(self.index.numel()), "mask": method.name})
        self.info = info
        return self.info

    # -- the fixed-mask phase ---------------------------------------------------------------------------------
    def start_fixed(self, total_steps: int, lr: float | None = None):
        """Train only the mask's entries from now on (and the head when the pruner owns it); returns the trainer."""
        import dataclasses

        import torch

        from diffcli.fixmask import FlatEngine, SparseEngine

        if self.index is None:
            raise InvalidValueError("no mask yet: call project() (l0) or choose_mask() first")
        self.l0 = None  # a resumed run reaches the fixed phase without ending its L0 phase here
        opts = self.opts if lr is None else dataclasses.replace(self.opts, fixmask_lr=lr)
        if self.flat_engine:
            self.engine = FlatEngine(self.layout, self.index, self.values, self.head, opts, self.device,
                                     max(1, total_steps))
        else:
            if getattr(self.layout, "theta", None) is not None:  # the L0 phase's buffers: back to θ₀ before δ
                with torch.no_grad():
                    self.layout.theta.copy_(self.layout.theta0)
            self.engine = SparseEngine(self.tm.model, self.layout, self.index, self.values,
                                       self.tm.head if self.own_head else [], opts, max(1, total_steps))
        self.trainer = getattr(self.engine, "trainer", None)
        self.engine.zero_grad()  # gradients left by the mask's choice (Fisher, the L0 phase) do not leak in
        return self.trainer

    def fixed_step(self) -> None:
        """After `loss.backward()` in the fixed phase: clip, AdamW at the k entries, write θ, clear gradients."""
        if self.engine is None:
            raise InvalidValueError("the fixed phase has not started: call start_fixed() first")
        self.engine.step()
        self.engine.zero_grad()

    def export(self, meta: dict | None = None, best: dict | None = None) -> "Diff":
        """The diff as `train` writes it: sparse δ per shared tensor, untouched tensors as zero δ, the head whole.

        `best` (`best/values`, `best/head/<name>`) exports a kept snapshot instead of the tensors as they are.
        """
        from dataclasses import asdict

        import torch

        from diffcli.methods import get_method
        from diffcli.trained_diff import build_diff

        if best is None:
            if self.engine is not None:
                values = self.engine.values.detach().cpu()
            elif self.values is not None:
                values = self.values
            else:
                raise InvalidValueError("nothing to export yet: choose the mask first")
            params = dict(self.tm.model.named_parameters())
            best = {"best/values": values, **{f"best/head/{n}": params[n].detach() for n in self.tm.head}}
        merged = dict(meta or {})
        for key, value in {"method": get_method(self.opts.method).meta_name, "hyperparameters": asdict(self.opts),
                           "results": {"projection": self.info}}.items():
            merged.setdefault(key, value)
        return build_diff(self.tm, self.layout, self.index.to(torch.int64), best, model_ref=self.base_ref,
                          meta=merged)

    def _need_l0(self):
        if self.l0 is None:
            raise InvalidValueError("no L0 phase here: the method is not l0, or project() has ended it")
        return self.l0
