"""Every option of `train`: the shared loop's and each method's; all are CLI flags, all go into the checkpoint."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from diffcli.errors import InvalidValueError
from diffcli.gates import HardConcrete



# Where the fixed-mask phase starts the kept entries: the projected δ = ẑ⊙w (entries added by the budget fill
# at 0), or the raw learned w at every kept position (θ = θ₀ + m⊙w, as the original code restarts).
FIXMASK_STARTS = ("delta", "w")
# How the budget fill ranks the entries the gates closed: P(z≠0)·|w| from the L0 phase, or the diagonal of the
# empirical Fisher Σ(dL/dθ)² at the L0 model over --fill-samples training examples (Sung et al. 2021).
FILLS = ("gates", "fisher")
# --epochs left unset: a method with a first phase (magnitude's dense run, l0's gates, swr, basis) trains 5 epochs of
# it, with --fixmask-epochs 3 the 8-epoch split bench/results/quality-v2.md measured; a method without one records
# 3, the default before that table, so that its checkpoints and their files stay byte for byte what they were.
FIRST_PHASE_EPOCHS = 5
UNUSED_EPOCHS = 3


def default_epochs(method: str) -> int:
    """What `epochs` is when not given: FIRST_PHASE_EPOCHS for a method that takes --epochs, else UNUSED_EPOCHS."""
    from diffcli.methods.registry import CATALOG

    if method not in CATALOG:  # refused by validate(); any number will do until then
        return FIRST_PHASE_EPOCHS
    from diffcli.methods import get_method

    return FIRST_PHASE_EPOCHS if "epochs" in get_method(method).options else UNUSED_EPOCHS


@dataclass
class TrainOptions:
    """Every hyperparameter of the run; all are CLI flags and all are recorded in the checkpoint.

    `method` names the entry of `diffcli.methods` that trains the diff; the options only some methods take are
    listed by that method (`TrainMethod.options`); the others are shared by every method.
    """

    method: str = "magnitude"  # what bench/results/quality-v2.md's rule chose (README: Quality at equal compute)
    sparsity: float = 0.005
    epochs: int | None = None  # None: `default_epochs(method)`, 5 for a method with a first phase
    fixmask_epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    max_seq_length: int | None = None  # None: 128, or the model's position table where shorter (train resolves it)
    seed: int = 42
    lr: float = 1e-4
    alpha_lr: float = 0.05
    fixmask_lr: float = 1e-3
    fixmask_start: str = "delta"
    fill: str = "gates"
    fill_samples: int = 1024
    head_lr: float | None = None
    weight_decay: float = 0.0
    l0_lambda: float = 1.25e-7
    log_alpha_init: float = 5.0
    gate_l: float = -1.5
    gate_r: float = 1.5
    beta: float = 1.0
    structured: bool = True
    controller: bool = True
    controller_rate: float = 0.3
    controller_warmup: float = 0.6
    grad_clip: float = 1.0
    rank: int = 8  # swr: rank r of a matrix unit's candidate update B·A
    keep_bases: float | None = None  # basis: fraction of SVD bases kept after the scale phase (default 0.5)
    budget: str | None = None  # hard cap on stored update parameters, "14000" or "0.05%" of N (`budget.budget_count`)
    basis_lr: float = 1e-3  # basis: AdamW learning rate of the scales a in the scale phase
    basis_embeddings: bool = False  # basis: also rewrite the embedding tables
    double_prune: bool = False  # basis: add a sparse δ of --sparsity on top of the scales (`train --sparsity`)
    values: str | None = None  # quantization-aware fixed phase: θ = θ₀ + δ as `pack --values` stores it (`qat`)
    activation_checkpointing: int = 0  # recompute every n-th layer's activations in backward (0: off; `activations`)

    def __post_init__(self) -> None:
        if self.epochs is None:
            self.epochs = default_epochs(self.method)

    def validate(self) -> None:
        for name in ("sparsity", "lr", "alpha_lr", "fixmask_lr", "l0_lambda", "weight_decay", "controller_rate",
                     "grad_clip", "controller_warmup"):  # the library API takes them unparsed
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise InvalidValueError(f"{name} must be a number, got {v!r}",
                                        hint="a share is a fraction: sparsity=0.005 for 0.5%" if name == "sparsity"
                                        else None)
        if not 0 < self.sparsity <= 1:
            raise InvalidValueError(f"sparsity must lie in (0, 100%], got {self.sparsity}")
        for name in ("epochs", "fixmask_epochs"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_length is not None and self.max_seq_length < 8:
            raise InvalidValueError(f"--max-seq-length must be at least 8, got {self.max_seq_length}")
        for name in ("lr", "alpha_lr", "fixmask_lr", "l0_lambda", "weight_decay", "controller_rate", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise InvalidValueError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {v}")
        if self.head_lr is not None and not (math.isfinite(self.head_lr) and self.head_lr >= 0):
            raise InvalidValueError(f"--head-lr must be a finite number ≥ 0, got {self.head_lr}")
        if not 0 <= self.controller_warmup <= 1:
            raise InvalidValueError(f"--controller-warmup is a fraction of the L0 steps in [0, 1], "
                                    f"got {self.controller_warmup}")
        for name, allowed in (("fixmask_start", FIXMASK_STARTS), ("fill", FILLS)):
            if getattr(self, name) not in allowed:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                        f"got {getattr(self, name)!r}")
        if type(self.rank) is not int or self.rank < 1:
            raise InvalidValueError(f"--rank must be an integer ≥ 1, got {self.rank}")
        if type(self.activation_checkpointing) is not int or self.activation_checkpointing < 0:
            raise InvalidValueError(f"--activation-checkpointing must be a whole number ≥ 0 (every n-th layer; 0: off), "
                                    f"got {self.activation_checkpointing}")
        if self.values is not None:
            from diffcli.quantize import QUANTIZERS

            if self.values not in QUANTIZERS:
                raise InvalidValueError(f"--values {self.values!r} is not one of {', '.join(QUANTIZERS)}")
        if self.fill_samples < 1:
            raise InvalidValueError(f"--fill-samples must be at least 1, got {self.fill_samples}")
        if not math.isfinite(self.log_alpha_init):
            raise InvalidValueError("--log-alpha-init must be finite")
        self.gate()  # checks l, r, beta
        from diffcli.methods import get_method

        get_method(self.method).check(self)

    def gate(self) -> HardConcrete:
        return HardConcrete(self.gate_l, self.gate_r, self.beta)


def option_names() -> list[str]:
    return [f.name for f in fields(TrainOptions)]
