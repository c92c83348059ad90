"""`DiffPruningCallback`: a `transformers.Trainer` trains a diff with the user's own `TrainingArguments`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DiffPruningCallback("minilm", method="l0", sparsity=0.005)])
    trainer.train()
    checkpoint.save(trainer.callback_handler.callbacks[-1].diff, "ckpt/task")   # or callback.diff

The run's steps are split at `switch` (a fraction of `max_steps`): l0 trains its gates and w before it, then
projects to exactly k entries; magnitude lets the Trainer finetune densely before it, then keeps the k
largest |δ|; fisher and random choose their mask at the start (switch 0). After the switch only the k
entries change (δ and AdamW at the k entries, `SparseDiffTrainer`); the Trainer's own optimizer keeps the
new head. The Trainer clips gradients before the pruner sees them. One process (no DDP).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from diffcli.api import DiffPruner


class DiffPruningCallback(TrainerCallback):
    """Drive a `DiffPruner` from `Trainer` hooks; the trained diff is `self.diff` after `train()`."""

    def __init__(self, base: str, *, method: str = "l0", switch: float = 0.5, fisher_batches: int = 32,
                 **options: Any):
        if not 0 <= switch < 1:
            from diffcli.errors import InvalidValueError

            raise InvalidValueError(f"switch is a fraction of the steps in [0, 1), got {switch}")
        self.base, self.method, self.options = base, method, options
        self.switch = 0.0 if method in ("fisher", "random") else switch
        self.fisher_batches = fisher_batches
        self.pruner: DiffPruner | None = None
        self.switch_step = 0
        self.fixed = False
        self.diff = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        self.switch_step = int(round(self.switch * state.max_steps))
        self.pruner = DiffPruner(model, self.base, method=self.method, total_steps=max(1, self.switch_step),
                                 own_head=False, **self.options)
        if self.switch_step == 0:
            batches = None
            if self.method == "fisher":
                dev = self.pruner.device
                batches = ({k: v.to(dev) for k, v in b.items()}
                           for _, b in zip(range(self.fisher_batches), train_dataloader))
            self.pruner.choose_mask(batches)
            self._start_fixed(state)

    def on_step_begin(self, args, state, control, **kw):
        if self.pruner.l0 is not None:
            self.pruner.begin()

    def on_pre_optimizer_step(self, args, state, control, **kw):
        p = self.pruner
        if self.fixed:
            p.fixed_step()  # the shared tensors' gradients went to the k-sized buffer: the Trainer skips them
        elif p.l0 is not None:
            p.finish()
            for param in p.l0.flat.params:  # stepped by the pruner (through w): the Trainer's optimizer skips them
                param.grad = None

    def on_step_end(self, args, state, control, **kw):
        if not self.fixed and state.global_step >= self.switch_step:
            if self.pruner.l0 is not None:
                self.pruner.project()
            else:
                self.pruner.choose_mask()  # magnitude: the Trainer's dense steps so far
            self._start_fixed(state)

    def on_train_end(self, args, state, control, **kw):
        if self.pruner is not None and self.pruner.index is not None:
            self.diff = self.pruner.export()
            if self.pruner.trainer is not None:
                self.pruner.trainer.close()

    def _start_fixed(self, state) -> None:
        self.pruner.start_fixed(total_steps=max(1, state.max_steps - state.global_step))
        self.fixed = True
