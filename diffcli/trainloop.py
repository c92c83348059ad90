"""The loop every training method shares: data loading, optimiser set-up, evaluation, progress lines,
resumable per-epoch state, and the fixed-mask phase that finetunes the kept entries of a mask.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from diffcli.dist import Dist, autocast  # noqa: F401  (autocast: re-exported for the loops)
from diffcli.train_state import data_identity, gather_rng, load_optimizer, optimizer_tensors, save_state

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


class LinearDecay:
    """A fixed phase's AdamW `opt` (the fixed-mask engine's, swr's, basis's), its learning rates decaying linearly
    to 0 over `total` steps; its state and step count are what a resumed run needs to continue it."""

    opt: Any
    total: int
    steps: int

    def schedule(self, opt, total: int) -> None:
        """Take `opt` at step 0, its groups' learning rates as the schedule's start."""
        self.opt, self.total, self.steps = opt, total, 0
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]

    def opt_step(self) -> None:
        """One AdamW step at lr·max(0, 1 − steps/total) (the caller counts `steps`)."""
        decay = max(0.0, 1.0 - self.steps / self.total)
        for g in self.opt.param_groups:
            g["lr"] = g["initial_lr"] * decay
        self.opt.step()

    def state(self) -> dict[str, "torch.Tensor"]:
        return optimizer_tensors(self.opt, "opt_m")

    def resume(self, tensors: dict, steps: int) -> None:
        """The optimiser and schedule after `steps` (what it trains is put back by the caller)."""
        load_optimizer(self.opt, tensors, "opt_m")
        self.steps = steps


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
    """One `train` call's shared state: options, model, data, the record, per-epoch saving, one epoch's loop."""

    def __init__(self, opts: TrainOptions, rep: Reporter, dist: Dist, dev, tm: TaskModel, task_data, train_set,
                 work: Path, model_ref: str, on_epoch_end: Callable[[str, int], None] | None,
                 identity: dict | None = None):
        self.opts, self.rep, self.dist, self.dev, self.tm = opts, rep, dist, dev, tm
        self.task_data, self.spec, self.train_set = task_data, task_data.spec, train_set
        self.work, self.model_ref, self.on_epoch_end = work, model_ref, on_epoch_end
        self.opt_dict = asdict(opts)
        self.record: dict[str, Any] = {"history": []}
        self.ddp = None
        self.flat = None  # the shared tensors' layout (`FlatParams`, or `trained_diff.Layout`), set by the method
        self.sparse = False  # the fixed phase keeps δ at the k kept entries only (`fixmask.SparseEngine`)
        self.steps_per_epoch = steps_per_epoch(len(train_set), opts.batch_size, dist.world)
        self._identity = identity  # the data's digest where the caller made it already (a resume's check)

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.record["history"]

    @property
    def data_identity(self) -> dict:
        """The data this run trains on (`train_state.data_identity`), digested once, not at every save."""
        if self._identity is None:
            self._identity = data_identity(self.task_data)
        return self._identity

    def save(self, tensors: dict, state: dict) -> None:
        """The resumable state after an epoch, with every rank's RNG states (rank 0 writes; every rank waits)."""
        tensors = gather_rng(tensors, self.dist, self.dev)
        if self.dist.main:
            state.update({"options": self.opt_dict, "task": self.spec.name, "model": self.model_ref,
                          "data": self.data_identity, "record": self.record, "world_size": self.dist.world})
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

    def keep_if_best(self, entry: dict, label: str, epochs: int) -> bool:
        """Score an evaluated fixed-phase epoch, make it `record["best"]` when it beats it, print its line."""
        score = main_score(self.spec, entry["metrics"])
        better = score > self.record["best"]["score"]
        if better:
            self.record["best"] = {"epoch": entry["epoch"], "score": score, "metrics": entry["metrics"]}
        self.rep.line(f"{label} epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f} | "
                      f"{fmt_metrics(entry['metrics'])}{'  (best)' if better else ''}")
        return better
