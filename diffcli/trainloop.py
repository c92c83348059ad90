"""The loop every training method shares: data loading, optimiser set-up, evaluation, progress lines,
resumable per-epoch state, and the fixed-mask phase that finetunes the kept entries of a mask.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from diffcli.dist import Dist, wrap_ddp
from diffcli.train_state import load_optimizer, optimizer_tensors, restore_rng, rng_tensors, save_state

if TYPE_CHECKING:
    import torch

    from diffcli.taskmodel import TaskModel
    from diffcli.train_options import TrainOptions


@dataclass
class Reporter:
    """How the library talks to the terminal: a progress-bar factory and an info-line sink."""

    progress: Callable[[str, int | None], ContextManager[Any]] | None = None
    info: Callable[[str], None] | None = None
    warn: Callable[[str], None] | None = None

    @contextmanager
    def bar(self, description: str, total: int) -> Iterator[Any]:
        if self.progress is None:
            yield _NullBar()
        else:
            with self.progress(description, total) as handle:
                yield handle

    def line(self, text: str) -> None:
        if self.info is not None:
            self.info(text)

    def warning(self, text: str) -> None:
        if self.warn is not None:
            self.warn(text)


class _NullBar:
    def advance(self, n: int = 1, status: str = "") -> None:
        pass



def loader(dataset, batch_size: int, seed: int, epoch: int, dist: Dist):
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    per_rank = math.ceil(n / world)
    return math.ceil(per_rank / batch_size)


def adamw(params, lr: float, weight_decay: float, device: "torch.device"):
    import torch

    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused not available for this device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def autocast(device: "torch.device"):
    """The precision every training loop here runs under: bf16 autocast on a cuda GPU that has it, fp32 elsewhere."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def clip(tensors: list["torch.Tensor"], max_norm: float) -> None:
    import torch

    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=True)



def zero_grads(flat, head: list) -> None:
    """Clear dL/dθ of the flat parameters and drop the dense head's gradients before a backward pass."""
    flat.zero_grad()
    for p in head:
        p.grad = None


def forward_backward(model, batch: dict, device: "torch.device") -> float:
    """The task loss of one batch under the run's precision, back-propagated; its value."""
    with autocast(device):
        loss = model(**batch).loss
    loss.backward()
    return float(loss.detach())


def move(batch: dict, device: "torch.device") -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate_on(tm: TaskModel, task_data, opts: TrainOptions, device) -> dict[str, dict[str, float]]:
    from diffcli.evaluation import evaluate

    return evaluate(tm.model, tm.tokenizer, task_data, max_seq_length=opts.max_seq_length,
                    batch_size=opts.eval_batch_size, device=device)


def main_score(spec, results: dict[str, dict[str, float]]) -> float:
    from diffcli.metrics import main_score

    return main_score(spec, next(iter(results.values())))


