"""`diffprune train`: L0 diff learning with hard-concrete gates, a density controller, the magnitude
projection to an exact budget, a fixed-mask finetuning phase, resumable state and DDP.

Phases: (1) L0 — θ = θ₀ + z⊙z_g⊙w with w, log α trained by separate AdamW optimisers and the penalty
weight λ steered by `DensityController` so that the expected density of the gates reaches the target;
(2) projection — exact global top-k of the deterministic δ (`projection.project`); (3) fixed mask —
only the kept entries (and the dense new head) are finetuned; the best dev epoch is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator

from diffcli.errors import DataError, InvalidValueError, OutputExistsError
from diffcli.gates import HardConcrete
from diffcli.train_state import (STATE_JSON, check_resume_options, load_optimizer, load_state, optimizer_tensors,
                                 partial_dir, restore_rng, rng_tensors, save_state)

if TYPE_CHECKING:
    import torch



# Where the fixed-mask phase starts the kept entries: the projected δ = ẑ⊙w (entries added by the budget fill
# at 0), or the raw learned w at every kept position (θ = θ₀ + m⊙w, as the original code restarts).
FIXMASK_STARTS = ("delta", "w")
# How the budget fill ranks the entries the gates closed: P(z≠0)·|w| from the L0 phase, or the diagonal of the
# empirical Fisher Σ(dL/dθ)² at the L0 model over --fill-samples training examples (Sung et al. 2021).
FILLS = ("gates", "fisher")


@dataclass
class TrainOptions:
    """Every hyperparameter of the method; all are CLI flags and all are recorded in the checkpoint."""

    sparsity: float = 0.005
    epochs: int = 3
    fixmask_epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    max_seq_length: int = 128
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

    def validate(self) -> None:
        if not 0 < self.sparsity <= 1:
            raise InvalidValueError(f"sparsity must lie in (0, 100%], got {self.sparsity}")
        for name in ("epochs", "fixmask_epochs"):
            if getattr(self, name) < 0:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise InvalidValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_seq_length < 8:
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
        if self.fill_samples < 1:
            raise InvalidValueError(f"--fill-samples must be at least 1, got {self.fill_samples}")
        if not math.isfinite(self.log_alpha_init):
            raise InvalidValueError("--log-alpha-init must be finite")
        self.gate()  # checks l, r, beta

    def gate(self) -> HardConcrete:
        return HardConcrete(self.gate_l, self.gate_r, self.beta)


@dataclass
class DensityController:
    """Adapts the penalty weight λ so that the expected gate density d follows a schedule to the target.

    The scheduled target t(step) falls linearly in logit space from the initial expected density to `target`
    over the first `warmup_steps` steps, then stays at `target`. The controller steers the velocity of
    logit d (log α moves it almost linearly, even while σ(log α) is saturated near 1) toward
    v* = (schedule's slope) − gain·(logit d − logit t): follow the schedule and close any gap. λ = λ₀·exp(c)
    with the integral c ← c + rate·clip((v − v*)/speed, −1, 1), where v is the measured velocity and `speed`
    the usual velocity scale (half the log α learning rate): a Lagrangian-style multiplier on the density
    constraint (Wang, Wohlwend & Lei 2020), in log space so that it does not depend on λ's scale, and
    rate-based so that it does not wind up while the gates, limited by their learning rate, catch up.
    """

    target: float
    lam0: float
    rate: float
    warmup_steps: int
    start: float = 1.0
    log_scale: float = 0.0
    enabled: bool = True
    last: float | None = None  # density fed at the previous step
    speed: float = 0.05
    gain: float = 0.05

    def scheduled(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.target
        a, b = _logit(max(self.start, self.target)), _logit(self.target)
        return _sigmoid(a + (b - a) * max(step, 0) / self.warmup_steps)

    @property
    def lam(self) -> float:
        return self.lam0 * math.exp(self.log_scale) if self.enabled else self.lam0

    def update(self, step: int, density: float) -> float:
        """Feed the expected density measured at `step`; returns λ for the next step."""
        if self.enabled and 0 < density < 1:
            err = _logit(density) - _logit(self.scheduled(step))
            moving = _logit(density) - _logit(self.last) if self.last is not None else 0.0
            wanted = _logit(self.scheduled(step + 1)) - _logit(self.scheduled(step)) - self.gain * err
            e = max(-1.0, min(1.0, (moving - wanted) / max(self.speed, 1e-12)))
            self.log_scale = min(60.0, max(-60.0, self.log_scale + self.rate * e))
            self.last = density
        return self.lam

    def state(self) -> dict[str, float | None]:
        return {"log_scale": self.log_scale, "start": self.start, "last": self.last}


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


# ------------------------------------------------------------------------------------------ environment

@dataclass
class Dist:
    """Process-group facts; world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def check_device(device_hint: str | None) -> None:
    """Reject a --device that is not cpu/cuda, or cuda without a GPU, before any work."""
    import torch

    if device_hint is not None:
        try:
            kind = torch.device(device_hint).type
        except (RuntimeError, ValueError):
            raise InvalidValueError(f"unknown device {device_hint!r}; use cpu or cuda") from None
        if kind not in ("cpu", "cuda"):
            raise InvalidValueError(f"unsupported device {device_hint!r}; use cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            raise InvalidValueError("--device cuda was asked for but no CUDA GPU is visible")


def _init_dist(device_hint: str | None) -> tuple[Dist, "torch.device"]:
    """Join the torchrun process group when launched by it (gloo on CPU, nccl on GPU); pick the device."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        gpus = torch.cuda.device_count() if use_cuda else 0
        if use_cuda and per_node > gpus:
            # checked by every rank before joining, so none waits forever for a rank that cannot start
            raise InvalidValueError(f"torchrun started {per_node} processes on this node but {gpus} CUDA GPU(s) are "
                                    f"visible; use --nproc_per_node {gpus} (one process per GPU), or --device cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        d = Dist(dist.get_rank(), dist.get_world_size(), local)
        if use_cuda:
            torch.cuda.set_device(local)
            return d, torch.device("cuda", local)
        return d, torch.device("cpu")
    return Dist(), torch.device(device_hint) if device_hint else torch.device("cuda" if use_cuda else "cpu")


# ------------------------------------------------------------------------------------------ the run

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


@dataclass
class TaskModel:
    """The task model with its tokenizer and how its tensors relate to the base."""

    model: Any
    tokenizer: Any
    base_dir: Path
    gated: list[str]                       # parameter names trained as θ₀ + δ
    head: list[str]                        # parameter names trained densely (not in the base)
    base_names: dict[str, str]             # target name → base name, for every shared tensor
    base_info: dict[str, tuple[str, str]] = field(default_factory=dict)  # gated name → (dtype, digest)


def build_task_model(base_dir: Path, spec, seed: int) -> TaskModel:
    """AutoModelForSequenceClassification on the base, split into gated (shared) and dense (new) parameters."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from transformers.utils import logging as hf_logging

    from diffcli.weights import WeightStore, dtype_name, is_float, match_names, tensor_digest

    hf_logging.set_verbosity_error()  # the "newly initialized head" report is expected here
    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"num_labels": spec.num_labels}
    if spec.is_regression:
        kw["problem_type"] = "regression"
    else:
        kw["problem_type"] = "single_label_classification"
        kw["id2label"] = {i: str(n) for i, n in enumerate(spec.labels)}
        kw["label2id"] = {str(n): i for i, n in enumerate(spec.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    store = WeightStore(base_dir)
    names = list(model.state_dict().keys())
    mapping = match_names(store.names(), names)
    params = dict(model.named_parameters())
    gated, head, info = [], [], {}
    for name, p in params.items():
        bname = mapping.get(name)
        if bname is not None and store.shape(bname) == tuple(p.shape) and is_float(store.dtype(bname)):
            base_t = store[bname]
            gated.append(name)
            info[name] = (dtype_name(base_t.dtype), tensor_digest(base_t))
            with torch.no_grad():  # θ₀ is the base exactly as stored (from_pretrained may have cast it)
                p.copy_(base_t.to(torch.float32))
        else:
            head.append(name)
    if not gated:
        raise DataError(f"the task model shares no parameters with the base {base_dir}")
    return TaskModel(model, tokenizer, base_dir, gated, head, mapping, info)


def _loader(dataset, batch_size: int, seed: int, epoch: int, dist: Dist):
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=dataset.collate, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def _steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    per_rank = math.ceil(n / world)
    return math.ceil(per_rank / batch_size)


def _adamw(params, lr: float, weight_decay: float, device: "torch.device"):
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


def _clip(tensors: list["torch.Tensor"], max_norm: float) -> None:
    import torch

    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=True)


class L0Trainer:
    """One L0-phase optimisation step (also used by bench/bench_train_cost.py)."""

    def __init__(self, model, gated: list[str], head: list[str], opts: TrainOptions, device: "torch.device",
                 total_steps: int, ddp_model=None):
        import torch

        from diffcli.diffmodel import FlatParams, GatedDiff

        self.model, self.opts, self.device = model, opts, device
        self.forward_model = ddp_model if ddp_model is not None else model
        self.flat = FlatParams(model, gated, device)
        gen = torch.Generator(device=device).manual_seed(opts.seed)
        self.gd = GatedDiff(self.flat, opts.gate(), log_alpha_init=opts.log_alpha_init, structured=opts.structured,
                            generator=gen)
        params = dict(model.named_parameters())
        self.head = [params[n] for n in head]
        groups = [{"params": [self.gd.w], "lr": opts.lr}]
        if self.head:
            groups.append({"params": self.head, "lr": opts.head_lr if opts.head_lr is not None else opts.lr})
        self.opt_w = _adamw(groups, opts.lr, opts.weight_decay, device)
        self.opt_a = _adamw([{"params": self.gd.gate_params(), "lr": opts.alpha_lr}], opts.alpha_lr, 0.0, device)
        self.total_steps = max(1, total_steps)
        self.step_count = 0
        start = float(torch.sigmoid(torch.tensor(opts.log_alpha_init - opts.gate().shift)))
        start = start * start if opts.structured else start
        # the schedule never asks log α to move faster than half its learning rate per step
        span = math.log(start / (1 - start)) - math.log(opts.sparsity / (1 - opts.sparsity)) if opts.sparsity < 1 else 0
        self.schedule_steps = math.ceil(span / (0.5 * opts.alpha_lr)) if opts.alpha_lr > 0 else 0
        warmup = max(opts.controller_warmup * total_steps, self.schedule_steps)
        self.controller = DensityController(opts.sparsity, opts.l0_lambda, opts.controller_rate, int(round(warmup)),
                                            start=start, enabled=opts.controller, speed=0.5 * opts.alpha_lr)
        self.lam = self.controller.lam

    def step(self, batch: dict) -> dict[str, float]:
        """Sample gates, forward/backward, hand-made gate gradients, clip, two AdamW steps, controller."""
        gd = self.gd
        gd.sample_()
        _zero_grads(self.flat, self.head)
        with autocast(self.device):
            loss = self.forward_model(**batch).loss
        loss.backward()
        stats = gd.backward_(self.lam)
        _clip([gd.w] + self.head, self.opts.grad_clip)
        _clip(gd.gate_params(), self.opts.grad_clip)
        decay = max(0.0, 1.0 - self.step_count / self.total_steps)
        for group in self.opt_w.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * decay
        self.opt_w.step()
        self.opt_a.step()
        self.lam = self.controller.update(self.step_count, stats["expected_density"])
        self.step_count += 1
        stats["loss"] = float(loss.detach())
        stats["lambda"] = self.lam
        return stats


def _zero_grads(flat, head: list) -> None:
    """Clear dL/dθ of the flat parameters and drop the dense head's gradients before a backward pass."""
    flat.zero_grad()
    for p in head:
        p.grad = None


def _move(batch: dict, device: "torch.device") -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _eval(tm: TaskModel, task_data, opts: TrainOptions, device) -> dict[str, dict[str, float]]:
    from diffcli.evaluation import evaluate

    return evaluate(tm.model, tm.tokenizer, task_data, max_seq_length=opts.max_seq_length,
                    batch_size=opts.eval_batch_size, device=device)


def _main_score(spec, results: dict[str, dict[str, float]]) -> float:
    from diffcli.metrics import main_score

    return main_score(spec, next(iter(results.values())))


def _fmt_metrics(results: dict[str, dict[str, float]]) -> str:
    parts = []
    for split, ms in results.items():
        parts.append(split + " " + " ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    return " | ".join(parts)


def train(*, task: str | None = None, data_dir: str | None = None, train_file: str | None = None,
          validation_file: str | None = None, text_fields: list[str] | None = None, label_field: str | None = None,
          model: str = "minilm", max_train_samples: int | None = None, max_eval_samples: int | None = None,
          output: str | Path, options: TrainOptions | None = None, resume: bool = False, force: bool = False,
          reporter: Reporter | None = None, device: str | None = None,
          on_epoch_end: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run the three phases and write the best fixed-mask diff as a checkpoint at `output`; return a summary.

    Resumable: after each epoch the state goes to `<output>.partial/`; `resume=True` continues from it.
    Under torchrun every rank trains; rank 0 alone evaluates and writes.
    """
    import torch

    from diffcli import checkpoint, tasks
    from diffcli.outputs import check_output
    from diffcli.weights import resolve_model

    opts = options or TrainOptions()
    opts.validate()
    check_device(device)
    rep = reporter or Reporter()
    output = Path(output)
    check_output(output, force)
    work = partial_dir(output)
    resuming = resume and (work / STATE_JSON).is_file()
    if resume and not resuming:
        rep.warning(f"no interrupted run at {work}; starting from the beginning")
    if not resume and work.exists():
        if not force:
            raise OutputExistsError(f"{work} holds an interrupted run",
                                    hint="pass --resume to continue it, or --force to start over")
    base_dir = resolve_model(model)
    task_data = tasks.load_task(task, data_dir=data_dir, train_file=train_file, validation_file=validation_file,
                                text_fields=text_fields, label_field=label_field,
                                max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
    if task_data.source.get("kind") == "example":
        rep.warning(f"training on {task_data.source['name']}: {task_data.source['why']} "
                    "(pass --data-dir or set GLUE_DIR to train on GLUE)")
    if not task_data.train:
        raise DataError("the training data is empty")
    if not task_data.eval or not any(task_data.eval.values()):
        raise DataError("training needs evaluation data to pick the best checkpoint",
                        hint="pass --validation-file")

    dist, dev = _init_dist(device)
    if not dist.main:
        rep = Reporter()
    started = time.monotonic()
    tm = build_task_model(base_dir, task_data.spec, opts.seed)
    tm.model.to(dev)
    train_set = tasks.encode(task_data.train, tm.tokenizer, opts.max_seq_length)
    run = _Run(opts, rep, dist, dev, tm, task_data, train_set, work, model, on_epoch_end)

    trainer = L0Trainer(tm.model, tm.gated, tm.head, opts, dev, run.steps_per_epoch * opts.epochs)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        run.ddp = DistributedDataParallel(tm.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        trainer.forward_model = run.ddp
    if opts.controller and opts.epochs and trainer.schedule_steps > trainer.total_steps:
        # Expected on small data sets (the benchmark's four tasks run this way): the gates stop on their schedule
        # and the exact projection cuts the rest. Said once, with where they stop and how to get there.
        need = math.ceil(trainer.schedule_steps / run.steps_per_epoch)
        rep.line(f"the L0 phase has {trainer.total_steps} steps and the gates need about {trainer.schedule_steps} "
                 f"at --alpha-lr {opts.alpha_lr:g} to reach {opts.sparsity:.3%}: they will stop near "
                 f"{trainer.controller.scheduled(trainer.total_steps):.1%} expected density and the projection "
                 f"cuts the rest (--epochs {need} reaches the target in the L0 phase)")
    torch.manual_seed(opts.seed + dist.rank)  # dropout streams
    phase, done, tensors, saved = "l0", 0, {}, None
    if resuming:
        tensors, saved = load_state(work)
        check_resume_options(saved["options"], run.opt_dict)
        if saved.get("task") != task_data.spec.name or saved.get("model") != model:
            raise InvalidValueError(f"the interrupted run at {work} trained {saved.get('task')} on "
                                    f"{saved.get('model')}", hint="pass --force without --resume to start over")
        phase, done = saved["phase"], int(saved["epochs_done"])
        run.record = saved["record"]
        if phase == "l0":
            _restore_l0(trainer, tm, tensors, saved)
            restore_rng(tensors, dev, trainer.gd.generator)
        rep.line(f"resuming {phase} phase after epoch {done}")

    flat = trainer.flat
    if phase == "l0":
        run.l0_phase(trainer, done)
        tensors = run.project(trainer)
        trainer = None  # free w, log α, their gradients and optimiser states
        done, saved = 0, None
    else:
        trainer = None
    index, best_tensors = run.fixmask_phase(flat, tensors, saved, done)

    summary: dict[str, Any] = {}
    if dist.main:
        diff = _build_diff(tm, flat, index, best_tensors, model_ref=model, meta={
            "method": "l0-diff-pruning", "task": task_data.spec.name, "hyperparameters": run.opt_dict,
            "data": {"task": task, "train_file": str(train_file) if train_file else None,
                     "validation_file": str(validation_file) if validation_file else None,
                     "max_train_samples": max_train_samples, "max_eval_samples": max_eval_samples,
                     "train_examples": len(task_data.train), "source": task_data.source},
            "world_size": dist.world,
            "results": {"after_l0": run.record.get("after_l0"), "projection": run.record.get("projection"),
                        "best": run.record["best"]},
            "history": run.history,
        })
        checkpoint.save(diff, output, force=force)
        shutil.rmtree(work, ignore_errors=True)
        summary = {
            "output": str(output), "task": task_data.spec.name, "model": model, "data": task_data.source,
            "after_l0": run.record.get("after_l0"), "after_projection": run.record.get("projection"),
            "after_fixmask": run.record["best"], "density": diff.density, "nnz": diff.nnz,
            "budget_numel": diff.budget_numel, "extras_numel": diff.extras_numel,
            "epochs": {"l0": opts.epochs, "fixmask": opts.fixmask_epochs}, "world_size": dist.world,
            "seconds": round(time.monotonic() - started, 1),
        }
    dist.barrier()
    return summary


class _Run:
    """One `train` call's shared state, and its phases: L0 epochs, the projection, fixed-mask epochs."""

    def __init__(self, opts: TrainOptions, rep: Reporter, dist: Dist, dev, tm: TaskModel, task_data, train_set,
                 work: Path, model_ref: str, on_epoch_end: Callable[[str, int], None] | None):
        self.opts, self.rep, self.dist, self.dev, self.tm = opts, rep, dist, dev, tm
        self.task_data, self.spec, self.train_set = task_data, task_data.spec, train_set
        self.work, self.model_ref, self.on_epoch_end = work, model_ref, on_epoch_end
        self.opt_dict = asdict(opts)
        self.record: dict[str, Any] = {"history": []}
        self.ddp = None
        self.steps_per_epoch = _steps_per_epoch(len(train_set), opts.batch_size, dist.world)

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

    def l0_phase(self, trainer: L0Trainer, done: int) -> None:
        """Epochs `done+1..epochs` of gated training, evaluating the deterministic gates after each."""
        opts, rep, tm = self.opts, self.rep, self.tm
        for epoch in range(done, opts.epochs):
            loader = _loader(self.train_set, opts.batch_size, opts.seed, epoch, self.dist)
            tm.model.train()
            losses, stats = [], {}
            with rep.bar(f"L0 epoch {epoch + 1}/{opts.epochs}", len(loader)) as bar:
                for batch in loader:
                    stats = trainer.step(_move(batch, self.dev))
                    losses.append(stats["loss"])
                    bar.advance(1, f"loss {stats['loss']:.4f} density {stats['expected_density']:.2%} "
                                   f"λ {stats['lambda']:.2e}")
            entry = {"phase": "l0", "epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1),
                     "expected_density": stats.get("expected_density"), "lambda": trainer.lam,
                     "deterministic_density": trainer.gd.deterministic_density()}
            if self.dist.main:
                trainer.gd.set_deterministic_()
                entry["metrics"] = _eval(tm, self.task_data, opts, self.dev)
                rep.line(f"L0 epoch {entry['epoch']}/{opts.epochs}: loss {entry['loss']:.4f} expected density "
                         f"{entry['expected_density']:.3%} deterministic density "
                         f"{entry['deterministic_density']:.3%} | {_fmt_metrics(entry['metrics'])}")
            self.history.append(entry)
            state = {"phase": "l0", "epochs_done": epoch + 1, "step": trainer.step_count,
                     "controller": trainer.controller.state(), "lam": trainer.lam}
            self.save({**_l0_tensors(trainer), **rng_tensors(self.dev, trainer.gd.generator)}, state)
            self.epoch_done("l0", epoch + 1)

    def project(self, trainer: L0Trainer) -> dict[str, "torch.Tensor"]:
        """Project the deterministic δ to exactly the budget (filling it if the gates closed below); the mask."""
        gd, tm = trainer.gd, self.tm
        record = self.record
        record["after_l0"] = {"expected_density": _expected(trainer), "deterministic_density":
                              gd.deterministic_density(), "lambda": trainer.lam}
        if self.dist.main:
            gd.set_deterministic_()
            record["after_l0"]["metrics"] = _eval(tm, self.task_data, self.opts, self.dev)
        delta = gd.delta()
        index, values, info = _project(tm, trainer.flat, delta, self.opts.sparsity)
        del delta
        record["projection"] = info
        if info["kept"] < info["k"]:  # the gates closed below the budget: fill it for the fixed mask
            score = self._fill_score(trainer)
            index, values, filled = _fill_budget(score, index, values, info["k"] - info["kept"])
            del score
            info["filled"], info["fill"] = filled, self.opts.fill
            if info["kept"] + filled < info["k"]:
                self.rep.warning(f"the learned δ has only {info['kept'] + filled} usable entries, fewer than the "
                                 f"budget {info['k']}; the diff keeps them all (train longer or lower --sparsity)")
        if self.opts.fixmask_start == "w":
            values = gd.w.detach()[index.to(gd.w.device)].cpu()
        info["start"] = self.opts.fixmask_start
        head_state = {n: p.detach().clone() for n, p in zip(tm.head, trainer.head)}
        return {"mask/index": index.cpu(), "mask/values": values.cpu(),
                **{f"head/{n}": t for n, t in head_state.items()}}

    def _fill_score(self, trainer: L0Trainer) -> "torch.Tensor":
        """The budget fill's ranking of every flat entry (`--fill`); higher is added first."""
        import torch

        gd, opts = trainer.gd, self.opts
        if opts.fill == "gates":
            with torch.no_grad():
                return gd.gate.prob_nonzero(gd.log_alpha.detach()).mul_(gd.w.detach()).abs_()
        gd.set_deterministic_()  # every rank: the Fisher is taken at the deterministic L0 model
        loader = _loader(self.train_set, opts.batch_size, opts.seed + 2, 0, self.dist)
        n = max(1, math.ceil(opts.fill_samples / (opts.batch_size * self.dist.world)))
        batches = (_move(b, self.dev) for _, b in zip(range(n), loader))
        return fisher_diagonal(self.ddp if self.ddp is not None else self.tm.model, trainer.flat, trainer.head,
                               batches, self.dev)

    def fixmask_phase(self, flat, tensors: dict, resumed: dict | None, done: int):
        """Finetune the kept entries and the head with the mask fixed; keep the best dev epoch (0 = projection).

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
        opt_m = _adamw(groups, opts.fixmask_lr, opts.weight_decay, dev)
        for g in opt_m.param_groups:
            g["initial_lr"] = g["lr"]

        def snapshot() -> dict[str, "torch.Tensor"]:
            return {"best/values": md.values.detach().clone(),
                    **{f"best/head/{n}": p.detach().clone() for n, p in zip(tm.head, head)}}

        step_m = 0
        if resumed is None:  # first entry into the phase: score the projection (epoch 0 candidate)
            if self.dist.main:
                record["projection"]["metrics"] = _eval(tm, self.task_data, opts, dev)
                record["best"] = {"epoch": 0, "score": _main_score(self.spec, record["projection"]["metrics"]),
                                  "metrics": record["projection"]["metrics"]}
                rep.line(f"projection to {opts.sparsity:.3%}: nnz {record['projection']['kept']} | "
                         f"{_fmt_metrics(record['projection']['metrics'])}")
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
        if self.dist.world > 1 and self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(tm.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        fwd = self.ddp if self.ddp is not None else tm.model
        total_fix = max(1, opts.fixmask_epochs * self.steps_per_epoch)
        for epoch in range(done, opts.fixmask_epochs):
            loader = _loader(self.train_set, opts.batch_size, opts.seed + 1, epoch, self.dist)
            tm.model.train()
            losses = []
            with rep.bar(f"fixed-mask epoch {epoch + 1}/{opts.fixmask_epochs}", len(loader)) as bar:
                for batch in loader:
                    _zero_grads(flat, head)
                    with autocast(dev):
                        loss = fwd(**_move(batch, dev)).loss
                    loss.backward()
                    md.backward_()
                    _clip([md.values] + head, opts.grad_clip)
                    decay = max(0.0, 1.0 - step_m / total_fix)
                    for g in opt_m.param_groups:
                        g["lr"] = g["initial_lr"] * decay
                    opt_m.step()
                    md.write_()
                    step_m += 1
                    losses.append(float(loss.detach()))
                    bar.advance(1, f"loss {losses[-1]:.4f}")
            entry = {"phase": "fixmask", "epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1)}
            if self.dist.main:
                entry["metrics"] = _eval(tm, self.task_data, opts, dev)
                score = _main_score(self.spec, entry["metrics"])
                better = score > record["best"]["score"]
                if better:
                    record["best"] = {"epoch": epoch + 1, "score": score, "metrics": entry["metrics"]}
                    best_tensors = snapshot()
                rep.line(f"fixed-mask epoch {epoch + 1}/{opts.fixmask_epochs}: loss {entry['loss']:.4f} | "
                         f"{_fmt_metrics(entry['metrics'])}{'  (best)' if better else ''}")
            self.history.append(entry)
            cur = {"mask/index": index, "mask/values": md.values.detach(),
                   **{f"head/{n}": p.detach() for n, p in zip(tm.head, head)}}
            self.save({**cur, **best_tensors, **optimizer_tensors(opt_m, "opt_m"), **rng_tensors(dev, None)},
                      {"phase": "fixmask", "epochs_done": epoch + 1, "step": step_m})
            self.epoch_done("fixmask", epoch + 1)
        return index, best_tensors


def _expected(trainer: L0Trainer) -> float:
    from diffcli.gates import expected_density

    gd = trainer.gd
    return expected_density(gd.gate, gd.log_alpha, gd.group_log_alpha, trainer.flat.sizes)


def _l0_tensors(trainer: L0Trainer) -> dict[str, "torch.Tensor"]:
    gd = trainer.gd
    out = {"l0/w": gd.w.detach(), "l0/log_alpha": gd.log_alpha.detach()}
    if gd.structured:
        out["l0/group_log_alpha"] = gd.group_log_alpha.detach()
    for i, p in enumerate(trainer.head):
        out[f"l0/head/{i}"] = p.detach()
    out.update(optimizer_tensors(trainer.opt_w, "opt_w"))
    out.update(optimizer_tensors(trainer.opt_a, "opt_a"))
    return out


def _restore_l0(trainer: L0Trainer, tm: TaskModel, tensors: dict, saved: dict) -> None:
    import torch

    gd = trainer.gd
    with torch.no_grad():
        gd.w.copy_(tensors["l0/w"])
        gd.log_alpha.copy_(tensors["l0/log_alpha"])
        if gd.structured:
            gd.group_log_alpha.copy_(tensors["l0/group_log_alpha"])
        for i, p in enumerate(trainer.head):
            p.copy_(tensors[f"l0/head/{i}"])
    load_optimizer(trainer.opt_w, tensors, "opt_w")
    load_optimizer(trainer.opt_a, tensors, "opt_a")
    for group in trainer.opt_w.param_groups:  # the schedule's base lr, lost with the state dict
        group["initial_lr"] = group.get("initial_lr", group["lr"])
    trainer.step_count = int(saved["step"])
    trainer.controller.log_scale = float(saved["controller"]["log_scale"])
    trainer.controller.start = float(saved["controller"]["start"])
    trainer.controller.last = saved["controller"].get("last")
    trainer.lam = float(saved["lam"])


def _dense_diff(tm: TaskModel, flat, delta: "torch.Tensor"):
    """The deterministic δ as a Diff of dense per-tensor views (no copy), for `projection.project`."""
    from diffcli.diff import Diff, TensorDiff

    tensors = {}
    for name, seg, shape in zip(flat.names, flat.segments(delta.cpu()), flat.shapes):
        dtype, digest = tm.base_info[name]
        tensors[name] = TensorDiff(tm.base_names[name], shape, dtype, digest, seg.view(shape))
    return Diff(tensors, {}, {}, "", "")


def _project(tm: TaskModel, flat, delta: "torch.Tensor", sparsity: float):
    """Exact global top-k of |δ| → sorted flat positions and their values."""
    import torch

    from diffcli.projection import project

    proj = project(_dense_diff(tm, flat, delta), sparsity)
    idx, vals = [], []
    for name, a in zip(flat.names, flat.offsets):
        td = proj.diff.tensors[name]
        idx.append(td.indices + a)
        vals.append(td.values)
    index = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    values = torch.cat(vals) if vals else torch.zeros(0)
    info = {"sparsity": sparsity, "k": proj.k, "n": proj.n, "kept": proj.kept}
    return index, values, info


def fisher_diagonal(model, flat, head: list, batches: Iterable[dict], device) -> "torch.Tensor":
    """Σ over batches of (dL/dθ)² for the flat parameters (dropout off): the empirical Fisher's diagonal.

    Batch-mean gradients, squared and summed: the ranking FISH masks use (Sung et al. 2021, eq. 2), with a
    batch in place of one example. Under DDP `model` is the wrapper, so every rank sums the same averaged
    gradients and gets the same scores.
    """
    import torch

    was_training = model.training
    model.eval()
    score = torch.zeros_like(flat.grad)
    try:
        for batch in batches:
            _zero_grads(flat, head)
            with autocast(device):
                loss = model(**batch).loss
            loss.backward()
            flat.collect_grads_()
            score.addcmul_(flat.grad, flat.grad)
    finally:
        _zero_grads(flat, head)
        model.train(was_training)
    return score


def _fill_budget(score: "torch.Tensor", index: "torch.Tensor", values: "torch.Tensor", need: int):
    """Add the `need` entries outside the mask with the largest positive `score` to it, starting at δ = 0.

    When the L0 phase ends below the target density, δ has fewer than k nonzeros; the fixed-mask phase then
    also trains the entries ranked next (`--fill`), so that the diff uses its whole budget. `score` is consumed.
    """
    import torch

    with torch.no_grad():
        score[index.to(score.device)] = 0
        top = torch.topk(score, min(need, score.numel()), sorted=False)
        extra = top.indices[top.values > 0].cpu()
    del score
    merged = torch.cat([index.cpu(), extra])
    order = torch.argsort(merged)
    vals = torch.cat([values.cpu(), torch.zeros(extra.numel(), dtype=values.dtype)])
    return merged[order].contiguous(), vals[order].contiguous(), int(extra.numel())


def _build_diff(tm: TaskModel, flat, index: "torch.Tensor", best: dict, *, model_ref: str, meta: dict):
    """The shared Diff: sparse δ per gated tensor, zero δ for untouched shared tensors, the head as extras."""
    import torch

    from diffcli.diff import Diff, TensorDiff
    from diffcli.weights import WeightStore, dtype_name, fingerprint_of, tensor_digest

    values = best["best/values"].cpu()
    tensors: dict[str, TensorDiff] = {}
    cuts = torch.searchsorted(index.cpu(), torch.tensor(flat.offsets, dtype=torch.int64)).tolist()
    for name, shape, a, lo, hi in zip(flat.names, flat.shapes, flat.offsets, cuts, cuts[1:]):
        dtype, digest = tm.base_info[name]
        v = values[lo:hi].clone()
        i = index[lo:hi].cpu() - a
        keep = v != 0
        tensors[name] = TensorDiff(tm.base_names[name], shape, dtype, digest, v[keep].contiguous(),
                                   i[keep].contiguous())
    extras: dict[str, torch.Tensor] = {}
    store = None
    state = tm.model.state_dict()
    gated = set(flat.names)
    head = set(tm.head)
    for name, t in state.items():
        if name in gated:
            continue
        if name in head:
            extras[name] = best[f"best/head/{name}"].detach().cpu().clone().contiguous()
            continue
        bname = tm.base_names.get(name)
        t = t.detach().cpu()
        if bname is not None:
            store = store or WeightStore(tm.base_dir)
            b = store[bname]
            if tuple(b.shape) == tuple(t.shape) and torch.equal(b.to(t.dtype), t):
                tensors[name] = TensorDiff.zeros(bname, tuple(b.shape), dtype_name(b.dtype), tensor_digest(b))
                continue
        extras[name] = t.clone().contiguous()
    config = json.loads(tm.model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(tm.model).__name__]
    fp = fingerprint_of({td.base_name: td.digest for td in tensors.values()})
    return Diff(tensors, extras, config, model_ref, fp, meta)


def option_names() -> list[str]:
    return [f.name for f in fields(TrainOptions)]
