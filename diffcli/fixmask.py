"""The fixed-mask phase every method ends with: finetune the k kept entries and the head, keep the best dev epoch.

Two engines do the same step (AdamW on δ at the kept entries and on the head, gradients clipped jointly, the
learning rate decaying linearly to 0): `FlatEngine` over the N-sized flat buffers of `diffmodel.MaskedDiff`
(the `l0` method's, and every method's under DDP, whose gradient averaging needs whole gradients), and
`SparseEngine` over `sparse_training.SparseDiffTrainer`, whose δ, gradient and optimizer state live at the k
kept entries only (the mask methods' single-process path: less memory than full finetuning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffcli.dist import wrap_ddp
from diffcli.train_state import load_optimizer, optimizer_tensors, restore_rng, rng_tensors
from diffcli.trainloop import (LinearDecay, adamw, clip, evaluate_on, fmt_metrics, forward_backward, main_score,
                               zero_grads)

if TYPE_CHECKING:
    import torch

    from diffcli.train_options import TrainOptions
    from diffcli.trainloop import Run


class FlatEngine(LinearDecay):
    """δ on the kept flat positions of `FlatParams`; θ₀, θ and dL/dθ stay N-sized."""

    def __init__(self, flat, index: "torch.Tensor", values: "torch.Tensor", head: list, opts: "TrainOptions",
                 device: "torch.device", total: int):
        from diffcli.diffmodel import MaskedDiff

        self.flat, self.head = flat, head
        stored = None
        if opts.values is not None:  # quantization-aware: θ = θ₀ + what `pack --values` stores for δ
            from diffcli.qat import StoredValues

            stored = StoredValues.for_flat(flat.offsets, index, opts.values)
        self.md = MaskedDiff(flat, index, values, stored)
        groups = [{"params": [self.md.values], "lr": opts.fixmask_lr}]
        if head:
            groups.append({"params": head, "lr": opts.head_lr if opts.head_lr is not None else opts.fixmask_lr})
        self.schedule(adamw(groups, opts.fixmask_lr, opts.weight_decay, device), total)
        self.grad_clip = opts.grad_clip

    @property
    def values(self) -> "torch.Tensor":
        return self.md.values

    def zero_grad(self) -> None:
        zero_grads(self.flat, self.head)

    def step(self) -> None:
        self.md.backward_()
        clip([self.md.values] + self.head, self.grad_clip)
        self.opt_step()
        self.md.write_()
        self.steps += 1

    def resume(self, tensors: dict, steps: int) -> None:
        import torch

        super().resume(tensors, steps)
        with torch.no_grad():
            self.md.values.copy_(tensors["mask/values"])
        self.md.write_()


class SparseEngine:
    """δ, its gradient and AdamW's moments at the k kept entries only (`SparseDiffTrainer`); the model is θ."""

    def __init__(self, model, layout, index: "torch.Tensor", values: "torch.Tensor", head_names: list[str],
                 opts: "TrainOptions", total: int):
        import torch

        from diffcli.sparse_training import SparseDiffTrainer
        from diffcli.trained_diff import split_index

        self.trainer = SparseDiffTrainer(model, split_index(layout, index), head=head_names, lr=opts.fixmask_lr,
                                         head_lr=opts.head_lr, weight_decay=opts.weight_decay,
                                         max_grad_norm=opts.grad_clip, total_steps=total, values=opts.values)
        with torch.no_grad():
            self.trainer.delta.copy_(values.to(self.trainer.delta.device, torch.float32))
        self.trainer._write()

    @property
    def values(self) -> "torch.Tensor":
        return self.trainer.delta

    @property
    def steps(self) -> int:
        return int(self.trainer.scheduler.last_epoch)

    def zero_grad(self) -> None:
        self.trainer.zero_grad()

    def step(self) -> None:
        self.trainer.step()

    def resume(self, tensors: dict, steps: int) -> None:
        import torch

        t = self.trainer
        load_optimizer(t.optimizer, tensors, "opt_m")
        t.scheduler.last_epoch = steps
        for g, base in zip(t.optimizer.param_groups, t.scheduler.base_lrs):
            g["lr"] = base * t._lr_factor(steps)
        with torch.no_grad():
            t.delta.copy_(tensors["mask/values"])
        t._write()

    def state(self) -> dict[str, "torch.Tensor"]:
        return optimizer_tensors(self.trainer.optimizer, "opt_m")