def fmt_metrics(results: dict[str, dict[str, float]]) -> str:
    parts = []
    for split, ms in results.items():
        parts.append(split + " " + " ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    return " | ".join(parts)



class Run:
    """One `train` call's shared state: options, model, data, the record, per-epoch saving, the fixed-mask phase."""

    def __init__(self, opts: TrainOptions, rep: Reporter, dist: Dist, dev, tm: TaskModel, task_data, train_set,
                 work: Path, model_ref: str, on_epoch_end: Callable[[str, int], None] | None):
        self.opts, self.rep, self.dist, self.dev, self.tm = opts, rep, dist, dev, tm
        self.task_data, self.spec, self.train_set = task_data, task_data.spec, train_set
        self.work, self.model_ref, self.on_epoch_end = work, model_ref, on_epoch_end
        self.opt_dict = asdict(opts)
        self.record: dict[str, Any] = {"history": []}
        self.ddp = None
        self.flat = None  # the shared tensors as flat buffers (`diffmodel.FlatParams`), set by the method
        self.steps_per_epoch = steps_per_epoch(len(train_set), opts.batch_size, dist.world)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record["history"]

    def save(self, tensors: dict, state: dict) -> None:
        """The resumable state after an epoch (rank 0 writes; every rank waits for it)."""
        if self.dist.main:
            state.update({"options": self.opt_dict, "task": self.spec.name, "model": self.model_ref,
                          "record": self.record})
            save_state(self.work, tensors, state)
        self.dist.barrier()

    def epoch_done(self, phase: str, epoch: int) -> None:
        if self.on_epoch_end:
            self.on_epoch_end(phase, epoch)

    def epoch(self, label: str, epoch: int, epochs: int, seed: int, step: Callable[[dict], float]) -> float:
        """One pass over this rank's share of the training data, `step` per batch (on the device); the mean loss."""
        batches = loader(self.train_set, self.opts.batch_size, seed, epoch, self.dist)
        self.tm.model.train()
        losses = []
        with self.rep.bar(f"{label} epoch {epoch + 1}/{epochs}", len(batches)) as bar:
            for batch in batches:
                losses.append(step(move(batch, self.dev)))
                bar.advance(1, f"loss {losses[-1]:.4f}")
        return sum(losses) / max(len(losses), 1)

    def fixmask_phase(self, flat, tensors: dict, resumed: dict | None, done: int):
        """Finetune the kept entries and the head with the mask fixed; keep the best dev epoch (0 = the mask's start).

        `tensors` holds the mask (`mask/index`, `mask/values`) and the head (`head/<name>`) the method chose, and
        may hold `method/...` tensors the method keeps for its diff (saved with every epoch).
        Returns the mask's flat positions and the best epoch's tensors (`best/values`, `best/head/...`).
        """
        import torch

        from diffcli.diffmodel import MaskedDiff

        opts, rep, tm, dev, record = self.opts, self.rep, self.tm, self.dev, self.record
        params = dict(tm.model.named_parameters())
        head = [params[n] for n in tm.head]
        index = tensors["mask/index"]
        md = MaskedDiff(flat, index, tensors["mask/values"])
        with torch.no_grad():
            for n, p in zip(tm.head, head):
                p.copy_(tensors[f"head/{n}"])
        groups = [{"params": [md.values], "lr": opts.fixmask_lr}]
        if head:
            groups.append({"params": head, "lr": opts.head_lr if opts.head_lr is not None else opts.fixmask_lr})
        opt_m = adamw(groups, opts.fixmask_lr, opts.weight_decay, dev)
        for g in opt_m.param_groups:
            g["initial_lr"] = g["lr"]

        def snapshot() -> dict[str, "torch.Tensor"]:
            return {"best/values": md.values.detach().clone(),
                    **{f"best/head/{n}": p.detach().clone() for n, p in zip(tm.head, head)}}

        step_m = 0
        if resumed is None:  # first entry into the phase: score the projection (epoch 0 candidate)
            if self.dist.main:
                record["projection"]["metrics"] = evaluate_on(tm, self.task_data, opts, dev)
                record["best"] = {"epoch": 0, "score": main_score(self.spec, record["projection"]["metrics"]),
                                  "metrics": record["projection"]["metrics"]}
                rep.line(f"projection to {opts.sparsity:.3%}: nnz {record['projection']['kept']} | "
                         f"{fmt_metrics(record['projection']['metrics'])}")
            best_tensors = snapshot()
            self.save({**tensors, **best_tensors, **rng_tensors(dev, None)},
                      {"phase": "fixmask", "epochs_done": 0, "step": 0})
        else:
            best_tensors = {k: v for k, v in tensors.items() if k.startswith("best/")}
            step_m = int(resumed["step"])
            load_optimizer(opt_m, tensors, "opt_m")
            with torch.no_grad():
                md.values.copy_(tensors["mask/values"])
            md.write_()
            restore_rng(tensors, dev, None)
        if self.ddp is None:
            self.ddp = wrap_ddp(tm.model, self.dist, dev)
        fwd = self.ddp if self.ddp is not None else tm.model
        total_fix = max(1, opts.fixmask_epochs * self.steps_per_epoch)

        def step(batch: dict) -> float:
            nonlocal step_m
            zero_grads(flat, head)
            loss = forward_backward(fwd, batch, dev)
            md.backward_()
            clip([md.values] + head, opts.grad_clip)
            decay = max(0.0, 1.0 - step_m / total_fix)
            for g in opt_m.param_groups:
                g["lr"] = g["initial_lr"] * decay
            opt_m.step()
            md.write_()
            step_m += 1
            return loss

        for epoch in range(done, opts.fixmask_epochs if index.numel() else 0):  # empty mask: nothing to finetune
            mean_loss = self.epoch("fixed-mask", epoch, opts.fixmask_epochs, opts.seed + 1, step)
            entry = {"phase": "fixmask", "epoch": epoch + 1, "loss": mean_loss}
            if self.dist.main:
                entry["metrics"] = evaluate_on(tm, self.task_data, opts, dev)
                score = main_score(self.spec, entry["metrics"])
                better = score > record["best"]["score"]
                if better:
                    record["best"] = {"epoch": epoch + 1, "score": score, "metrics": entry["metrics"]}
                    best_tensors = snapshot()
                rep.line(f"fixed-mask epoch {epoch + 1}/{opts.fixmask_epochs}: loss {entry['loss']:.4f} | "
                         f"{fmt_metrics(entry['metrics'])}{'  (best)' if better else ''}")
            self.history.append(entry)
            cur = {**{k: v for k, v in tensors.items() if k.startswith("method/")},  # the method's own, kept along
                   "mask/index": index, "mask/values": md.values.detach(),
                   **{f"head/{n}": p.detach() for n, p in zip(tm.head, head)}}
            self.save({**cur, **best_tensors, **optimizer_tensors(opt_m, "opt_m"), **rng_tensors(dev, None)},
                      {"phase": "fixmask", "epochs_done": epoch + 1, "step": step_m})
            self.epoch_done("fixmask", epoch + 1)
        return index, best_tensors
