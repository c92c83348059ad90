"""`--method swr`: a budgeted choice of where to update (after Kim, Lee, Yang & Chang 2023, arXiv 2302.13435).

Every shared parameter tensor is a unit u with a candidate update Δ_u: a rank-r product B_u·A_u for a matrix
(B zero, A ~ U(±1/√in) as LoRA starts them) or a dense δ_u for a 1-D tensor (and for a matrix whose factors
would hold as many parameters as the matrix itself). A hard-concrete gate z_u per unit scales it,
θ_u = θ₀_u + z_u·Δ_u; the expected cost Σ_u P(z_u ≠ 0)·c_u (c_u = the unit's update parameters) is held to
the budget by λ, steered by the l0 method's `DensityController`. At the end the units are taken by gate
probability while they fit the budget (never over it); a fixed phase trains only those, ungated; the diff
stores B·A as low-rank records and δ as sparse ones, so the rebuilt model has the base's architecture.

The model runs as it is: θ₀ + z·Δ is written into the flat θ (`diffmodel.FlatParams`) before the forward pass,
and the factors' and gates' gradients come from dL/dθ after it, through the surrogate Σ_u z_u·⟨Δ_u, dL/dθ_u⟩
(⟨B·A, G⟩ = ⟨B, G·Aᵀ⟩: no dense B·A on the backward path), so a `DiffPruner` drives it from any loop. Under
torchrun DDP averages dL/dθ in place in that flat gradient, so ranks that draw the same gates (the generator is
seeded with --seed on every rank) take the same steps. `train` saves both phases after every epoch (`restore`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffcli.errors import InvalidValueError
from diffcli.methods.l0 import DensityController, gated_state, restore_gated
from diffcli.methods.registry import TrainMethod, register
from diffcli.budget import budget_count, parse_budget
from diffcli.train_state import restore_rng, rng_tensors
from diffcli.trainloop import (LinearDecay, adamw, clip, evaluate_on, fmt_metrics, forward_backward, main_score,
                               zero_grads)

if TYPE_CHECKING:
    import torch

    from diffcli.api import DiffPruner

    from diffcli.train_options import TrainOptions
    from diffcli.trainloop import Run


def budget_params(opts: "TrainOptions", n: int) -> int:
    """The hard cap on updated parameters: --budget (a count or a fraction of N), else round(--sparsity·N)."""
    cap = round(opts.sparsity * n) if opts.budget is None else budget_count(opts.budget, n)
    if not 1 <= cap <= n:
        raise InvalidValueError(f"--budget {opts.budget or f'{opts.sparsity:.4%}'} gives {cap} parameters; it must "
                                f"lie in 1..{n} (N, the entries of the shared tensors)")
    return cap


@dataclass
class Unit:
    """One shared tensor: its candidate update (`lowrank` B·A or `dense` δ) and what it costs."""

    name: str
    shape: tuple[int, ...]
    kind: str
    cost: int


def plan_units(shapes: dict[str, tuple[int, ...]], rank: int) -> list[Unit]:
    """A unit per shared tensor; rank-r factors where they are smaller than the tensor, a dense δ elsewhere."""
    matrices = {n: s for n, s in shapes.items() if len(s) == 2}
    if matrices and rank > max(min(s) for s in matrices.values()):
        widest = max(matrices, key=lambda n: min(matrices[n]))
        raise InvalidValueError(f"--rank {rank} exceeds the smaller dimension of every matrix (at most "
                                f"{min(matrices[widest])}, {widest})", hint="lower --rank")
    units = []
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) == 2 and rank <= min(shape) and rank * (shape[0] + shape[1]) < n:
            units.append(Unit(name, tuple(shape), "lowrank", rank * (shape[0] + shape[1])))
        else:
            units.append(Unit(name, tuple(shape), "dense", n))
    return units


def choose(units: list[Unit], probs: list[float], budget: int) -> list[bool]:
    """The units taken by gate probability (ties: cheaper, then by name) while they fit: Σ cost ≤ budget."""
    order = sorted(range(len(units)), key=lambda i: (-probs[i], units[i].cost, units[i].name))
    left, chosen = budget, [False] * len(units)
    for i in order:
        if units[i].cost <= left:
            chosen[i] = True
            left -= units[i].cost
    return chosen


class SWRTrainer:
    """The units' candidate updates, their gates and optimisers over the flat θ (the first phase of a `DiffPruner`)."""

    def __init__(self, tm, opts: "TrainOptions", device: "torch.device", head: list, total_steps: int):
        import torch

        from diffcli.diffmodel import FlatParams

        self.opts, self.dev, self.head = opts, device, head
        self.gate = opts.gate()
        self.flat = FlatParams(tm.model, tm.gated, device)
        self.units = plan_units(dict(zip(self.flat.names, self.flat.shapes)), opts.rank)
        self.n = self.flat.numel
        self.budget = budget_params(opts, self.n)
        self.costs = torch.tensor([float(u.cost) for u in self.units], device=device)
        self.generator = torch.Generator(device=device).manual_seed(opts.seed)
        self.factors: list[list[torch.Tensor]] = []
        for u in self.units:
            if u.kind == "lowrank":
                out, inp = u.shape
                bound = 1 / math.sqrt(inp)  # LoRA: kaiming_uniform(a=√5) on A, B = 0
                a = torch.empty(opts.rank, inp, device=device).uniform_(-bound, bound, generator=self.generator)
                self.factors.append([torch.zeros(out, opts.rank, device=device, requires_grad=True),
                                     a.requires_grad_(True)])
            else:
                self.factors.append([torch.zeros(u.shape, device=device, requires_grad=True)])
        self.log_alpha = torch.full((len(self.units),), float(opts.log_alpha_init), device=device, requires_grad=True)
        self.every = [t for f in self.factors for t in f]
        groups = [{"params": self.every, "lr": opts.lr}]
        if head:
            groups.append({"params": head, "lr": opts.head_lr if opts.head_lr is not None else opts.lr})
        self.opt_w = adamw(groups, opts.lr, opts.weight_decay, device)
        self.opt_a = adamw([{"params": [self.log_alpha], "lr": opts.alpha_lr}], opts.alpha_lr, 0.0, device)
        for g in self.opt_w.param_groups:
            g["initial_lr"] = g["lr"]
        self.total = max(1, total_steps)
        self.fits_all = float(self.costs.sum()) <= self.budget
        self.controller = DensityController(self.budget / self.n, opts.l0_lambda, opts.controller_rate,
                                            int(round(opts.controller_warmup * self.total)),
                                            start=self.expected_density(), enabled=opts.controller,
                                            speed=0.5 * opts.alpha_lr)
        self.lam = 0.0 if self.fits_all else self.controller.lam
        self.step_count = 0
        self.noise: "torch.Tensor | None" = None
        self.chosen: list[int] = []
        self.record: list[dict[str, Any]] = []  # every unit's probability, cost and choice (after `choose_units`)

    def tensors(self) -> dict[str, "torch.Tensor"]:
        """What the phases train, by its name in the resumable state: every unit's factors (or δ), log α, the head."""
        out = {f"swr/factor/{i}/{j}": t for i, f in enumerate(self.factors) for j, t in enumerate(f)}
        out["swr/log_alpha"] = self.log_alpha
        out.update({f"swr/head/{j}": p for j, p in enumerate(self.head)})
        return out

    def delta(self, i: int) -> "torch.Tensor":
        f = self.factors[i]
        return f[0] @ f[1] if len(f) == 2 else f[0]

    def write_(self, gates: list[float], which: list[int]) -> None:
        """θ = θ₀ + g_u·Δ_u for the units in `which`, θ₀ elsewhere."""
        import torch

        with torch.no_grad():
            self.flat.theta.copy_(self.flat.theta0)
            for i in which:
                seg = self.flat.theta[self.flat.offsets[i]:self.flat.offsets[i + 1]].view(self.units[i].shape)
                f = self.factors[i]
                if len(f) == 2:
                    seg.addmm_(f[0], f[1], alpha=gates[i])
                else:
                    seg.add_(f[0].reshape(seg.shape), alpha=gates[i])

    def surrogate(self, gates: "torch.Tensor", which: list[int]) -> "torch.Tensor":
        """Σ_u g_u·⟨Δ_u, dL/dθ_u⟩: its gradient is dL/d(factors) and dL/dg (dL/dθ collected from the model)."""
        self.flat.collect_grads_()
        total = gates.new_zeros(())
        for i in which:
            g = self.flat.grad[self.flat.offsets[i]:self.flat.offsets[i + 1]].view(self.units[i].shape)
            f = self.factors[i]
            inner = (f[0] * (g @ f[1].T)).sum() if len(f) == 2 else (f[0].reshape(g.shape) * g).sum()
            total = total + gates[i] * inner
        return total

    def begin(self) -> None:
        """Sample the unit gates, write θ = θ₀ + z·Δ, clear dL/dθ."""
        self.noise = self.gate.noise((len(self.units),), self.generator).to(self.dev)
        z = self.gate.sample(self.log_alpha.detach(), self.noise)
        self.write_(z.tolist(), list(range(len(self.units))))
        zero_grads(self.flat, self.head)

    def finish(self) -> dict[str, float]:
        """Gradients of B·A, δ and log α (with λ·Σ P(z_u ≠ 0)·c_u), clip, the two AdamW steps, the controller."""
        if self.noise is None:
            from diffcli.errors import InvalidValueError

            raise InvalidValueError("finish() before begin(): call begin() before each forward pass")
        for t in self.every + [self.log_alpha]:
            t.grad = None
        z = self.gate.sample(self.log_alpha, self.noise)
        penalty = self.lam * (self.gate.prob_nonzero(self.log_alpha) * self.costs).sum()
        (self.surrogate(z, list(range(len(self.units)))) + penalty).backward()
        clip(self.every + self.head, self.opts.grad_clip)
        clip([self.log_alpha], self.opts.grad_clip)
        decay = max(0.0, 1.0 - self.step_count / self.total)
        for g in self.opt_w.param_groups:
            g["lr"] = g["initial_lr"] * decay
        self.opt_w.step()
        self.opt_a.step()
        density = self.expected_density()
        if not self.fits_all:
            self.lam = self.controller.update(self.step_count, density)
        self.step_count += 1
        self.noise = None
        return {"expected_density": density, "expected_cost": round(density * self.n), "lambda": self.lam}

    def set_deterministic_(self) -> None:
        """θ = θ₀ + ẑ·Δ with the deterministic gates (to evaluate the first phase)."""
        self.write_(self.gate.deterministic(self.log_alpha.detach()).tolist(), list(range(len(self.units))))

    def expected_density(self) -> float:
        """E[cost]/N = Σ_u P(z_u ≠ 0)·c_u / N."""
        p = self.gate.prob_nonzero(self.log_alpha.detach())
        return float((p * self.costs).sum()) / self.n

    def probabilities(self) -> list[float]:
        return self.gate.prob_nonzero(self.log_alpha.detach()).tolist()

    def choose_units(self) -> dict[str, Any]:
        """The units that fit the budget by gate probability (`choose`), ungated from now on at ẑ_u·Δ_u (the
        model is θ₀ + Δ at them, θ₀ elsewhere); what to record."""
        import torch

        probs = self.probabilities()
        picked = choose(self.units, probs, self.budget)
        self.chosen = [i for i, c in enumerate(picked) if c]
        cost = sum(self.units[i].cost for i in self.chosen)
        self.record = [{"tensor": u.name, "kind": u.kind, "shape": list(u.shape), "cost": u.cost,
                        "probability": round(p, 6), "chosen": c} for u, p, c in zip(self.units, probs, picked)]
        with torch.no_grad():
            zhat = self.gate.deterministic(self.log_alpha.detach())
            for i in self.chosen:
                self.factors[i][0].mul_(zhat[i])  # B (or δ) carries the final gate: Δ_u is ẑ_u·Δ_u from here on
        self.write_([1.0] * len(self.units), self.chosen)  # the chosen units, ungated; the others dropped
        return {"budget": self.budget, "n": self.n, "cost": cost, "chosen": len(self.chosen),
                "units": len(self.units), "rank": self.opts.rank}


