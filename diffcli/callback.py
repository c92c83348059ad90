"""`DiffPruningCallback`: a `transformers.Trainer` trains a diff with the user's own `TrainingArguments`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DiffPruningCallback("minilm", method="l0", sparsity=0.005)])
    trainer.train()
    checkpoint.save(trainer.callback_handler.callbacks[-1].diff, "ckpt/task")   # or callback.diff

The run's steps are split at `switch` (a fraction of `max_steps`): l0, swr and basis train their first phase
before it (l0: gates and w; swr: unit gates and B·A; basis: the basis scales), then make their choice (l0: exactly
k entries; swr: the units that fit the budget; basis: the bases pruned to --keep-bases); magnitude lets the Trainer
finetune densely before it, then keeps the k largest |δ|; fisher and random choose their mask at the start
(switch 0). After the switch only what was chosen changes (l0 and the mask methods: δ and AdamW at the k entries;
swr: the chosen units; basis: the kept scales, and with double pruning the second half of the remaining steps
trains the sparse δ on the scaled model, its mask Fisher-ranked over `fisher_batches` batches); the Trainer's own
optimizer keeps the new head through both phases. Clipping: in the first phase the pruner steps on the gradients
the Trainer clipped to `max_grad_norm`. In the fixed phase of l0 and the mask methods δ's gradient leaves the
parameters during backward, so the Trainer's clip sees the head only and the pruner clips δ to its own `grad_clip`
(default 1.0). swr's and basis's fixed phases read dL/dθ of the shared tensors at the optimizer step, after the
Trainer has clipped it with the head's: the head's clip then counts every shared tensor's gradient, the units or
bases not chosen included (`diffprune train` clips each engine's own parameters instead).
A callback may serve several `train()` calls (as `Trainer.hyperparameter_search` makes them): each starts afresh.
Refused at `on_train_begin`, each with one `InvalidValueError`: a Trainer with `world_size > 1` (torchrun, DDP;
`diffprune train` runs under torchrun) or with `n_gpu > 1` (one process on several GPUs: the Trainer's
DataParallel copies the model per GPU, and the pruner is built for the one model it wraps),
`resume_from_checkpoint` (a Trainer checkpoint holds the model, not the gates, w, mask and optimizer the diff
needs: train again, or use `diffprune train --resume`),
`load_best_model_at_end` (it would reload weights that are not the diff this callback exports), and a switch that
leaves either phase without a step. A run stopped before the switch leaves `diff` None, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import TrainerCallback

from diffcli.api import DiffPruner, checked_options
from diffcli.errors import InvalidValueError


class DiffPruningCallback(TrainerCallback):
    """Drive a `DiffPruner` from `Trainer` hooks; the trained diff is `self.diff` after `train()`."""

    def __init__(self, base: str, *, method: str = "magnitude", switch: float = 0.5, fisher_batches: int = 32,
                 **options: Any):
        at_start = method in ("fisher", "random")  # they choose their mask before any step
        if not 0 <= switch < 1 or (switch == 0 and not at_start):
            raise InvalidValueError(f"switch is a fraction of the steps in {'[0' if at_start else '(0'}, 1), "
                                    f"got {switch}", hint=f"--method {method} trains a first phase before the switch")
        if not isinstance(fisher_batches, int) or fisher_batches < 1:
            raise InvalidValueError(f"fisher_batches must be a whole number of batches, at least 1, "
                                    f"got {fisher_batches!r}")
        checked_options(method, options)  # refused here, before the Trainer starts
        self.base, self.method, self.options = base, method, options
        self.switch = 0.0 if at_start else switch
        self.fisher_batches = fisher_batches
        self.pruner: DiffPruner | None = None
        self.switch_step = 0
        self.second_step: int | None = None  # basis double pruning: where the sparse δ's phase starts
        self.fixed = False
        self.diff = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        self.pruner, self.fixed, self.second_step, self.diff = None, False, None, None  # a run of its own
        world = int(getattr(args, "world_size", 1) or 1)
        if world > 1:
            raise InvalidValueError(f"DiffPruningCallback trains in one process, and this Trainer runs {world}",
                                    hint="run the Trainer on one process, or train with `torchrun -m diffcli train`")
        gpus = int(getattr(args, "n_gpu", 1) or 1)
        if gpus > 1:
            raise InvalidValueError(f"DiffPruningCallback trains one copy of the model, and this Trainer splits each "
                                    f"batch over {gpus} GPUs (DataParallel)",
                                    hint="make one GPU visible (CUDA_VISIBLE_DEVICES=0), or train with "
                                         "`torchrun -m diffcli train`")
        if state.global_step > 0:
            raise InvalidValueError(f"DiffPruningCallback cannot resume a Trainer checkpoint (step {state.global_step}): "
                                    "it holds the model, not the diff's gates, mask and optimizer",
                                    hint="train from the start, or use `diffprune train --resume`")
        if getattr(args, "load_best_model_at_end", False):
            raise InvalidValueError("DiffPruningCallback exports the diff of the last step, and load_best_model_at_end "
                                    "would reload other weights into the model",
                                    hint="set load_best_model_at_end=False (the diff keeps the last step)")
        self.switch_step = int(round(self.switch * state.max_steps))
        if self.switch > 0 and not 0 < self.switch_step < state.max_steps:
            raise InvalidValueError(f"switch {self.switch} of {state.max_steps} steps leaves "
                                    f"{'the first phase' if self.switch_step == 0 else 'the fixed phase'} no step",
                                    hint="train more steps, or move switch")
        self.pruner = DiffPruner(model, self.base, method=self.method, total_steps=max(1, self.switch_step),
                                 own_head=False, **self.options)
        if self.method == "basis" and self.pruner.opts.double_prune:
            self.second_step = self.switch_step + (state.max_steps - self.switch_step) // 2
            if self.second_step == self.switch_step:
                raise InvalidValueError(f"switch {self.switch} of {state.max_steps} steps leaves double pruning's "
                                        "sparse phase no step", hint="train more steps, or move switch")
        if self.switch_step == 0:
            self._choose(train_dataloader)
            self._start_fixed(state)

    def on_step_begin(self, args, state, control, **kw):
        if not self.fixed and self.pruner.phase is not None:
            self.pruner.begin()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        p = self.pruner
        if self.fixed:
            p.fixed_step()  # l0 and the mask methods: the shared tensors' gradients went to the k-sized buffer
        elif p.phase is not None:
            p.finish()
        for param in getattr(p.layout, "params", ()):  # stepped by the pruner: the Trainer's optimizer skips them
            param.grad = None

    def on_step_end(self, args, state, control, train_dataloader=None, **kw):
        if not self.fixed and state.global_step >= self.switch_step:
            self._choose(train_dataloader)
            self._start_fixed(state)
        elif self.second_step is not None and state.global_step >= self.second_step:
            self.second_step = None
            self.pruner.choose_mask(self._batches(train_dataloader))  # double pruning: Fisher at the scaled model
            self.pruner.start_fixed(total_steps=max(1, state.max_steps - state.global_step))
            self._train_head()

    def on_train_end(self, args, state, control, **kw):
        if self.pruner is not None and self.pruner.chosen:
            self.diff = self.pruner.export()
            if self.pruner.trainer is not None:
                self.pruner.trainer.close()
        elif self.pruner is not None:
            warnings.warn(f"training stopped at step {state.global_step}, before the switch at step {self.switch_step}: "
                          "no diff was chosen, so DiffPruningCallback.diff is None", stacklevel=2)

    def _choose(self, train_dataloader) -> None:
        """End the first phase (l0, swr, basis), or choose the mask (fisher and random at once; magnitude from the
        Trainer's dense steps so far)."""
        if self.pruner.phase is not None:
            fill = self.method == "l0" and self.pruner.opts.fill == "fisher"  # l0's budget fill ranked by Fisher
            self.pruner.project(self._batches(train_dataloader) if fill else None)
        else:
            self.pruner.choose_mask(self._batches(train_dataloader) if self.method == "fisher" else None)

    def _batches(self, train_dataloader):
        dev = self.pruner.device
        return ({k: v.to(dev) for k, v in b.items()} for _, b in zip(range(self.fisher_batches), train_dataloader))

    def _start_fixed(self, state) -> None:
        end = self.second_step if self.second_step is not None else state.max_steps
        self.pruner.start_fixed(total_steps=max(1, end - state.global_step))
        self.fixed = True
        self._train_head()

    def _train_head(self) -> None:
        """The head stays the Trainer's to train: a sparse engine freezes every parameter it does not step."""
        for name in self.pruner.tm.head:
            self.pruner.tm.model.get_parameter(name).requires_grad_(True)
