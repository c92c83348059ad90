"""`--method fisher|random|magnitude`: a mask of exactly k = round(S·N) entries chosen without learned gates.

The ablations of issue 11 and the low-memory path of issue 13: each chooses k entries of the shared tensors
(the selectors of `diffcli.masks`), then the shared fixed-mask phase trains only those (and the new head) with
δ, its gradient and its optimizer state at the k entries (`fixmask.SparseEngine`; under DDP the flat engine,
whose gradient averaging needs whole gradients). fisher ranks by the empirical Fisher's diagonal at the base
(Sung et al. 2021, the ranking of `--fill fisher`); random draws k positions with `--seed`; magnitude keeps the
k largest |δ| of a short dense finetune (`--epochs` at `--lr`), as `prune --base` would from a full finetune.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from diffcli.errors import InvalidValueError
from diffcli.methods.registry import TrainMethod, register
from diffcli.trainloop import adamw, clip, evaluate_on, fmt_metrics, forward_backward

if TYPE_CHECKING:
    import torch

    from diffcli.api import DiffPruner
    from diffcli.trainloop import Run


class MaskMethod(TrainMethod):
    """A method whose mask is chosen in one pass before training; the fixed phase does the rest."""

    reparametrizes: ClassVar[str] = "none before the mask: θ = θ₀ + m⊙δ with the mask m fixed from the start"
    penalises: ClassVar[str] = "nothing: the budget is a hard constraint, exactly k = round(S·N) entries"
    fixed_phase: ClassVar[str] = "the k chosen entries (from δ = 0) and the head, δ and AdamW at k entries only"
    to_diff: ClassVar[str] = "δ at the chosen entries after the best fixed-mask epoch"
    memory: ClassVar[str] = "sparse"

    def setup(self, run: "Run") -> "DiffPruner":
        from diffcli.api import DiffPruner

        pruner = DiffPruner.for_task_model(run.tm, run.opts, run.dev, 1, base_ref=run.model_ref,
                                           flat=run.dist.world > 1)
        run.flat, run.sparse = pruner.layout, not pruner.flat_engine
        return pruner

    def select(self, run: "Run", state: "DiffPruner", done: int) -> dict[str, "torch.Tensor"]:
        tm = run.tm
        params = dict(tm.model.named_parameters())
        self.before_mask(run)

        def batches():  # read only by a data-driven choice
            from diffcli.fisher import fisher_batches

            yield from fisher_batches(run)

        run.record["projection"] = state.choose_mask(batches(), run.dist.world)
        return {"mask/index": state.index, "mask/values": state.values,
                **{f"head/{n}": params[n].detach().clone() for n in tm.head}}

    def before_mask(self, run: "Run") -> None:
        """In `train`, what runs before the mask is chosen (magnitude: the short dense finetune)."""

    def project(self, pruner: "DiffPruner", batches, world: int) -> dict:
        raise InvalidValueError(f"--method {self.name} has no first phase to end: call choose_mask()")

    def choose_mask(self, pruner: "DiffPruner", batches, world: int) -> dict:
        """The k-entry mask on the model as it is (`mask`), as sorted flat positions and their start values."""
        import torch

        from diffcli.projection import budget
        from diffcli.trained_diff import join_index

        if pruner.chosen:  # a second choice would stack a new engine's gradient hooks on the first's
            raise InvalidValueError("the mask is chosen already: choose_mask() has run")
        if self.name == "fisher" and batches is None:
            raise InvalidValueError("the Fisher mask needs batches of training data")
        mask, values, info = self.mask(pruner.tm, pruner.layout, pruner.opts, lambda: batches, world)
        pruner.index = join_index(pruner.layout, mask)
        pruner.values = torch.zeros(pruner.index.numel()) if values is None else values.cpu().to(torch.float32)
        info.update({"sparsity": pruner.opts.sparsity, "k": budget(pruner.opts.sparsity, pruner.layout.numel),
                     "n": pruner.layout.numel, "kept": int(pruner.index.numel()), "mask": self.name})
        return info

    def mask(self, tm, layout, opts, batches, world: int = 1) -> tuple[dict, "torch.Tensor | None", dict]:
        """{tensor: kept positions}, their start values in flat order (None: zeros), what to record.

        `tm` is the model against its base (`taskmodel.attach_base`), `layout` its shared tensors' flat order,
        `batches()` the training batches a data-driven choice reads, `world` the number of DDP processes.
        """
        raise NotImplementedError


@register
class FisherMask(MaskMethod):
    """The k entries with the largest empirical Fisher Σ(dL/dθ)² at the base model (and the new head)."""

    name = "fisher"
    meta_name = "fisher-mask"
    options = ("fill_samples", "values")

    def mask(self, tm, layout, opts, batches, world: int = 1):
        import torch

        from diffcli.fisher import _sum_ranks
        from diffcli.masks import fisher_scores, top_k_positions
        from diffcli.projection import budget

        # bfloat16 scores (half of N floats) on one process; float32 where the ranks' sums are added
        dtype = torch.float32 if world > 1 else None
        device = next(tm.model.parameters()).device
        scores = fisher_scores(tm.model, tm.gated, batches(), device, dtype=dtype)
        for s in scores.values():
            _sum_ranks(s, world)
        return top_k_positions(scores, budget(opts.sparsity, layout.numel)), None, {"fisher_samples": opts.fill_samples}


@register
class RandomMask(MaskMethod):
    """k positions drawn uniformly without replacement with `--seed` (on the CPU: the same mask on every device)."""

    name = "random"
    meta_name = "random-mask"
    options = ("values",)

    def mask(self, tm, layout, opts, batches, world: int = 1):
        from diffcli.masks import random_mask

        return random_mask(dict(zip(layout.names, layout.sizes)), opts.sparsity, opts.seed), None, {}


@register
class MagnitudeMask(MaskMethod):
    """The k largest |δ| after `--epochs` of dense finetuning at `--lr`; the kept entries start at that δ."""

    name = "magnitude"
    meta_name = "magnitude-mask"
    options = ("epochs", "lr", "values")
    fixed_phase = "the k entries of largest |δ| of the dense run, starting at that δ, and its head"
    epochs_phase = "dense"
    memory = "full"

    def before_mask(self, run: "Run") -> None:
        dense_finetune(run)

    def mask(self, tm, layout, opts, batches, world: int = 1):
        """The k largest |θ − θ₀| of the model as it is now (after dense steps); the model returns to θ₀."""
        import torch

        from diffcli.masks import magnitude_mask
        from diffcli.weights import WeightStore

        params = dict(tm.model.named_parameters())
        store = WeightStore(tm.base_dir)
        base = {n: store[tm.base_names[n]].to(params[n].dtype) for n in tm.gated}
        mask = magnitude_mask(params, base, tm.gated, opts.sparsity)
        values = []
        with torch.no_grad():
            for n in tm.gated:  # δ at the kept entries, then the model back to θ₀
                p, b, i = params[n], base[n].to(params[n].device), mask[n].to(params[n].device)
                values.append((p.reshape(-1)[i] - b.reshape(-1)[i]).float().cpu())
                p.copy_(b)
        return mask, torch.cat(values), {"dense_epochs": opts.epochs}


def dense_finetune(run: "Run") -> None:
    """`--epochs` of plain finetuning of every parameter (AdamW at `--lr`, linear decay, clipped)."""
    opts, tm, dev = run.opts, run.tm, run.dev
    params = [p for p in tm.model.parameters() if p.requires_grad]
    opt = adamw([{"params": params, "lr": opts.lr}], opts.lr, opts.weight_decay, dev)
    total = max(1, opts.epochs * run.steps_per_epoch)
    fwd = run.ddp if run.ddp is not None else tm.model
    step = 0

    def one(batch: dict) -> float:
        nonlocal step
        opt.zero_grad(set_to_none=True)
        loss = forward_backward(fwd, batch, dev)
        clip(params, opts.grad_clip)
        for g in opt.param_groups:
            g["lr"] = opts.lr * max(0.0, 1.0 - step / total)
        opt.step()
        step += 1
        return loss

    for epoch in range(opts.epochs):
        entry = {"phase": "dense", "epoch": epoch + 1,
                 "loss": run.epoch("dense", epoch, opts.epochs, opts.seed + 3, one)}
        if run.dist.main:
            entry["metrics"] = evaluate_on(tm, run.task_data, opts, dev)
            run.rep.line(f"dense epoch {epoch + 1}/{opts.epochs}: loss {entry['loss']:.4f} | "
                         f"{fmt_metrics(entry['metrics'])}")
        run.history.append(entry)
    opt.zero_grad(set_to_none=True)  # the dense gradients go; the optimizer's moments go with this frame