class SWRFixed(LinearDecay):
    """The fixed phase: only the chosen units' updates (ungated, from ẑ_u·Δ_u) and the head, AdamW, linear decay."""

    def __init__(self, tr: SWRTrainer, opts: "TrainOptions", total: int):
        self.tr, self.grad_clip = tr, opts.grad_clip
        self.train = [t for i in tr.chosen for t in tr.factors[i]]
        groups = [{"params": self.train, "lr": opts.fixmask_lr}]
        if tr.head:
            groups.append({"params": tr.head, "lr": opts.head_lr if opts.head_lr is not None else opts.fixmask_lr})
        self.schedule(adamw(groups, opts.fixmask_lr, opts.weight_decay, tr.dev), total)
        self.ones = [1.0] * len(tr.units)
        self.best: dict[str, Any] | None = None  # `train`'s best epoch so far (a `snapshot`), kept for resume
        tr.write_(self.ones, tr.chosen)

    def zero_grad(self) -> None:
        zero_grads(self.tr.flat, self.tr.head)

    def step(self) -> None:
        import torch

        tr = self.tr
        for t in self.train:
            t.grad = None
        tr.surrogate(torch.ones(len(tr.units), device=tr.dev), tr.chosen).backward()
        clip(self.train + tr.head, self.grad_clip)
        self.opt_step()
        tr.write_(self.ones, tr.chosen)
        self.steps += 1



