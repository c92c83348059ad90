"""The public library API: train a diff for any `torch.nn.Module` loaded from a base checkpoint, in your own loop.

    pruner = DiffPruner(model, "minilm", method="l0", sparsity=0.005, total_steps=len(loader))
    for batch in loader:                 # the method's first phase (l0, swr, basis; the mask methods have none)
        pruner.begin()                   # l0: sample the gates, θ = θ₀ + z⊙z_g⊙w
        model(**batch).loss.backward()
        pruner.finish()                  # l0: dL/dw, dL/dlog α (+ the L0 penalty's gradient), its own AdamW steps
    pruner.project()                     # exactly k = round(S·N) entries (`choose_mask` for fisher/random/magnitude)
    opt = pruner.start_fixed(total_steps=len(loader))   # δ and AdamW at the k entries only
    for batch in loader:
        model(**batch).loss.backward()
        pruner.fixed_step()              # clip, AdamW, θ = θ₀ + δ at the kept entries
    diff = pruner.export()               # a Diff: `diffcli.checkpoint.save(diff, folder)` then `diffprune pack`

What each call does per method (the method's module in `diffcli.methods` does it; docs/METHODS.md):

    call           l0                       fisher/random/magnitude   swr                          basis
    begin/finish   gates z and w            (no first phase)          unit gates z_u and B·A / δ   scales a, importance
    project()      top-k of δ (+ fill)      (refused)                 units that fit --budget      prune to --keep-bases
    choose_mask()  (refused)                the k-entry mask          (refused)                    double pruning: fold the
                                                                                                   scales, Fisher top-k
    start_fixed()  δ at the k entries       δ at the k entries        the chosen units, ungated    kept scales; after
                                                                                                   choose_mask: δ at k
    export()       sparse δ + head          sparse δ + head           low-rank/sparse δ + head     basis records + δ + head

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


def checked_options(method: str, options: dict[str, Any]) -> TrainOptions:
    """`TrainOptions` for `method`, refused with one line as `train` refuses its flags (an unknown option, a value
    out of range, an option the method does not take); for basis, giving `sparsity` implies `double_prune`."""
    from diffcli.methods import get_method
    from diffcli.methods.registry import foreign_message

    unknown = sorted(set(options) - set(TrainOptions.__dataclass_fields__) - {"method"})
    if unknown:
        raise InvalidValueError(f"unknown option {unknown[0]!r}; the options are TrainOptions' fields")
    m = get_method(method)  # every option it does not take is refused, even at its default (as train)
    foreign = sorted(n for n in options if not m.takes(n))
    if foreign:
        raise InvalidValueError(foreign_message(method, foreign), hint="drop them, or pick a method that takes them")
    if method == "basis" and "sparsity" in options and "double_prune" not in options:
        options = {**options, "double_prune": True}  # as `train --method basis --sparsity S`: double pruning
    opts = TrainOptions(**{**options, "method": method})
    opts.validate()
    return opts


class DiffPruner:
    """Diff training of `model` against the base it was loaded from (`base`: folder, alias or hub id).

    `options` are `train`'s (`TrainOptions` fields: sparsity, lr, alpha_lr, fixmask_lr, rank, budget, keep_bases,
    ...); `own_head=False` leaves the new head to your optimizer (as `DiffPruningCallback` does), else the pruner
    trains it too. `total_steps` counts the first phase's steps (its learning-rate decay and schedules).
    """

    def __init__(self, model: "torch.nn.Module", base: str | Path, *, method: str = "magnitude", total_steps: int = 1,
                 own_head: bool = True, **options: Any):
        from diffcli.taskmodel import attach_base
        from diffcli.weights import resolve_model

        opts = checked_options(method, options)
        tm = attach_base(model, resolve_model(str(base)))
        self._setup(tm, opts, str(base), next(model.parameters()).device, total_steps, own_head)
        self._planned = {"first": max(1, total_steps), "fixed": None}  # your loop's plan: a step past it warns once
        self._taken = {"first": 0, "fixed": 0}

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
        from diffcli.methods import get_method

        model = tm.model
        self.opts, self.base_ref, self.tm, self.device, self.own_head = opts, base_ref, tm, device, own_head
        self.method = get_method(opts.method)
        params = dict(model.named_parameters())
        self.head_names = list(tm.head) if own_head else []
        self.head = [params[n] for n in self.head_names]
        self.flat_engine = flat
        self.method_state: Any = None  # what a method keeps beside the mask (basis: its `BasisScaling`)
        self.index: "torch.Tensor | None" = None
        self.values: "torch.Tensor | None" = None
        self.chosen = False  # project() or choose_mask() has run: start_fixed() may begin
        self.trainer = None
        self.engine = None
        self.info: dict[str, Any] = {}
        self.phase = self.method.first_phase(self, total_steps)  # l0: L0Trainer; swr, basis: their own; else None
        layout = getattr(self.phase, "flat", None)
        if layout is None:
            layout = FlatParams(model, tm.gated, device) if flat else Layout(model, tm.gated)
        self.layout = layout

    @property
    def l0(self):
        """The l0 method's `L0Trainer` while its phase runs (None for other methods, or once project() ended it)."""
        return self.phase if self.opts.method == "l0" else None

    # -- the method's first phase (l0, swr, basis) -------------------------------------------------------------
    def begin(self) -> None:
        """Before each forward pass of the first phase (l0: sample the gates; swr: sample the unit gates and write
        θ₀ + z·Δ; basis: clear dL/dθ)."""
        self._need_phase().begin()
        self._count("first")

    def finish(self) -> dict[str, float]:
        """After `loss.backward()` in the first phase: the method's own gradients and optimizer steps (l0: w and
        log α with the L0 penalty; swr: B·A, δ and the unit gates with the cost penalty; basis: the scales)."""
        return self._need_phase().finish()

    def project(self, batches: Iterable[dict] | None = None, world: int = 1) -> dict[str, Any]:
        """End the first phase with the method's choice: l0, exactly k entries of the deterministic δ topped up by
        `fill` (`batches` for fisher; `world`: the DDP processes whose Fisher sums are added); swr, the units that
        fit the budget by gate probability; basis, the bases pruned to --keep-bases (or --budget)."""
        if self.chosen:
            raise InvalidValueError("the choice is made already: project() or choose_mask() has run")
        self.info = self.method.project(self, batches, world)
        self.chosen = True
        return self.info

    # -- the mask methods (and basis's double pruning) ---------------------------------------------------------
    def choose_mask(self, batches: Iterable[dict] | None = None, world: int = 1) -> dict[str, Any]:
        """fisher (over `batches`, on the model as it is), random (`seed`), or magnitude (|θ − θ₀| of the model
        as you finetuned it, which then returns to θ₀): exactly k = round(S·N) entries. basis: the sparse δ of
        double pruning (--sparsity with double_prune), Fisher-ranked on the scaled model, after its scale phase."""
        self.info = self.method.choose_mask(self, batches, world)
        self.chosen = True
        return self.info

    # -- the fixed phase --------------------------------------------------------------------------------------
    def start_fixed(self, total_steps: int, lr: float | None = None):
        """Train only what the choice kept (and the head when the pruner owns it); returns the sparse trainer when
        there is one (the mask methods on one process), else None."""
        import dataclasses

        if not self.chosen and self.index is None:
            raise InvalidValueError("no mask yet: call project() (l0, swr, basis) or choose_mask() first")
        opts = self.opts if lr is None else dataclasses.replace(self.opts, fixmask_lr=lr)
        if lr is not None:
            opts.validate()  # before any engine hooks the parameters
        if self.trainer is not None:  # a second start_fixed: the first engine's gradient hooks go first
            self.trainer.close()
            self.trainer = None
        self.engine = self.method.fixed_engine(self, max(1, total_steps), opts)
        self.trainer = getattr(self.engine, "trainer", None)
        self.engine.zero_grad()  # gradients left by the choice (Fisher, the first phase) do not leak in
        if hasattr(self, "_planned"):
            self._planned["fixed"], self._taken["fixed"] = max(1, total_steps), 0
        return self.trainer

    def mask_engine(self, total_steps: int, opts: TrainOptions):
        """The fixed phase of a sparse mask (`pruner.index`, `pruner.values`): δ and AdamW at its entries."""
        import torch

        from diffcli.fixmask import FlatEngine, SparseEngine

        self.phase = None  # a resumed run reaches the fixed phase without ending its first phase here
        if self.flat_engine:
            return FlatEngine(self.layout, self.index, self.values, self.head, opts, self.device, total_steps)
        if getattr(self.layout, "theta", None) is not None:  # the L0 phase's buffers: back to θ₀ before δ
            with torch.no_grad():
                self.layout.theta.copy_(self.layout.theta0)
        return SparseEngine(self.tm.model, self.layout, self.index, self.values, self.head_names, opts,
                            total_steps)

    def fixed_step(self) -> None:
        """After `loss.backward()` in the fixed phase: clip, AdamW on what is trained, write θ, clear gradients."""
        if self.engine is None:
            raise InvalidValueError("the fixed phase has not started: call start_fixed() first")
        self.engine.step()
        self.engine.zero_grad()
        self._count("fixed")

    def _count(self, phase: str) -> None:
        """Warn once when your loop takes more steps than it planned: the learning rate has decayed to 0 there."""
        import warnings

        if not hasattr(self, "_planned"):  # `train`'s pruner (for_task_model) plans its own steps
            return
        self._taken[phase] += 1
        planned = self._planned[phase]
        if self._taken[phase] == planned + 1:
            where = "DiffPruner(total_steps=...)" if phase == "first" else "start_fixed(total_steps=...)"
            warnings.warn(f"step {planned + 1} of the {phase} phase is past its {where} of {planned}: its learning "
                          "rate has decayed to 0, so nothing it trains changes any more", stacklevel=3)

    def export(self, meta: dict | None = None, best: dict | None = None) -> "Diff":
        """The diff as `train` writes it: the method's records for every shared tensor (zero δ where untouched)
        and the head whole. `best` (the method's snapshot; `best/values`, `best/head/<name>` for a sparse mask)
        exports a kept snapshot instead of the tensors as they are."""
        from dataclasses import asdict

        merged = dict(meta or {})
        for key, value in {"method": self.method.meta_name, "hyperparameters": asdict(self.opts),
                           "results": {"projection": self.info}}.items():
            merged.setdefault(key, value)
        return self.method.export(self, merged, best)

    def mask_diff(self, meta: dict, best: dict | None) -> "Diff":
        """A sparse mask's diff: δ at `index` (the fixed phase's values, else the choice's) and the head."""
        import torch

        from diffcli.fixmask import FlatEngine, SparseEngine
        from diffcli.trained_diff import build_diff

        index = self.index if self.index is not None else torch.zeros(0, dtype=torch.int64)
        if best is None:
            if self.index is None:
                if not self.chosen:
                    raise InvalidValueError("nothing to export yet: choose the mask first")
                values = torch.zeros(0)
            elif isinstance(self.engine, (FlatEngine, SparseEngine)):
                values = self.engine.values.detach().cpu()
            else:
                values = self.values
            params = dict(self.tm.model.named_parameters())
            best = {"best/values": values, **{f"best/head/{n}": params[n].detach() for n in self.tm.head}}
        return build_diff(self.tm, self.layout, index.to(torch.int64), best, model_ref=self.base_ref, meta=meta)

    def _need_phase(self):
        if self.phase is None or self.chosen:
            raise InvalidValueError(f"no L0 phase here: --method {self.opts.method} has no first phase (l0, swr and "
                                    "basis have one), or project() has ended it")
        return self.phase
