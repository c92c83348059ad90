"""`--method basis`: basis scaling and double pruning (Wong, Kashyap & Moradi 2021, arXiv 2108.02893).

Every chosen 2-D weight is W = U·diag(a⊙σ)·Vᵀ with the base's deterministic SVD (`diffcli.svd_basis`) and a
learned scale a (init 1); θ is written as θ₀ + U·diag(σ⊙(a−1))·Vᵀ, so a = 1 is the base bit for bit, and
dL/da_i = σ_i·u_iᵀ(dL/dW)v_i comes from dL/dθ by hand (as the l0 gates do). Importance |a_i·dL/da_i| is summed
over the scale phase; the least important bases are pruned (a_i = 0) to `--keep-bases`, a fixed phase trains
the rest, and with `--sparsity` (double pruning) a sparse δ on top of the scaled model is chosen by the
empirical Fisher and trained by the shared fixed-mask phase. `train` saves both scale phases after every epoch
(`restore`). docs/METHODS.md has the equations and defaults.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from diffcli.errors import InvalidValueError
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


class BasisScaling:
    """Scales a of the chosen matrices' SVD bases, written into the flat θ; the pruning importance they earn."""

    def __init__(self, flat, chosen: list[str], device: "torch.device"):
        import torch

        from diffcli.svd_basis import canonical_svd

        self.flat = flat
        self.mats: list[tuple[str, slice, tuple[int, int], "torch.Tensor", "torch.Tensor", "torch.Tensor"]] = []
        where = dict(zip(flat.names, zip(flat.offsets, flat.shapes)))
        for name in chosen:
            off, shape = where[name]
            u, s, vh = canonical_svd(flat.theta0[off:off + shape[0] * shape[1]].view(shape))
            self.mats.append((name, slice(off, off + shape[0] * shape[1]), shape,
                              u.to(device, torch.float32), s.to(device, torch.float32), vh.to(device, torch.float32)))
        self.bounds = [0]
        for m in self.mats:
            self.bounds.append(self.bounds[-1] + int(m[4].numel()))
        self.a = torch.ones(self.bounds[-1], device=device, requires_grad=True)
        self.a.grad = torch.zeros_like(self.a)
        self.alive = torch.ones_like(self.a)
        self.importance = torch.zeros(self.bounds[-1], dtype=torch.float64, device=device)
        self.keep = self.nbases  # how many bases survive pruning (`bases_to_keep`)

    @property
    def nbases(self) -> int:
        return self.bounds[-1]

    def _segments(self):
        for (name, sl, shape, u, s, vh), a, b in zip(self.mats, self.bounds, self.bounds[1:]):
            yield name, sl, shape, u, s, vh, a, b

    def write_(self) -> None:
        """θ = θ₀ + U·diag(σ⊙(a−1))·Vᵀ on every chosen matrix."""
        import torch

        with torch.no_grad():
            for _n, sl, shape, u, s, vh, a, b in self._segments():
                c = (self.a[a:b] - 1) * s
                self.flat.theta[sl].view(shape).copy_(torch.addmm(self.flat.theta0[sl].view(shape), u * c, vh))

    def backward_(self, accumulate: bool) -> None:
        """dL/da_i = σ_i·u_iᵀ(dL/dW)v_i at the live bases; with `accumulate`, importance += |a⊙dL/da|."""
        import torch

        self.flat.collect_grads_()
        with torch.no_grad():
            for _n, sl, shape, u, s, vh, a, b in self._segments():
                g = self.flat.grad[sl].view(shape)
                self.a.grad[a:b] = s * ((u.T @ g) * vh).sum(dim=1)
            self.a.grad.mul_(self.alive)
            if accumulate:
                self.importance.add_((self.a.detach() * self.a.grad).abs().double())

    def prune_(self, keep: int) -> int:
        """Keep the `keep` live bases of largest importance (one global ranking), a = 0 elsewhere; how many went."""
        import torch

        with torch.no_grad():
            score = torch.where(self.alive > 0, self.importance, torch.full_like(self.importance, -1.0))
            order = torch.argsort(score, descending=True, stable=True)
            self.alive.zero_()
            self.alive[order[:keep]] = 1
            self.a.mul_(self.alive)
        self.write_()
        return self.nbases - keep

    def fold_(self) -> None:
        """θ₀ ← θ: the shared fixed-mask phase then trains δ on top of the scaled model (double pruning)."""
        import torch

        with torch.no_grad():
            self.flat.theta0.copy_(self.flat.theta)

    def scales(self, base_of) -> dict[str, Any]:
        """Per matrix: kept basis indices, a − 1 there, the probe of the float64 update (`svd_basis.make_scales`)."""
        from diffcli.svd_basis import canonical_svd, make_scales

        out = {}
        for name, _sl, _shape, _u, _s, _vh, a, b in self._segments():
            u, s, vh = canonical_svd(base_of(name))
            out[name] = make_scales(u, s, vh, self.a.detach()[a:b].cpu())
        return out