def snapshot(tr: SWRTrainer, tm) -> dict[str, Any]:
    """The chosen units' factors and the head as they are, on the CPU (what `export(best=...)` takes)."""
    params = dict(tm.model.named_parameters())
    return {"factors": {i: [t.detach().cpu().clone() for t in tr.factors[i]] for i in tr.chosen},
            "head": {n: params[n].detach().cpu().clone() for n in tm.head}}


def snapshot_tensors(best: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """A `snapshot` as named tensors (the resumable state keeps the best fixed epoch's)."""
    out = {f"best/factor/{i}/{j}": t for i, f in best["factors"].items() for j, t in enumerate(f)}
    out.update({f"best/head/{n}": t for n, t in best["head"].items()})
    return out


def snapshot_from(tensors: dict[str, "torch.Tensor"]) -> dict[str, Any]:
    """Undo `snapshot_tensors`."""
    factors: dict[int, dict[int, "torch.Tensor"]] = {}
    head = {}
    for key, t in tensors.items():
        if key.startswith("best/factor/"):
            i, j = key[len("best/factor/"):].split("/")
            factors.setdefault(int(i), {})[int(j)] = t
        elif key.startswith("best/head/"):
            head[key[len("best/head/"):]] = t
    return {"factors": {i: [f[j] for j in sorted(f)] for i, f in factors.items()}, "head": head}


def _trained(tr: SWRTrainer) -> dict[str, "torch.Tensor"]:
    return {k: t.detach() for k, t in tr.tensors().items()}


def gated_phase(run: "Run", pruner: "DiffPruner", done: int) -> None:
    """Epochs `done+1..--epochs` of sampled gates (the pruner's begin/finish around each step), evaluating the
    deterministic gates; the resumable state after each."""
    opts, rep = run.opts, run.rep
    tr: SWRTrainer = pruner.phase
    fwd = run.ddp if run.ddp is not None else run.tm.model
    if tr.fits_all:
        rep.line(f"every unit fits the budget ({int(tr.costs.sum())} ≤ {tr.budget} parameters): no penalty")

    def step(batch: dict) -> float:
        pruner.begin()
        loss = forward_backward(fwd, batch, run.dev)
        pruner.finish()
        return loss

    for epoch in range(done, opts.epochs):
        mean_loss = run.epoch("gated", epoch, opts.epochs, opts.seed, step)
        entry = {"phase": "gated", "epoch": epoch + 1, "loss": mean_loss, "expected_density": tr.expected_density(),
                 "expected_cost": round(tr.expected_density() * tr.n), "lambda": tr.lam}
        if run.dist.main:
            tr.set_deterministic_()
            entry["metrics"] = evaluate_on(run.tm, run.task_data, opts, run.dev)
            rep.line(f"gated epoch {epoch + 1}/{opts.epochs}: loss {mean_loss:.4f} expected cost "
                     f"{entry['expected_cost']:,} of budget {tr.budget:,} | {fmt_metrics(entry['metrics'])}")
        run.history.append(entry)
        gated, state = gated_state(tr, run.dev, tr.generator)
        run.save({**_trained(tr), **gated}, {"phase": "gated", "epochs_done": epoch + 1, **state})
        run.epoch_done("gated", epoch + 1)


def fixed_phase(run: "Run", pruner: "DiffPruner", done: int) -> dict[str, Any]:
    """Train only the chosen units' updates and the head (the pruner's fixed phase) from epoch `done` (its engine
    put back by `restore` when done > 0); the resumable state after each epoch; the best dev epoch's snapshot."""
    opts, rep, tm = run.opts, run.rep, run.tm
    tr: SWRTrainer = pruner.phase
    fwd = run.ddp if run.ddp is not None else tm.model
    record = run.record
    if not done:
        pruner.start_fixed(run.steps_per_epoch * opts.fixmask_epochs)
        pruner.engine.best = snapshot(tr, tm)
        if run.dist.main:
            metrics = evaluate_on(tm, run.task_data, opts, run.dev)
            record["projection"]["metrics"] = metrics
            record["best"] = {"epoch": 0, "score": main_score(run.spec, metrics), "metrics": metrics}
            rep.line(f"chosen units, before the fixed phase: {fmt_metrics(metrics)}")
    engine: SWRFixed = pruner.engine

    def step(batch: dict) -> float:
        loss = forward_backward(fwd, batch, run.dev)
        pruner.fixed_step()
        return loss

    for epoch in range(done, opts.fixmask_epochs):
        mean_loss = run.epoch("fixed", epoch, opts.fixmask_epochs, opts.seed + 1, step)
        entry = {"phase": "fixmask", "epoch": epoch + 1, "loss": mean_loss}
        if run.dist.main:
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, run.dev)
            if run.keep_if_best(entry, "fixed", opts.fixmask_epochs):
                engine.best = snapshot(tr, tm)
        run.history.append(entry)
        run.save({**_trained(tr), **snapshot_tensors(engine.best), **engine.state(), **rng_tensors(run.dev, None)},
                 {"phase": "fixmask", "epochs_done": epoch + 1, "step": engine.steps})
        run.epoch_done("fixmask", epoch + 1)
    return engine.best


