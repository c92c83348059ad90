"""`--method l0`: diff pruning's L0 phase (Guo et al. 2021), then the exact top-k projection.

θ = θ₀ + z⊙z_g⊙w with w, log α trained by separate AdamW optimisers and the penalty weight λ steered by
`DensityController` so that the expected density of the gates reaches the target; then the deterministic δ
is projected to exactly the budget (`trained_diff.project`), topped up by `--fill` when the gates closed below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from diffcli.methods.registry import TrainMethod, register
from diffcli.train_state import load_optimizer, optimizer_tensors, restore_rng, rng_tensors
from diffcli.trainloop import adamw, autocast, clip, evaluate_on, fmt_metrics, forward_backward, loader, move, zero_grads

if TYPE_CHECKING:
    import torch

    from diffcli.api import DiffPruner
    from diffcli.train_options import TrainOptions
    from diffcli.trainloop import Run


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

    def load(self, state: dict) -> None:
        """Undo `state()` (a resumed run steers λ on from where the interrupted one stopped)."""
        self.log_scale, self.start, self.last = float(state["log_scale"]), float(state["start"]), state.get("last")


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))



def gated_state(trainer, device: "torch.device", generator) -> tuple[dict[str, "torch.Tensor"], dict]:
    """What a gated phase steered by the density controller (l0's, swr's) needs beside its own tensors to continue
    after an epoch: both AdamW states and the RNG streams (dropout, gate noise) as tensors; the step, λ and the
    controller as JSON. `trainer` has `opt_w`, `opt_a`, `step_count`, `lam` and `controller`."""
    tensors = {**optimizer_tensors(trainer.opt_w, "opt_w"), **optimizer_tensors(trainer.opt_a, "opt_a"),
               **rng_tensors(device, generator)}
    return tensors, {"step": trainer.step_count, "controller": trainer.controller.state(), "lam": trainer.lam}


def restore_gated(trainer, tensors: dict, saved: dict, device: "torch.device", generator) -> None:
    """Undo `gated_state` on a freshly built trainer of the same run."""
    load_optimizer(trainer.opt_w, tensors, "opt_w")
    load_optimizer(trainer.opt_a, tensors, "opt_a")
    for group in trainer.opt_w.param_groups:  # the schedule's base lr, lost with the state dict
        group["initial_lr"] = group.get("initial_lr", group["lr"])
    restore_rng(tensors, device, generator)
    trainer.step_count = int(saved["step"])
    trainer.controller.load(saved["controller"])
    trainer.lam = float(saved["lam"])



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
        self.opt_w = adamw(groups, opts.lr, opts.weight_decay, device)
        self.opt_a = adamw([{"params": self.gd.gate_params(), "lr": opts.alpha_lr}], opts.alpha_lr, 0.0, device)
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
        self.begin()
        with autocast(self.device):
            loss = self.forward_model(**batch).loss
        loss.backward()
        stats = self.finish()
        stats["loss"] = float(loss.detach())
        return stats

    def begin(self) -> None:
        """Before the forward pass: sample the gates (θ = θ₀ + z⊙z_g⊙w) and clear dL/dθ."""
        self.gd.sample_()
        zero_grads(self.flat, self.head)

    def finish(self) -> dict[str, float]:
        """After the backward pass: dL/dw and dL/dlog α by hand (the penalty's gradient included), clip, step."""
        gd = self.gd
        stats = gd.backward_(self.lam)
        clip([gd.w] + self.head, self.opts.grad_clip)
        clip(gd.gate_params(), self.opts.grad_clip)
        decay = max(0.0, 1.0 - self.step_count / self.total_steps)
        for group in self.opt_w.param_groups:
            group["lr"] = group.setdefault("initial_lr", group["lr"]) * decay
        self.opt_w.step()
        self.opt_a.step()
        self.lam = self.controller.update(self.step_count, stats["expected_density"])
        self.step_count += 1
        stats["lambda"] = self.lam
        return stats


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
    return out


def _restore_l0(trainer: L0Trainer, tensors: dict) -> None:
    import torch

    gd = trainer.gd
    with torch.no_grad():
        gd.w.copy_(tensors["l0/w"])
        gd.log_alpha.copy_(tensors["l0/log_alpha"])
        if gd.structured:
            gd.group_log_alpha.copy_(tensors["l0/group_log_alpha"])
        for i, p in enumerate(trainer.head):
            p.copy_(tensors[f"l0/head/{i}"])



@register
class L0Method(TrainMethod):
    """Learn where to spend the budget with hard-concrete gates and an expected-L0 penalty, then project."""

    name = "l0"
    meta_name = "l0-diff-pruning"
    options = ("epochs", "lr", "alpha_lr", "fixmask_start", "fill", "fill_samples", "l0_lambda", "log_alpha_init",
               "gate_l", "gate_r", "beta", "structured", "controller", "controller_rate", "controller_warmup", "values")
    reparametrizes = "θ = θ₀ + z⊙z_g⊙w, z (and z_g per tensor) hard-concrete gates with parameters log α"
    penalises = "λ·E[‖z‖₀] (eq. 5 of Guo et al.), λ steered by the density controller toward --sparsity"
    fixed_phase = "the k = round(S·N) entries of the exact top-k projection of the deterministic δ, and the head"
    to_diff = "δ at the kept entries after the best fixed-mask epoch"
    phases = ("l0",)
    epochs_phase = "l0"
    memory = "l0"

    def setup(self, run: "Run") -> "DiffPruner":
        from diffcli.api import DiffPruner

        opts = run.opts
        pruner = DiffPruner.for_task_model(run.tm, opts, run.dev, run.steps_per_epoch * opts.epochs,
                                           base_ref=run.model_ref, flat=True)
        trainer = pruner.l0
        run.flat = pruner.layout
        if opts.controller and opts.epochs and trainer.schedule_steps > trainer.total_steps:
            # Expected on small data sets (the benchmark's four tasks run this way): the gates stop on their schedule
            # and the exact projection cuts the rest. Said once, with where they stop and how to get there.
            need = math.ceil(trainer.schedule_steps / run.steps_per_epoch)
            run.rep.line(f"the L0 phase has {trainer.total_steps} steps and the gates need about "
                         f"{trainer.schedule_steps} at --alpha-lr {opts.alpha_lr:g} to reach {opts.sparsity:.3%}: "
                         f"they will stop near {trainer.controller.scheduled(trainer.total_steps):.1%} expected "
                         f"density and the projection cuts the rest (--epochs {need} reaches the target in the L0 "
                         f"phase)")
        return pruner

    def first_phase(self, pruner: "DiffPruner", total_steps: int) -> L0Trainer:
        tm = pruner.tm
        return L0Trainer(tm.model, tm.gated, pruner.head_names, pruner.opts, pruner.device, total_steps)

    def project(self, pruner: "DiffPruner", batches, world: int) -> dict:
        """Exactly k entries of the deterministic δ, topped up by `--fill` (`gate_mask`); frees w, log α, optimisers."""
        from diffcli.errors import InvalidValueError

        if pruner.opts.fill == "fisher" and batches is None:
            raise InvalidValueError("fill='fisher' needs batches of training data: project(batches)")
        pruner.index, pruner.values, info = gate_mask(pruner.tm, pruner.phase, pruner.opts, lambda: batches, world)
        pruner.phase = None
        return info

    def restore(self, run: "Run", state: "DiffPruner", tensors: dict, saved: dict) -> None:
        _restore_l0(state.l0, tensors)
        restore_gated(state.l0, tensors, saved, run.dev, state.l0.gd.generator)

    def select(self, run: "Run", state: "DiffPruner", done: int) -> dict[str, "torch.Tensor"]:
        l0_phase(run, state, done)
        return project_gates(run, state)


def l0_phase(run: "Run", pruner: "DiffPruner", done: int) -> None:
    """Epochs `done+1..epochs` of gated training (the pruner's begin/finish around each step), evaluating the
    deterministic gates after each."""
    opts, rep, tm = run.opts, run.rep, run.tm
    trainer = pruner.l0
    fwd = run.ddp if run.ddp is not None else tm.model
    for epoch in range(done, opts.epochs):
        batches = loader(run.train_set, opts.batch_size, opts.seed, epoch, run.dist)
        tm.model.train()
        losses, stats = [], {}
        with rep.bar(f"L0 epoch {epoch + 1}/{opts.epochs}", len(batches)) as bar:
            for batch in batches:
                pruner.begin()
                loss = forward_backward(fwd, move(batch, run.dev), run.dev)
                stats = pruner.finish()
                losses.append(loss)
                bar.advance(1, f"loss {loss:.4f} density {stats['expected_density']:.2%} "
                               f"λ {stats['lambda']:.2e}")
        entry = {"phase": "l0", "epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1),
                 "expected_density": stats.get("expected_density"), "lambda": trainer.lam,
                 "deterministic_density": trainer.gd.deterministic_density()}
        if run.dist.main:
            trainer.gd.set_deterministic_()
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, run.dev)
            rep.line(f"L0 epoch {entry['epoch']}/{opts.epochs}: loss {entry['loss']:.4f} expected density "
                     f"{entry['expected_density']:.3%} deterministic density "
                     f"{entry['deterministic_density']:.3%} | {fmt_metrics(entry['metrics'])}")
        run.history.append(entry)
        gated, state = gated_state(trainer, run.dev, trainer.gd.generator)
        run.save({**_l0_tensors(trainer), **gated}, {"phase": "l0", "epochs_done": epoch + 1, **state})
        run.epoch_done("l0", epoch + 1)