def matrices(model, names: list[str], embeddings: bool) -> list[str]:
    """The shared 2-D weights basis scaling rewrites: embedding tables only with `embeddings`."""
    import torch

    emb = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)}
    params = dict(model.named_parameters())
    return [n for n in names if params[n].dim() == 2 and (embeddings or n not in emb)]


class ScaleSteps(LinearDecay):
    """One optimizer over the live scales (and the head) at `lr`, linear decay to 0 over `total` steps: the step of
    the scale phase (`accumulate`: importance += |a⊙dL/da|) and of the kept scales' fixed phase (`best`: its best
    dev epoch so far, {"a", "head", "record"}, kept for resume)."""

    def __init__(self, state: BasisScaling, head: list, opts: "TrainOptions", lr: float, total: int, *,
                 accumulate: bool):
        self.scaling, self.head, self.accumulate, self.grad_clip = state, head, accumulate, opts.grad_clip
        groups = [{"params": [state.a], "lr": lr}]
        if head:
            groups.append({"params": head, "lr": opts.head_lr if opts.head_lr is not None else lr,
                           "weight_decay": opts.weight_decay})
        # no decay on a: it would pull every scale toward 0
        self.schedule(adamw(groups, lr, 0.0, state.a.device), max(1, total))
        self.best: dict[str, Any] | None = None

    def zero_grad(self) -> None:
        zero_grads(self.scaling.flat, self.head)

    def step(self) -> None:
        import torch

        state = self.scaling
        state.backward_(self.accumulate)
        clip([state.a] + self.head, self.grad_clip)
        self.opt_step()
        with torch.no_grad():
            state.a.mul_(state.alive)
        state.write_()
        self.steps += 1


class BasisPhase:
    """The scale phase of a `DiffPruner`: `begin()` clears dL/dθ, `finish()` steps the scales and sums importance."""

    def __init__(self, pruner: "DiffPruner", total_steps: int):
        from diffcli.diffmodel import FlatParams

        opts, tm = pruner.opts, pruner.tm
        chosen = chosen_matrices(tm, opts)
        self.flat = FlatParams(tm.model, tm.gated, pruner.device)
        self.state = BasisScaling(self.flat, chosen, pruner.device)
        self.state.keep = bases_to_keep(opts, self.state.nbases, self.flat.numel)  # refused before any training
        self.steps = ScaleSteps(self.state, pruner.head, opts, opts.basis_lr, total_steps, accumulate=True)

    def begin(self) -> None:
        self.steps.zero_grad()

    def finish(self) -> dict[str, float]:
        self.steps.step()
        return {"live_bases": int(self.state.alive.sum())}


def chosen_matrices(tm, opts: "TrainOptions") -> list[str]:
    """The 2-D weights basis scaling rewrites; refused, one line, when the base has none."""
    chosen = matrices(tm.model, tm.gated, opts.basis_embeddings)
    if not chosen:
        raise InvalidValueError("--method basis needs 2-D weights and this base has none"
                                + ("" if opts.basis_embeddings else " outside its embeddings"),
                                hint="pick another --method" + ("" if opts.basis_embeddings
                                                                else " or pass --basis-embeddings"))
    return chosen


