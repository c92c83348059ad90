"""The training-method registry: what each `train --method` does before the shared fixed-mask phase.

A method decides which entries of the shared tensors the diff may use and where they start; the shared loop
(`diffcli.trainloop`) then finetunes exactly those entries (and the new head) with the mask fixed, keeps the
best dev epoch and writes the diff. Each method states, as data, how it reparametrizes the shared tensors,
what it penalises or constrains, what its fixed phase trains, how the result becomes a diff, and the options
of `TrainOptions` only it takes (every other option is shared by all methods).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import TYPE_CHECKING, Any, ClassVar

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch

    from diffcli.api import DiffPruner
    from diffcli.train_options import TrainOptions
    from diffcli.trainloop import Run

# TrainOptions fields every method takes; the rest belong to the methods that list them in `options`.
SHARED_OPTIONS = ("method", "sparsity", "fixmask_epochs", "batch_size", "eval_batch_size", "max_seq_length", "seed",
                  "fixmask_lr", "head_lr", "weight_decay", "grad_clip", "activation_checkpointing")


class TrainMethod(ABC):
    """One way of choosing the diff's mask and its starting values; subclasses register with `@register`."""

    name: ClassVar[str]                 # the `--method` value
    meta_name: ClassVar[str]            # the checkpoint's `meta.method`
    options: ClassVar[tuple[str, ...]] = ()  # TrainOptions fields only this method takes
    reparametrizes: ClassVar[str]       # how θ is written during the method's own phase
    penalises: ClassVar[str]            # what it penalises or constrains
    fixed_phase: ClassVar[str]          # what the fixed-mask phase trains
    to_diff: ClassVar[str]              # how the result becomes a diff
    # resumable phases (saved per epoch) that `select` runs; an `own_fixed_phase` method lists its fixed phase too
    phases: ClassVar[tuple[str, ...]] = ()
    epochs_phase: ClassVar[str | None] = None  # the phase `--epochs` counts, when the method takes it
    own_fixed_phase: ClassVar[bool] = False  # `select` trains the fixed phase itself and `build` makes the diff
    memory: ClassVar[str]               # its peak, as `memory_estimate.estimate` names it: full, l0 or sparse

    @classmethod
    def takes(cls, name: str) -> bool:
        """Whether a run of this method reads option `name`: a shared one or one of its own."""
        return name in SHARED_OPTIONS or name in cls.options

    def check(self, opts: "TrainOptions") -> None:
        """Refuse options that this method does not take but that were changed from their default."""
        defaults = type(opts)(method=opts.method)  # TrainOptions, from the instance: this package never imports it
        foreign = [f.name for f in fields(opts) if not self.takes(f.name)
                   and getattr(opts, f.name) != getattr(defaults, f.name)]
        if foreign:
            raise InvalidValueError(foreign_message(self.name, foreign))

    @abstractmethod
    def setup(self, run: "Run") -> Any:
        """The run's `DiffPruner` (`DiffPruner.for_task_model`; the method's phases, the fixed phase and the export
        drive it); set `run.flat` to its layout. An `own_fixed_phase` method (swr: no sparse mask to fix) runs its
        fixed phase in `select` and makes the diff in `build`. Called before DDP wraps the model."""

    def restore(self, run: "Run", state: Any, tensors: dict, saved: dict) -> None:
        """Put an interrupted run's state back, in the phase `saved["phase"]` (one of `phases`), so that `select`
        continues it."""

    @abstractmethod
    def select(self, run: "Run", state: Any, done: int) -> dict[str, "torch.Tensor"]:
        """Run the method's phases (from epoch `done` of the phase `restore` put back, else of the first) and return
        the fixed phase's start (an `own_fixed_phase` method: the best fixed epoch's snapshot, for `build`).

        The result holds `mask/index` (sorted flat positions, exactly k = round(S·N) unless fewer are usable),
        `mask/values` (δ there) and `head/<name>` for every new tensor; `run.record["projection"]` says how it
        was chosen (`k`, `n`, `kept`, ...).
        """

    def build(self, run: "Run", state: Any, best: dict[str, Any], *, model_ref: str, meta: dict):
        """The diff of a method with its own fixed phase, from what `select` returned (`own_fixed_phase` only)."""
        raise NotImplementedError(f"--method {self.name} uses the shared fixed-mask phase")

    def resume_fixed(self, run: "Run", state: Any, tensors: dict) -> None:
        """Before the shared fixed-mask phase resumes: rebuild what the method's own phases left in the model
        (`state`: what `setup` returned)."""

    def finish(self, run: "Run", tensors: dict, diff):
        """The trained diff, completed with what the method keeps beside the sparse δ (default: nothing)."""
        return diff

    # -- the library API (`DiffPruner` dispatches every phase call to its method) ---------------------------------
    def first_phase(self, pruner: "DiffPruner", total_steps: int) -> Any:
        """The object whose `begin()`/`finish()` run this method's first phase in a `DiffPruner` (None: no such phase;
        its `flat`, when it has one, is the pruner's layout)."""
        return None

    def project(self, pruner: "DiffPruner", batches, world: int) -> dict[str, Any]:
        """`DiffPruner.project()`: end the first phase with the method's choice; returns what to record."""
        raise InvalidValueError(f"--method {self.name} has no phase to end: call choose_mask()")

    def choose_mask(self, pruner: "DiffPruner", batches, world: int) -> dict[str, Any]:
        """`DiffPruner.choose_mask()`: a mask of k entries chosen in one pass (sets `pruner.index`, `pruner.values`)."""
        raise InvalidValueError(f"--method {self.name} learns its mask: call project() after its phase")

    def fixed_engine(self, pruner: "DiffPruner", total_steps: int, opts: "TrainOptions") -> Any:
        """`DiffPruner.start_fixed()`: the engine (`step`, `zero_grad`, `values`) of the fixed phase; default: δ at the
        chosen mask's entries (`DiffPruner.mask_engine`)."""
        return pruner.mask_engine(total_steps, opts)

    def export(self, pruner: "DiffPruner", meta: dict, best: dict | None):
        """`DiffPruner.export()`: the trained Diff; default: δ at the mask's entries and the head (`build_diff`)."""
        return pruner.mask_diff(meta, best)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "options": list(self.options), "reparametrizes": self.reparametrizes,
                "penalises": self.penalises, "fixed_phase": self.fixed_phase, "to_diff": self.to_diff}