@register
class SWRMethod(TrainMethod):
    """Gate every shared tensor's candidate update, hold the expected cost to the budget, keep what fits."""

    name = "swr"
    meta_name = "swr-budgeted-reparametrization"
    options = ("epochs", "lr", "alpha_lr", "rank", "budget", "l0_lambda", "log_alpha_init", "gate_l", "gate_r",
               "beta", "controller", "controller_rate", "controller_warmup")
    reparametrizes = ("θ_u = θ₀_u + z_u·Δ_u per shared tensor u; Δ_u = B_u·A_u (rank --rank) for matrices, a dense δ_u "
                      "for 1-D tensors; z_u a hard-concrete gate")
    penalises = "λ·Σ_u P(z_u ≠ 0)·c_u, λ steered by the density controller so that E[cost] meets --budget"
    fixed_phase = "the units taken by gate probability while they fit --budget (a hard cap), ungated, and the head"
    to_diff = "B·A as low-rank records, δ as sparse records, after the best fixed epoch"
    own_fixed_phase = True
    phases = ("gated", "fixmask")  # both resumable; the fixed phase is swr's own (`select` runs it)
    memory = "full"  # θ₀, θ and dL/dθ (flat), the factors and their AdamW states: full finetuning's 16P bounds it
    epochs_phase = "gated"

    def check(self, opts: "TrainOptions") -> None:
        super().check(opts)
        parse_budget(opts.budget)

    # -- the library API ------------------------------------------------------------------------------------
    def first_phase(self, pruner: "DiffPruner", total_steps: int) -> SWRTrainer:
        return SWRTrainer(pruner.tm, pruner.opts, pruner.device, pruner.head, total_steps)

    def project(self, pruner: "DiffPruner", batches, world: int) -> dict[str, Any]:
        return pruner.phase.choose_units()

    def fixed_engine(self, pruner: "DiffPruner", total_steps: int, opts: "TrainOptions") -> SWRFixed:
        return SWRFixed(pruner.phase, opts, total_steps)

    def export(self, pruner: "DiffPruner", meta: dict, best: dict | None):
        """Low-rank and dense records for the chosen units, zeros for the others, the head as extras."""
        from diffcli import lowrank
        from diffcli.diff import TensorDiff
        from diffcli.trained_diff import assemble_diff

        tr: SWRTrainer = pruner.phase
        tm = pruner.tm
        if not pruner.chosen:
            raise InvalidValueError("nothing to export yet: call project() to choose the units first")
        if best is None:
            best = snapshot(tr, tm)
        tensors = {}
        for i, u in enumerate(tr.units):
            dtype, digest = tm.base_info[u.name]
            bname = tm.base_names[u.name]
            f = best["factors"].get(i)
            if f is None:
                tensors[u.name] = TensorDiff.zeros(bname, u.shape, dtype, digest)
            elif u.kind == "lowrank":
                tensors[u.name] = lowrank.make(bname, u.shape, dtype, digest, f[0], f[1])
            else:
                tensors[u.name] = TensorDiff(bname, u.shape, dtype, digest, f[0].reshape(u.shape)).sparse()
        head = {n: best["head"][n] for n in tm.head}
        return assemble_diff(tm, tensors, head, model_ref=pruner.base_ref, meta={**meta, "units": tr.record})

    # -- train ----------------------------------------------------------------------------------------------
    def setup(self, run: "Run") -> "DiffPruner":
        from diffcli.api import DiffPruner

        pruner = DiffPruner.for_task_model(run.tm, run.opts, run.dev, run.steps_per_epoch * run.opts.epochs,
                                           base_ref=run.model_ref, flat=True)
        tr: SWRTrainer = pruner.phase
        run.flat = pruner.layout
        low = sum(u.kind == "lowrank" for u in tr.units)
        run.rep.line(f"swr: {len(tr.units)} units ({low} rank-{run.opts.rank}, {len(tr.units) - low} dense), "
                     f"candidate cost {int(tr.costs.sum()):,}, budget {tr.budget:,} of N = {tr.n:,}")
        return pruner

    def restore(self, run: "Run", pruner: "DiffPruner", tensors: dict, saved: dict) -> None:
        """The factors, gates and head; then the gated phase's optimisers, controller and RNG streams, or the fixed
        phase's chosen units (from the record), its optimiser and best epoch so far."""
        import torch

        tr: SWRTrainer = pruner.phase
        with torch.no_grad():
            for key, t in tr.tensors().items():
                t.copy_(tensors[key])
        if saved["phase"] == "gated":
            restore_gated(tr, tensors, saved, run.dev, tr.generator)
            return
        tr.record = run.record["units"]
        tr.chosen = [i for i, u in enumerate(tr.record) if u["chosen"]]
        pruner.info, pruner.chosen = run.record["projection"], True
        pruner.start_fixed(run.steps_per_epoch * run.opts.fixmask_epochs)  # θ = θ₀ + Δ at the chosen units
        pruner.engine.resume(tensors, int(saved["step"]))
        pruner.engine.best = snapshot_from(tensors)
        restore_rng(tensors, run.dev, None)

    def select(self, run: "Run", pruner: "DiffPruner", done: int) -> dict[str, Any]:
        if not pruner.chosen:  # a fresh run, or one resumed in the gated phase
            gated_phase(run, pruner, done)
            info = pruner.project()
            run.record["units"] = pruner.phase.record
            run.record["projection"] = info
            run.rep.line(f"chosen {info['chosen']} of {info['units']} units: {info['cost']:,} of the "
                         f"{info['budget']:,}-parameter budget")
            done = 0
        return fixed_phase(run, pruner, done)

    def build(self, run: "Run", pruner: "DiffPruner", best: dict[str, Any], *, model_ref: str, meta: dict):
        """The Diff from the best fixed epoch's snapshot (the pruner's export)."""
        return pruner.export(meta=meta, best=best)