@register
class BasisMethod(TrainMethod):
    """Learn a scale per SVD basis of every weight matrix, prune the unimportant bases, optionally add a sparse δ."""

    name = "basis"
    meta_name = "basis-scaling"
    options = ("epochs", "keep_bases", "budget", "basis_lr", "basis_embeddings", "double_prune", "fill_samples")
    reparametrizes = "W = U·diag(a⊙σ)·Vᵀ per 2-D weight (base SVD, float64, canonical signs), a learned, init 1"
    penalises = ("nothing; bases of least importance Σ|a_i·dL/da_i| are pruned (a_i = 0) to --keep-bases after the "
                 "scale phase")
    fixed_phase = ("the kept scales and the head (own fixed phase); with --sparsity, then the k = round(S·N) "
                   "entries of largest empirical Fisher on the scaled model (shared fixed-mask phase)")
    to_diff = "basis records (a − 1 at kept bases, pruned bases, a probe) plus the sparse δ and the head"
    phases = ("basis", "basis-fixed")  # resumable: the scale phase and the kept scales' fixed phase (`restore`)
    epochs_phase = "basis"
    memory = "l0"  # θ₀, θ, dL/dθ and float32 U, Vᵀ (≤ 2N): within l0's θ₀, θ, w, log α and their states

    def check(self, opts: "TrainOptions") -> None:
        super().check(opts)
        if opts.keep_bases is not None and not (math.isfinite(opts.keep_bases) and 0 < opts.keep_bases <= 1):
            raise InvalidValueError(f"--keep-bases is a fraction of the bases in (0, 1], got {opts.keep_bases}")
        if opts.keep_bases is not None and opts.budget is not None:
            raise InvalidValueError("--keep-bases and --budget both set how many bases stay",
                                    hint="give one of them")
        parse_budget(opts.budget)
        if not (math.isfinite(opts.basis_lr) and opts.basis_lr >= 0):
            raise InvalidValueError(f"--basis-lr must be a finite number ≥ 0, got {opts.basis_lr}")

    # -- the library API ------------------------------------------------------------------------------------
    def first_phase(self, pruner: "DiffPruner", total_steps: int) -> BasisPhase:
        # flat: the scales write θ = θ₀ + U·diag(σ⊙(a−1))·Vᵀ into the N-sized buffers, and double pruning's
        # fixed phase trains δ on top of them (θ₀ folded to the scaled model)
        phase = BasisPhase(pruner, total_steps)
        pruner.method_state = phase.state
        pruner.flat_engine = True
        return phase

    def project(self, pruner: "DiffPruner", batches, world: int) -> dict[str, Any]:
        """Basis pruning: the `keep` bases of largest accumulated importance stay, a = 0 at the others."""
        state: BasisScaling = pruner.method_state
        pruned = state.prune_(state.keep)
        return {"total": state.nbases, "kept": state.keep, "pruned": pruned, "matrices": len(state.mats)}

    def fixed_engine(self, pruner: "DiffPruner", total_steps: int, opts: "TrainOptions"):
        """The kept scales (after project()); the sparse δ on the scaled model (after choose_mask())."""
        if pruner.index is not None:
            return pruner.mask_engine(total_steps, opts)
        return ScaleSteps(pruner.method_state, pruner.head, opts, opts.fixmask_lr, total_steps, accumulate=False)

    def choose_mask(self, pruner: "DiffPruner", batches, world: int) -> dict[str, Any]:
        """Double pruning: fold the scales into θ₀, then the k = round(S·N) entries of largest empirical Fisher at
        the scaled model (none without double_prune); `start_fixed()` then trains δ there."""
        import torch

        from diffcli.fisher import fisher_diagonal

        state: BasisScaling = pruner.method_state
        if not pruner.chosen:
            raise InvalidValueError("the bases are not pruned yet: call project() after the scale phase")
        if pruner.index is not None:
            raise InvalidValueError("the double-pruning mask is chosen already")
        opts, n = pruner.opts, state.flat.numel
        k = round(opts.sparsity * n) if opts.double_prune else 0
        if k and batches is None:
            raise InvalidValueError("double pruning's Fisher mask needs batches of training data: choose_mask(batches)")
        state.fold_()
        pruner.phase = None
        index = torch.zeros(0, dtype=torch.int64)
        if k:
            score = fisher_diagonal(pruner.tm.model, state.flat, pruner.head, batches, pruner.device, world)
            top = torch.topk(score, min(k, score.numel()), sorted=False).indices
            index = torch.sort(top.cpu()).values.to(torch.int64)
        pruner.index, pruner.values = index, torch.zeros(index.numel())
        return {"sparsity": opts.sparsity if k else 0.0, "k": k, "n": n, "kept": int(index.numel()),
                "mask": "fisher" if k else None}

    def export(self, pruner: "DiffPruner", meta: dict, best: dict | None):
        """The sparse δ (empty without double pruning) and the head, with a basis record per scaled matrix (its
        kept bases, a − 1 there and the probe); a `best` snapshot from `train` gets its records in `finish`."""
        if not pruner.chosen and pruner.index is None:
            raise InvalidValueError("nothing to export yet: call project() to prune the bases first")
        diff = pruner.mask_diff(meta, best)
        if best is None:
            diff.bases.update(scale_records(pruner.tm, pruner.method_state))
        return diff

    # -- train ----------------------------------------------------------------------------------------------
    def setup(self, run: "Run") -> "DiffPruner":
        from diffcli.api import DiffPruner

        chosen_matrices(run.tm, run.opts)  # refused here, before anything else
        pruner = DiffPruner.for_task_model(run.tm, run.opts, run.dev, run.steps_per_epoch * run.opts.epochs,
                                           base_ref=run.model_ref, flat=True)
        run.flat = pruner.layout
        return pruner

    def restore(self, run: "Run", pruner: "DiffPruner", tensors: dict, saved: dict) -> None:
        """The scales, live bases, importance and head, the phase's optimiser and step, the dropout RNG; in the fixed
        scale phase also the pruning's record (the pruner is past `project`) and the best epoch so far."""
        import torch

        state: BasisScaling = pruner.method_state
        with torch.no_grad():
            for key, t in _trained(state, pruner.head).items():
                t.copy_(tensors[key])
        if saved["phase"] == "basis-fixed":
            pruner.info, pruner.chosen = dict(run.record["bases"]), True
            pruner.start_fixed(run.opts.fixmask_epochs * run.steps_per_epoch)
            steps = pruner.engine
            steps.best = _snapshot_from(tensors, saved["best"], state.a.device)
        else:
            steps = pruner.phase.steps
        steps.resume(tensors, int(saved["step"]))
        restore_rng(tensors, run.dev, None)
        state.write_()

    def select(self, run: "Run", pruner: "DiffPruner", done: int) -> dict[str, "torch.Tensor"]:
        import torch

        from diffcli.fisher import fisher_batches

        state: BasisScaling = pruner.method_state
        opts, tm = run.opts, run.tm
        head = pruner.head
        fwd = run.ddp if run.ddp is not None else tm.model
        record = run.record

        if not pruner.chosen:  # a fresh run, or one resumed in the scale phase
            def scale_step(batch: dict) -> float:
                pruner.begin()
                loss = forward_backward(fwd, batch, run.dev)
                pruner.finish()
                return loss

            _epochs(run, "basis", opts.epochs, opts.seed, scale_step, pruner.phase.steps, done)
            bases = pruner.project()
            record["bases"] = dict(bases)
            run.rep.line(f"basis pruning: kept {bases['kept']} of {bases['total']} bases in {bases['matrices']} "
                         "matrices")
            pruner.start_fixed(opts.fixmask_epochs * run.steps_per_epoch)
            done = 0

        def fixed_step(batch: dict) -> float:
            loss = forward_backward(fwd, batch, run.dev)
            pruner.fixed_step()
            return loss

        best = _epochs(run, "basis-fixed", opts.fixmask_epochs, opts.seed + 1, fixed_step, pruner.engine, done,
                       keep_best=True)
        with torch.no_grad():
            state.a.copy_(best["a"])
            for p, t in zip(head, best["head"]):
                p.copy_(t)
        state.write_()
        record["bases"]["best"] = best["record"]
        out = {f"head/{n}": p.detach().clone().cpu() for n, p in zip(tm.head, head)}
        out.update(scale_tensors(tm, state))
        double = opts.double_prune and round(opts.sparsity * state.flat.numel) > 0

        def batches():  # read only when double pruning has a mask to choose
            yield from fisher_batches(run)

        record["projection"] = pruner.choose_mask(batches() if double else None, run.dist.world)
        out.update({"mask/index": pruner.index, "mask/values": pruner.values})
        return out

    def resume_fixed(self, run: "Run", pruner: "DiffPruner", tensors: dict) -> None:
        """The scaled model the interrupted sparse phase trained on: the saved scales, written and folded into θ₀."""
        import torch

        state: BasisScaling = pruner.method_state
        with torch.no_grad():
            state.a.zero_()
            for name, _sl, _shape, _u, _s, _vh, a, _b in state._segments():
                kept = tensors[f"method/basis/kept/{name}"].to(state.a.device)
                state.a[a + kept] = 1 + tensors[f"method/basis/values/{name}"].to(state.a.device)
        state.write_()
        state.fold_()
        pruner.phase = None

    def finish(self, run: "Run", tensors: dict, diff):
        """The trained diff with its basis records (kept indices, a − 1, probe) read back from `tensors`."""
        from diffcli.diff import BasisScales

        for key, kept in tensors.items():
            if key.startswith("method/basis/kept/"):
                name = key[len("method/basis/kept/"):]
                diff.bases[name] = BasisScales(int(tensors[f"method/basis/rank/{name}"]), kept.cpu(),
                                               tensors[f"method/basis/values/{name}"].cpu(),
                                               [float(p) for p in tensors[f"method/basis/probe/{name}"].tolist()])
        return diff