# Every `--method`, in the order listings show them, and the module that registers it. A module is imported when
# its method is first asked for, so a run imports (and a benchmark's cache keys on) its own method's code only.
CATALOG = {"l0": "diffcli.methods.l0", "fisher": "diffcli.methods.fixed_masks",
           "random": "diffcli.methods.fixed_masks", "magnitude": "diffcli.methods.fixed_masks",
           "swr": "diffcli.methods.swr", "basis": "diffcli.methods.basis"}
REGISTRY: dict[str, TrainMethod] = {}


def register(cls: type[TrainMethod]) -> type[TrainMethod]:
    REGISTRY[cls.name] = cls()
    return cls


def method_names() -> list[str]:
    return list(CATALOG)


def get_method(name: str) -> TrainMethod:
    if name not in CATALOG:
        raise InvalidValueError(f"unknown --method {name!r}; choose one of {', '.join(CATALOG)}")
    if name not in REGISTRY:
        import importlib

        importlib.import_module(CATALOG[name])
    return REGISTRY[name]


def all_methods() -> dict[str, TrainMethod]:
    """Every method, in `CATALOG` order (imports each one's module)."""
    return {name: get_method(name) for name in CATALOG}


def foreign_message(method: str, names: list[str]) -> str:
    """One line naming the options a method does not take and the methods that do."""
    parts = []
    for n in names:
        takers = [m.name for m in all_methods().values() if n in m.options]
        parts.append(f"--{n.replace('_', '-')} (taken by --method {'/'.join(takers)})" if takers
                     else f"--{n.replace('_', '-')}")
    return f"--method {method} does not take {', '.join(parts)}"