def project_gates(run: "Run", pruner: "DiffPruner") -> dict[str, "torch.Tensor"]:
    """End the L0 phase in `train`: record and score the gates, then the pruner's mask (`gate_mask`) and the head."""
    from diffcli.fisher import fisher_batches

    trainer, tm = pruner.l0, run.tm
    gd = trainer.gd
    record = run.record
    record["after_l0"] = {"expected_density": _expected(trainer), "deterministic_density":
                          gd.deterministic_density(), "lambda": trainer.lam}
    if run.dist.main:
        gd.set_deterministic_()
        record["after_l0"]["metrics"] = evaluate_on(tm, run.task_data, run.opts, run.dev)
    def batches():  # read only when --fill fisher has a budget to fill
        yield from fisher_batches(run)

    info = pruner.project(batches() if run.opts.fill == "fisher" else None, run.dist.world)
    record["projection"] = info
    if info["kept"] + info.get("filled", 0) < info["k"]:
        run.rep.warning(f"the learned δ has only {info['kept'] + info['filled']} usable entries, fewer than the "
                        f"budget {info['k']}; the diff keeps them all (train longer or lower --sparsity)")
    head_state = {n: p.detach().clone() for n, p in zip(tm.head, trainer.head)}
    return {"mask/index": pruner.index.cpu(), "mask/values": pruner.values.cpu(),
            **{f"head/{n}": t for n, t in head_state.items()}}


