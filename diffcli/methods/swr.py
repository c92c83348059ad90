"""`--method swr`: a budgeted choice of where to update (after Kim, Lee, Yang & Chang 2023, arXiv 2302.13435).

Every shared parameter tensor is a unit u with a candidate update Δ_u: a rank-r product B_u·A_u for a matrix
(B zero, A ~ U(±1/√in) as LoRA starts them) or a dense δ_u for a 1-D tensor (and for a matrix whose factors
would hold as many parameters as the matrix itself). A hard-concrete gate z_u per unit scales it,
θ_u = θ₀_u + z_u·Δ_u; the expected cost Σ_u P(z_u ≠ 0)·c_u (c_u = the unit's update parameters) is held to
the budget by λ, steered by the l0 method's `DensityController`. At the end the units are taken by gate
probability while they fit the budget (never over it); a fixed phase trains only those, ungated; the diff
stores B·A as low-rank records and δ as sparse ones, so the rebuilt model has the base's architecture.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from diffcli.errors import InvalidValueError
from diffcli.methods.l0 import DensityController
from diffcli.methods.registry import TrainMethod, register
from diffcli.train_options import budget_count, parse_budget
from diffcli.trainloop import adamw, autocast, clip, evaluate_on, fmt_metrics, main_score

if TYPE_CHECKING:
    import torch

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
    """The units' candidate updates, their gates and optimisers; forwards through θ₀ + z·Δ without touching θ₀."""

    def __init__(self, run: "Run"):
        import torch

        opts, tm, dev = run.opts, run.tm, run.dev
        self.run, self.opts, self.dev = run, opts, dev
        self.gate = opts.gate()
        params = dict(tm.model.named_parameters())
        self.params = {n: params[n] for n in tm.gated}
        for p in self.params.values():
            p.requires_grad_(False)
        self.head = [params[n] for n in tm.head]
        self.units = plan_units({n: tuple(p.shape) for n, p in self.params.items()}, opts.rank)
        self.n = sum(p.numel() for p in self.params.values())
        self.budget = budget_params(opts, self.n)
        self.costs = torch.tensor([float(u.cost) for u in self.units], device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(opts.seed)
        self.factors: list[list[torch.Tensor]] = []
        for u in self.units:
            if u.kind == "lowrank":
                out, inp = u.shape
                bound = 1 / math.sqrt(inp)  # LoRA: kaiming_uniform(a=√5) on A, B = 0
                a = torch.empty(opts.rank, inp, device=dev).uniform_(-bound, bound, generator=self.generator)
                self.factors.append([torch.zeros(out, opts.rank, device=dev, requires_grad=True),
                                     a.requires_grad_(True)])
            else:
                self.factors.append([torch.zeros(u.shape, device=dev, requires_grad=True)])
        self.log_alpha = torch.full((len(self.units),), float(opts.log_alpha_init), device=dev, requires_grad=True)
        self.step_count = 0
        self.lam = 0.0

    def delta(self, i: int) -> "torch.Tensor":
        f = self.factors[i]
        return f[0] @ f[1] if len(f) == 2 else f[0]

    def effective(self, gates: "torch.Tensor", which: list[int]) -> dict[str, "torch.Tensor"]:
        """θ₀_u + g_u·Δ_u for the units in `which` (differentiable in the factors and the gates)."""
        return {self.units[i].name: self.params[self.units[i].name] + gates[i] * self.delta(i) for i in which}

    def loss(self, batch: dict, gates: "torch.Tensor", which: list[int]) -> "torch.Tensor":
        from torch.func import functional_call

        with autocast(self.dev):
            return functional_call(self.run.tm.model, self.effective(gates, which), args=(), kwargs=batch).loss

    @contextmanager
    def applied(self, gates: "torch.Tensor", which: list[int]) -> Iterator[None]:
        """The model's tensors set to θ₀ + g·Δ (for evaluation); θ₀ is put back, the same tensor objects."""
        import torch

        old = {}
        with torch.no_grad():
            for name, t in self.effective(gates.detach(), which).items():
                old[name] = self.params[name].data
                self.params[name].data = t.detach()
        try:
            yield
        finally:
            for name, t in old.items():
                self.params[name].data = t

    def expected_density(self) -> float:
        """E[cost]/N = Σ_u P(z_u ≠ 0)·c_u / N."""
        p = self.gate.prob_nonzero(self.log_alpha.detach())
        return float((p * self.costs).sum()) / self.n

    def probabilities(self) -> list[float]:
        return self.gate.prob_nonzero(self.log_alpha.detach()).tolist()


def gated_phase(run: "Run", tr: SWRTrainer) -> None:
    """`--epochs` of sampled gates, task loss + λ·Σ P(z_u ≠ 0)·c_u, λ steered so E[cost] meets the budget."""
    import torch

    opts, rep = run.opts, run.rep
    total = max(1, run.steps_per_epoch * opts.epochs)
    all_units = list(range(len(tr.units)))
    every = [t for f in tr.factors for t in f]
    groups = [{"params": every, "lr": opts.lr}]
    if tr.head:
        groups.append({"params": tr.head, "lr": opts.head_lr if opts.head_lr is not None else opts.lr})
    opt_w = adamw(groups, opts.lr, opts.weight_decay, run.dev)
    opt_a = adamw([{"params": [tr.log_alpha], "lr": opts.alpha_lr}], opts.alpha_lr, 0.0, run.dev)
    for g in opt_w.param_groups:
        g["initial_lr"] = g["lr"]
    fits_all = float(tr.costs.sum()) <= tr.budget
    start = tr.expected_density()
    controller = DensityController(tr.budget / tr.n, opts.l0_lambda, opts.controller_rate,
                                   int(round(opts.controller_warmup * total)), start=start,
                                   enabled=opts.controller, speed=0.5 * opts.alpha_lr)
    tr.lam = 0.0 if fits_all else controller.lam
    if fits_all:
        rep.line(f"every unit fits the budget ({int(tr.costs.sum())} ≤ {tr.budget} parameters): no penalty")

    def step(batch: dict) -> float:
        noise = tr.gate.noise((len(tr.units),), tr.generator)
        z = tr.gate.sample(tr.log_alpha, noise.to(tr.dev))
        opt_w.zero_grad(set_to_none=True)
        opt_a.zero_grad(set_to_none=True)
        loss = tr.loss(batch, z, all_units)
        penalty = tr.lam * (tr.gate.prob_nonzero(tr.log_alpha) * tr.costs).sum()
        (loss + penalty).backward()
        clip(every + tr.head, opts.grad_clip)
        clip([tr.log_alpha], opts.grad_clip)
        decay = max(0.0, 1.0 - tr.step_count / total)
        for g in opt_w.param_groups:
            g["lr"] = g["initial_lr"] * decay
        opt_w.step()
        opt_a.step()
        if not fits_all:
            tr.lam = controller.update(tr.step_count, tr.expected_density())
        tr.step_count += 1
        return float(loss.detach())

    for epoch in range(opts.epochs):
        mean_loss = run.epoch("gated", epoch, opts.epochs, opts.seed, step)
        entry = {"phase": "gated", "epoch": epoch + 1, "loss": mean_loss, "expected_density": tr.expected_density(),
                 "expected_cost": round(tr.expected_density() * tr.n), "lambda": tr.lam}
        if run.dist.main:
            with tr.applied(tr.gate.deterministic(tr.log_alpha.detach()), all_units):
                entry["metrics"] = evaluate_on(run.tm, run.task_data, opts, run.dev)
            rep.line(f"gated epoch {epoch + 1}/{opts.epochs}: loss {mean_loss:.4f} expected cost "
                     f"{entry['expected_cost']:,} of budget {tr.budget:,} | {fmt_metrics(entry['metrics'])}")
        run.history.append(entry)
        run.epoch_done("gated", epoch + 1)


def fixed_phase(run: "Run", tr: SWRTrainer, chosen: list[int]) -> dict[str, Any]:
    """Train only the chosen units' updates (ungated, starting at ẑ_u·Δ_u) and the head; the best dev epoch."""
    import torch

    opts, rep, tm = run.opts, run.rep, run.tm
    ones = torch.ones(len(tr.units), device=tr.dev)
    with torch.no_grad():
        zhat = tr.gate.deterministic(tr.log_alpha.detach())
        for i in chosen:
            tr.factors[i][0].mul_(zhat[i])  # B (or δ) carries the final gate: Δ_u starts at ẑ_u·Δ_u
    train = [t for i in chosen for t in tr.factors[i]]
    groups = [{"params": train, "lr": opts.fixmask_lr}]
    if tr.head:
        groups.append({"params": tr.head, "lr": opts.head_lr if opts.head_lr is not None else opts.fixmask_lr})
    opt = adamw(groups, opts.fixmask_lr, opts.weight_decay, run.dev)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    total = max(1, run.steps_per_epoch * opts.fixmask_epochs)
    count = {"step": 0}

    def snapshot() -> dict[str, Any]:
        return {"factors": {i: [t.detach().cpu().clone() for t in tr.factors[i]] for i in chosen},
                "head": {n: p.detach().cpu().clone() for n, p in zip(tm.head, tr.head)}}

    def evaluate() -> dict:
        with tr.applied(ones, chosen):
            return evaluate_on(tm, run.task_data, opts, run.dev)

    record = run.record
    best = snapshot()
    if run.dist.main:
        metrics = evaluate()
        record["projection"]["metrics"] = metrics
        record["best"] = {"epoch": 0, "score": main_score(run.spec, metrics), "metrics": metrics}
        rep.line(f"chosen units, before the fixed phase: {fmt_metrics(metrics)}")

    def step(batch: dict) -> float:
        opt.zero_grad(set_to_none=True)
        loss = tr.loss(batch, ones, chosen)
        loss.backward()
        clip(train + tr.head, opts.grad_clip)
        decay = max(0.0, 1.0 - count["step"] / total)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * decay
        opt.step()
        count["step"] += 1
        return float(loss.detach())

    for epoch in range(opts.fixmask_epochs):
        mean_loss = run.epoch("fixed", epoch, opts.fixmask_epochs, opts.seed + 1, step)
        entry = {"phase": "fixmask", "epoch": epoch + 1, "loss": mean_loss}
        if run.dist.main:
            entry["metrics"] = evaluate()
            if run.keep_if_best(entry, "fixed", opts.fixmask_epochs):
                best = snapshot()
        run.history.append(entry)
        run.epoch_done("fixmask", epoch + 1)
    return best


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
    memory = "full"  # θ₀, θ₀ + z·Δ and its gradient per unit, B·A: full finetuning's 16P bounds it
    epochs_phase = "gated"

    def check(self, opts: "TrainOptions") -> None:
        super().check(opts)
        parse_budget(opts.budget)

    def setup(self, run: "Run") -> SWRTrainer:
        if run.dist.world > 1:
            raise InvalidValueError("--method swr trains in one process", hint="run it without torchrun")
        tr = SWRTrainer(run)
        low = sum(u.kind == "lowrank" for u in tr.units)
        run.rep.line(f"swr: {len(tr.units)} units ({low} rank-{run.opts.rank}, {len(tr.units) - low} dense), "
                     f"candidate cost {int(tr.costs.sum()):,}, budget {tr.budget:,} of N = {tr.n:,}")
        return tr

    def select(self, run: "Run", state: SWRTrainer, done: int) -> dict[str, Any]:
        tr = state
        gated_phase(run, tr)
        probs = tr.probabilities()
        chosen = choose(tr.units, probs, tr.budget)
        cost = sum(u.cost for u, c in zip(tr.units, chosen) if c)
        run.record["units"] = [{"tensor": u.name, "kind": u.kind, "shape": list(u.shape), "cost": u.cost,
                                "probability": round(p, 6), "chosen": c} for u, p, c in zip(tr.units, probs, chosen)]
        run.record["projection"] = {"budget": tr.budget, "n": tr.n, "cost": cost, "chosen": sum(chosen),
                                    "units": len(tr.units), "rank": run.opts.rank}
        run.rep.line(f"chosen {sum(chosen)} of {len(tr.units)} units: {cost:,} of the {tr.budget:,}-parameter budget")
        return fixed_phase(run, tr, [i for i, c in enumerate(chosen) if c])

    def build(self, run: "Run", state: SWRTrainer, best: dict[str, Any], *, model_ref: str, meta: dict):
        """The Diff: low-rank and dense records for the chosen units, zeros for the others, the head as extras."""
        from diffcli import lowrank
        from diffcli.diff import TensorDiff
        from diffcli.trained_diff import assemble_diff

        tm = run.tm
        tensors = {}
        for i, u in enumerate(state.units):
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
        return assemble_diff(tm, tensors, head, model_ref=model_ref, meta={**meta, "units": run.record["units"]})