def bases_to_keep(opts: "TrainOptions", total: int, n: int) -> int:
    """Kept bases: round(--keep-bases · R) (default 0.5), or what --budget leaves after the sparse δ."""
    if opts.budget is None:
        return max(1, round((0.5 if opts.keep_bases is None else opts.keep_bases) * total))
    budget = budget_count(opts.budget, n)
    sparse = round(opts.sparsity * n) if opts.double_prune else 0
    if not sparse < budget <= n:
        raise InvalidValueError(f"--budget {opts.budget} is {budget} parameters; it must exceed the "
                                f"{sparse} sparse entries of --sparsity and be at most N = {n}")
    return min(total, budget - sparse)


def _epochs(run: "Run", label: str, epochs: int, seed: int, step, steps: ScaleSteps, done: int, *,
            keep_best: bool = False) -> dict[str, Any]:
    """Epochs `done+1..epochs` of `step` per batch, evaluated after each, the resumable state saved after each; with
    `keep_best`, the best dev epoch (epoch 0 = the start) as {"a", "head", "record"}, the same on every rank."""
    opts, dev, tm = run.opts, run.dev, run.tm
    state, head = steps.scaling, steps.head

    def snapshot(record: dict) -> dict[str, Any]:
        return {"a": state.a.detach().clone(), "head": [p.detach().clone() for p in head], "record": record}

    if keep_best and not done and run.dist.main:
        metrics = evaluate_on(tm, run.task_data, opts, dev)
        steps.best = snapshot({"epoch": 0, "score": main_score(run.spec, metrics), "metrics": metrics})
        run.rep.line(f"after basis pruning: {fmt_metrics(metrics)}")
    for epoch in range(done, epochs):
        mean = run.epoch(label, epoch, epochs, seed, step)
        entry: dict[str, Any] = {"phase": label, "epoch": epoch + 1, "loss": mean}
        if run.dist.main:
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, dev)
            better = keep_best and main_score(run.spec, entry["metrics"]) > steps.best["record"]["score"]
            if better:
                steps.best = snapshot({"epoch": epoch + 1, "score": main_score(run.spec, entry["metrics"]),
                                       "metrics": entry["metrics"]})
            run.rep.line(f"{label} epoch {epoch + 1}/{epochs}: loss {mean:.4f} | {fmt_metrics(entry['metrics'])}"
                         f"{'  (best)' if better else ''}")
        run.history.append(entry)
        kept = steps.best if keep_best and run.dist.main else None
        run.save({**_trained(state, head), **steps.state(), **rng_tensors(dev, None), **_snapshot_tensors(kept)},
                 {"phase": label, "epochs_done": epoch + 1, "step": steps.steps,
                  **({"best": kept["record"]} if kept else {})})
        run.epoch_done(label, epoch + 1)
    return _broadcast_best(run, steps.best, state, head) if keep_best else {}