def gate_mask(tm, trainer: L0Trainer, opts: "TrainOptions", batches: Callable[[], Iterable[dict]], world: int = 1):
    """The deterministic δ projected to exactly k entries, topped up by `--fill` when the gates closed below k.

    Returns sorted flat positions, the fixed phase's start values there (`--fixmask-start`) and the record.
    `batches` gives the training batches `--fill fisher` sums over (called only then).
    """
    from diffcli.trained_diff import fill_budget, project

    gd = trainer.gd
    delta = gd.delta()
    index, values, info = project(tm, trainer.flat, delta, opts.sparsity)
    del delta
    if info["kept"] < info["k"]:  # the gates closed below the budget: fill it for the fixed mask
        score = _fill_score(trainer, opts, batches, world)
        index, values, filled = fill_budget(score, index, values, info["k"] - info["kept"])
        del score
        info["filled"], info["fill"] = filled, opts.fill
    if opts.fixmask_start == "w":
        values = gd.w.detach()[index.to(gd.w.device)].cpu()
    info["start"] = opts.fixmask_start
    return index, values, info


def _fill_score(trainer: L0Trainer, opts: "TrainOptions", batches: Callable[[], Iterable[dict]],
                world: int) -> "torch.Tensor":
    """The budget fill's ranking of every flat entry (`--fill`); higher is added first."""
    import torch

    from diffcli.fisher import fisher_diagonal

    gd = trainer.gd
    if opts.fill == "gates":
        with torch.no_grad():
            return gd.gate.prob_nonzero(gd.log_alpha.detach()).mul_(gd.w.detach()).abs_()
    gd.set_deterministic_()  # every rank: the Fisher is taken at the deterministic L0 model
    return fisher_diagonal(trainer.model, trainer.flat, trainer.head, batches(), trainer.device, world)
