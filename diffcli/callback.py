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
optimizer keeps the new head. The Trainer clips gradients before the pruner sees them. One process: a Trainer
with `world_size > 1` (torchrun, DDP) is refused at `on_train_begin` (`diffprune train` runs under torchrun).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from diffcli.api import DiffPruner, checked_options
from diffcli.errors import InvalidValueError


class DiffPruningCallback(TrainerCallback):
    """Drive a `DiffPruner` from `Trainer` hooks; the trained diff is `self.diff` after `train()`."""

    def __init__(self, base: str, *, method: str = "l0", switch: float = 0.5, fisher_batches: int = 32,
                 **options: Any):
        if not 0 <= switch < 1:
            raise InvalidValueError(f"switch is a fraction of the steps in [0, 1), got {switch}")
        checked_options(method, options)  # refused here, before the Trainer starts
        self.base, self.method, self.options = base, method, options
        self.switch = 0.0 if method in ("fisher", "random") else switch
        self.fisher_batches = fisher_batches
        self.pruner: DiffPruner | None = None
        self.switch_step = 0
        self.second_step: int | None = None  # basis double pruning: where the sparse δ's phase starts
        self.fixed = False
        self.diff = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        world = int(getattr(args, "world_size", 1) or 1)
        if world > 1:
            raise InvalidValueError(f"DiffPruningCallback trains in one process, and this Trainer runs {world}",
                                    hint="run the Trainer on one process, or train with `torchrun -m diffcli train`")
        self.switch_step = int(round(self.switch * state.max_steps))
        self.pruner = DiffPruner(model, self.base, method=self.method, total_steps=max(1, self.switch_step),
                                 own_head=False, **self.options)
        if self.method == "basis" and self.pruner.opts.double_prune:
            self.second_step = self.switch_step + (state.max_steps - self.switch_step) // 2
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

    def on_train_end(self, args, state, control, **kw):
        if self.pruner is not None and self.pruner.chosen:
            self.diff = self.pruner.export()
            if self.pruner.trainer is not None:
                self.pruner.trainer.close()

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