def _trained(state: BasisScaling, head: list) -> dict[str, "torch.Tensor"]:
    """What the scale phases train or accumulate, by its name in the resumable state."""
    return {"basis/a": state.a.detach(), "basis/alive": state.alive, "basis/importance": state.importance,
            **{f"basis/head/{j}": p.detach() for j, p in enumerate(head)}}


def _snapshot_tensors(best: dict[str, Any] | None) -> dict[str, "torch.Tensor"]:
    """The fixed scale phase's best epoch so far as named tensors (its record goes to the JSON state)."""
    if best is None:
        return {}
    return {"best/a": best["a"], **{f"best/head/{j}": t for j, t in enumerate(best["head"])}}


def _snapshot_from(tensors: dict[str, "torch.Tensor"], record: dict, device: "torch.device") -> dict[str, Any]:
    """Undo `_snapshot_tensors`."""
    heads = sorted(((int(k[len("best/head/"):]), t) for k, t in tensors.items() if k.startswith("best/head/")),
                   key=lambda jt: jt[0])
    return {"a": tensors["best/a"].to(device), "head": [t.to(device) for _, t in heads], "record": record}


def _broadcast_best(run: "Run", best, state: BasisScaling, head: list) -> dict[str, Any]:
    """Rank 0 chose the best epoch; every rank takes its scales and head."""
    import torch

    if run.dist.world == 1:
        return best
    import torch.distributed as dist

    a = best["a"] if best is not None else torch.empty_like(state.a)
    hs = best["head"] if best is not None else [torch.empty_like(p) for p in head]
    for t in [a] + hs:
        dist.broadcast(t, 0)
    return {"a": a, "head": hs, "record": best["record"] if best is not None else {}}


def scale_records(tm, state: BasisScaling) -> dict[str, Any]:
    """Per scaled matrix its `BasisScales` (kept bases, a − 1 there, the probe), from the base's own SVD."""
    from diffcli.weights import WeightStore

    store = WeightStore(tm.base_dir)
    try:
        return state.scales(lambda name: store[tm.base_names[name]])
    finally:
        store.release()


def scale_tensors(tm, state: BasisScaling) -> dict[str, "torch.Tensor"]:
    """The basis records as tensors (so the shared loop saves them with its state): kept, a − 1, rank, probe."""
    import torch

    out = {}
    for name, bs in scale_records(tm, state).items():
        out[f"method/basis/kept/{name}"] = bs.kept
        out[f"method/basis/values/{name}"] = bs.values
        out[f"method/basis/rank/{name}"] = torch.tensor(bs.rank, dtype=torch.int64)
        out[f"method/basis/probe/{name}"] = torch.tensor(bs.probe, dtype=torch.float64)
    return out