def fixmask_phase(run: "Run", pruner, tensors: dict, resumed: dict | None, done: int):
    """Finetune the kept entries and the head with the mask fixed (`pruner`'s fixed phase, a `DiffPruner`); keep
    the best dev epoch (0 = the mask's start).

    `tensors` holds the mask (`mask/index`, `mask/values`) and the head (`head/<name>`) the method chose, and
    may hold `method/...` tensors the method keeps for its diff (saved with every epoch).
    Returns the best epoch's tensors (`best/values`, `best/head/...`).
    """
    import torch

    opts, rep, tm, dev, record = run.opts, run.rep, run.tm, run.dev, run.record
    params = dict(tm.model.named_parameters())
    head = [params[n] for n in tm.head]
    index = tensors["mask/index"]
    with torch.no_grad():
        for n, p in zip(tm.head, head):
            p.copy_(tensors[f"head/{n}"])
    pruner.index, pruner.values = index, tensors["mask/values"]
    pruner.start_fixed(opts.fixmask_epochs * run.steps_per_epoch)
    engine = pruner.engine

    def snapshot() -> dict[str, "torch.Tensor"]:
        return {"best/values": engine.values.detach().clone(),
                **{f"best/head/{n}": p.detach().clone() for n, p in zip(tm.head, head)}}

    if resumed is None:  # first entry into the phase: score the mask's start (epoch 0 candidate)
        if run.dist.main:
            record["projection"]["metrics"] = evaluate_on(tm, run.task_data, opts, dev)
            record["best"] = {"epoch": 0, "score": main_score(run.spec, record["projection"]["metrics"]),
                              "metrics": record["projection"]["metrics"]}
            rep.line(f"projection to {opts.sparsity:.3%}: nnz {record['projection']['kept']} | "
                     f"{fmt_metrics(record['projection']['metrics'])}")
        best_tensors = snapshot()
        run.save({**tensors, **best_tensors, **rng_tensors(dev, None)}, {"phase": "fixmask", "epochs_done": 0, "step": 0})
    else:
        best_tensors = {k: v for k, v in tensors.items() if k.startswith("best/")}
        engine.resume(tensors, int(resumed["step"]))
        restore_rng(tensors, dev, None)
    if run.ddp is None:
        run.ddp = wrap_ddp(tm.model, run.dist, dev)
    fwd = run.ddp if run.ddp is not None else tm.model

    def step(batch: dict) -> float:
        loss = forward_backward(fwd, batch, dev)
        pruner.fixed_step()
        return loss

    for epoch in range(done, opts.fixmask_epochs if index.numel() else 0):  # an empty mask: nothing to finetune
        entry = {"phase": "fixmask", "epoch": epoch + 1,
                 "loss": run.epoch("fixed-mask", epoch, opts.fixmask_epochs, opts.seed + 1, step)}
        if run.dist.main:
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, dev)
            if run.keep_if_best(entry, "fixed-mask", opts.fixmask_epochs):
                best_tensors = snapshot()
        run.history.append(entry)
        cur = {**{k: v for k, v in tensors.items() if k.startswith("method/")},  # the method's own, kept along
               "mask/index": index, "mask/values": engine.values.detach(),
               **{f"head/{n}": p.detach() for n, p in zip(tm.head, head)}}
        run.save({**cur, **best_tensors, **engine.state(), **rng_tensors(dev, None)},
                 {"phase": "fixmask", "epochs_done": epoch + 1, "step": engine.steps})
        run.epoch_done("fixmask", epoch + 1)
    return best_tensors
