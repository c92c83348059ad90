"""`--method basis`: basis scaling and double pruning (Wong, Kashyap & Moradi 2021, arXiv 2108.02893).

Every chosen 2-D weight is W = U·diag(a⊙σ)·Vᵀ with the base's deterministic SVD (`diffcli.svd_basis`) and a
learned scale a (init 1); θ is written as θ₀ + U·diag(σ⊙(a−1))·Vᵀ, so a = 1 is the base bit for bit, and
dL/da_i = σ_i·u_iᵀ(dL/dW)v_i comes from dL/dθ by hand (as the l0 gates do). Importance |a_i·dL/da_i| is summed
over the scale phase; the least important bases are pruned (a_i = 0) to `--keep-bases`, a fixed phase trains
the rest, and with `--sparsity` (double pruning) a sparse δ on top of the scaled model is chosen by the
empirical Fisher and trained by the shared fixed-mask phase. docs/METHODS.md has the equations and defaults.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from diffcli.errors import InvalidValueError
from diffcli.methods.registry import TrainMethod, register
from diffcli.train_options import budget_count, parse_budget
from diffcli.trainloop import adamw, clip, evaluate_on, fmt_metrics, forward_backward, main_score, zero_grads

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

    def setup(self, run: "Run") -> "DiffPruner":
        from diffcli.api import DiffPruner

        tm = run.tm
        chosen = matrices(tm.model, tm.gated, run.opts.basis_embeddings)
        if not chosen:
            raise InvalidValueError("--method basis needs 2-D weights and this base has none"
                                    + ("" if run.opts.basis_embeddings else " outside its embeddings"),
                                    hint="pick another --method" + ("" if run.opts.basis_embeddings
                                                                    else " or pass --basis-embeddings"))
        # flat: the scales write θ = θ₀ + U·diag(σ⊙(a−1))·Vᵀ into the N-sized buffers, and double pruning's
        # fixed phase trains δ on top of them (θ₀ folded to the scaled model)
        pruner = DiffPruner.for_task_model(tm, run.opts, run.dev, run.steps_per_epoch * run.opts.fixmask_epochs,
                                           base_ref=run.model_ref, flat=True)
        run.flat = pruner.layout
        state = BasisScaling(run.flat, chosen, run.dev)
        state.keep = bases_to_keep(run.opts, state.nbases, run.flat.numel)  # refused here, before any training
        pruner.method_state = state
        return pruner

    def select(self, run: "Run", pruner: "DiffPruner", done: int) -> dict[str, "torch.Tensor"]:
        import torch

        state: BasisScaling = pruner.method_state
        opts, tm = run.opts, run.tm
        params = dict(tm.model.named_parameters())
        head = [params[n] for n in tm.head]
        fwd = run.ddp if run.ddp is not None else tm.model
        record = run.record
        _phase(run, state, head, fwd, "basis", opts.epochs, opts.basis_lr, accumulate=True)
        keep = state.keep
        pruned = state.prune_(keep)
        record["bases"] = {"total": state.nbases, "kept": keep, "pruned": pruned, "matrices": len(state.mats)}
        run.rep.line(f"basis pruning: kept {keep} of {state.nbases} bases in {len(state.mats)} matrices")
        best = _phase(run, state, head, fwd, "basis-fixed", opts.fixmask_epochs, opts.fixmask_lr, accumulate=False,
                      keep_best=True)
        with torch.no_grad():
            state.a.copy_(best["a"])
            for p, t in zip(head, best["head"]):
                p.copy_(t)
        state.write_()
        record["bases"]["best"] = best["record"]
        state.fold_()
        out = {f"head/{n}": p.detach().clone().cpu() for n, p in zip(tm.head, head)}
        out.update(_scale_tensors(run, state))
        k = round(opts.sparsity * run.flat.numel) if opts.double_prune else 0
        index = _fisher_top_k(run, state, head, k) if k else torch.zeros(0, dtype=torch.int64)
        record["projection"] = {"sparsity": opts.sparsity if k else 0.0, "k": k, "n": run.flat.numel,
                                "kept": int(index.numel()), "mask": "fisher" if k else None}
        out.update({"mask/index": index, "mask/values": torch.zeros(index.numel())})
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


def _phase(run: "Run", state: BasisScaling, head: list, fwd, label: str, epochs: int, lr: float, *,
           accumulate: bool, keep_best: bool = False) -> dict[str, Any]:
    """Epochs training the live scales (and the head) at `lr`, linear decay; with `keep_best`, the best dev epoch
    (epoch 0 = the start) as {"a", "head", "record"}."""
    opts, dev, tm = run.opts, run.dev, run.tm
    groups = [{"params": [state.a], "lr": lr}]
    if head:
        groups.append({"params": head, "lr": opts.head_lr if opts.head_lr is not None else lr,
                       "weight_decay": opts.weight_decay})
    opt = adamw(groups, lr, 0.0, dev)  # no decay on a: it would pull every scale toward 0, i.e. toward pruning
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    total = max(1, epochs * run.steps_per_epoch)
    steps = 0

    def snapshot(record: dict) -> dict[str, Any]:
        return {"a": state.a.detach().clone(), "head": [p.detach().clone() for p in head], "record": record}

    best = None
    if keep_best and run.dist.main:
        metrics = evaluate_on(tm, run.task_data, opts, dev)
        best = snapshot({"epoch": 0, "score": main_score(run.spec, metrics), "metrics": metrics})
        run.rep.line(f"after basis pruning: {fmt_metrics(metrics)}")

    def step(batch: dict) -> float:
        nonlocal steps
        import torch

        zero_grads(state.flat, head)
        loss = forward_backward(fwd, batch, dev)
        state.backward_(accumulate)
        clip([state.a] + head, opts.grad_clip)
        decay = max(0.0, 1.0 - steps / total)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * decay
        opt.step()
        with torch.no_grad():
            state.a.mul_(state.alive)
        state.write_()
        steps += 1
        return loss

    for epoch in range(epochs):
        mean = run.epoch(label, epoch, epochs, opts.seed + (0 if accumulate else 1), step)
        entry: dict[str, Any] = {"phase": label, "epoch": epoch + 1, "loss": mean}
        if run.dist.main:
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, dev)
            better = best is not None and main_score(run.spec, entry["metrics"]) > best["record"]["score"]
            if better:
                best = snapshot({"epoch": epoch + 1, "score": main_score(run.spec, entry["metrics"]),
                                 "metrics": entry["metrics"]})
            run.rep.line(f"{label} epoch {epoch + 1}/{epochs}: loss {mean:.4f} | {fmt_metrics(entry['metrics'])}"
                         f"{'  (best)' if better else ''}")
        run.history.append(entry)
        run.epoch_done(label, epoch + 1)
    if keep_best:
        best = _broadcast_best(run, best, state, head)
    return best or {}


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


def _scale_tensors(run: "Run", state: BasisScaling) -> dict[str, "torch.Tensor"]:
    """The basis records as tensors (so the shared loop saves them with its state): kept, a − 1, rank, probe."""
    import torch

    from diffcli.weights import WeightStore

    store = WeightStore(run.tm.base_dir)
    try:
        scales = state.scales(lambda name: store[run.tm.base_names[name]])
    finally:
        store.release()
    out = {}
    for name, bs in scales.items():
        out[f"method/basis/kept/{name}"] = bs.kept
        out[f"method/basis/values/{name}"] = bs.values
        out[f"method/basis/rank/{name}"] = torch.tensor(bs.rank, dtype=torch.int64)
        out[f"method/basis/probe/{name}"] = torch.tensor(bs.probe, dtype=torch.float64)
    return out


def _fisher_top_k(run: "Run", state: BasisScaling, head: list, k: int) -> "torch.Tensor":
    """Double pruning's mask: the k entries of largest empirical Fisher at the scaled model, sorted."""
    import torch

    from diffcli.fisher import fisher_scores

    score = fisher_scores(run, state.flat, head)
    top = torch.topk(score, min(k, score.numel()), sorted=False).indices
    return torch.sort(top.cpu()).values.to(torch.int64)
