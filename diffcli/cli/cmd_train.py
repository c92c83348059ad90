"""`diffprune train`: choose a sparse mask by a method (a dense run's largest |δ| by default), finetune the kept entries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt

_M = "Method"


def train(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output diff checkpoint folder.")],
    task: Annotated[Optional[str], typer.Option("--task", "-t", help="GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, "
                                                "qnli, rte, wnli), or custom with --train-file.")] = None,
    task_type: Annotated[str, typer.Option("--task-type", help="sequence-classification (the default: GLUE or custom files), token-classification (jsonl tokens+tags or CoNLL) or causal-lm (jsonl/text: text, or prompt+completion).")] = "sequence-classification",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="GLUE folder (default: $GLUE_DIR, else the hub, else for rte the bundled example set).")] = None,
    train_file: Annotated[Optional[Path], typer.Option("--train-file", help="Training data: csv, tsv, json or jsonl.")] = None,
    validation_file: Annotated[Optional[Path], typer.Option("--validation-file", help="Dev data for per-epoch metrics and the best checkpoint.")] = None,
    text_fields: Annotated[Optional[str], typer.Option("--text-fields", help="Text column(s), comma-separated, e.g. sentence1,sentence2.")] = None,
    label_field: Annotated[Optional[str], typer.Option("--label-field", help="Label column of the data files.")] = None,
    regression: Annotated[bool, typer.Option("--regression", help="Read your files' labels as regression scores (pearson, spearman) even when every score is a whole number (without it, whole numbers are classes).")] = False,
    model: Annotated[str, typer.Option("--model", "-m", help="Base model: folder, alias or hub id.")] = "minilm",
    max_train_samples: Annotated[Optional[int], typer.Option("--max-train-samples", help="Train on the first N examples only.")] = None,
    max_eval_samples: Annotated[Optional[int], typer.Option("--max-eval-samples", help="Evaluate on the first N examples of each split.")] = None,
    method: Annotated[str, typer.Option("--method", help="How the mask is chosen: magnitude (largest |δ| of a dense run, the default), l0 (learned gates), fisher, random, swr (a budgeted choice of low-rank/dense updates per tensor), or basis (SVD basis scaling; with --sparsity also a sparse diff); see docs/METHODS.md.", rich_help_panel=_M)] = "magnitude",
    sparsity: Annotated[str, typer.Option("--sparsity", "-s", help="Fraction of shared entries the diff keeps: 0.5% or 0.005.")] = "0.5%",
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="First-phase epochs (default 5): magnitude's dense run, l0's gates, swr's gates, basis's scales.", show_default=False)] = None,
    fixmask_epochs: Annotated[int, typer.Option("--fixmask-epochs", help="Epochs of finetuning the kept entries after the projection.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training examples per step (per process).")] = 32,
    eval_batch_size: Annotated[int, typer.Option("--eval-batch-size", help="Examples per evaluation forward pass.")] = 64,
    max_seq_length: Annotated[Optional[int], typer.Option(
        "--max-seq-length", help="Truncate inputs to this many tokens (default: 128, or the model's positions if fewer).",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of head init, data order, dropout and gate noise.")] = 42,
    lr: Annotated[float, typer.Option("--lr", help="First phase's AdamW rate, linear decay: l0's w, magnitude's dense run, swr's factors.", rich_help_panel=_M)] = 1e-4,
    alpha_lr: Annotated[float, typer.Option("--alpha-lr", help="l0, swr: AdamW learning rate of log α (constant).", rich_help_panel=_M)] = 0.05,
    fixmask_lr: Annotated[float, typer.Option("--fixmask-lr", help="Learning rate of the fixed-mask phase (linear decay).", rich_help_panel=_M)] = 1e-3,
    fixmask_start: Annotated[str, typer.Option("--fixmask-start", help="l0: Start the kept entries at the projected δ (delta) or the raw learned w (w).", rich_help_panel=_M)] = "delta",
    fill: Annotated[str, typer.Option("--fill", help="l0: Rank the entries that top up a budget the gates left short by the gates (gates) or the empirical Fisher (fisher).", rich_help_panel=_M)] = "gates",
    fill_samples: Annotated[int, typer.Option("--fill-samples", help="Examples the Fisher sums over: l0's --fill fisher, --method fisher, basis's double pruning.", rich_help_panel=_M)] = 1024,
    head_lr: Annotated[Optional[float], typer.Option("--head-lr", help="Learning rate of the new head (default: the phase's).", rich_help_panel=_M)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay of the trained update and the head (basis: the head only).", rich_help_panel=_M)] = 0.0,
    l0_lambda: Annotated[float, typer.Option("--l0-lambda", help="l0, swr: Weight λ of the L0 penalty (the controller's starting point).", rich_help_panel=_M)] = 1.25e-7,
    log_alpha_init: Annotated[float, typer.Option("--log-alpha-init", help="l0, swr: Initial log α of every gate.", rich_help_panel=_M)] = 5.0,
    gate_l: Annotated[float, typer.Option("--gate-l", help="l0, swr: Hard-concrete stretch lower limit l (< 0).", rich_help_panel=_M)] = -1.5,
    gate_r: Annotated[float, typer.Option("--gate-r", help="l0, swr: Hard-concrete stretch upper limit r (> 1).", rich_help_panel=_M)] = 1.5,
    beta: Annotated[float, typer.Option("--beta", help="l0, swr: Hard-concrete temperature β.", rich_help_panel=_M)] = 1.0,
    structured: Annotated[bool, typer.Option("--structured/--no-structured", help="l0: One extra group gate per tensor (mask z·z_g).", rich_help_panel=_M)] = True,
    controller: Annotated[bool, typer.Option("--controller/--no-controller", help="l0, swr: Adapt λ so the expected gate density reaches --sparsity in the L0 phase.", rich_help_panel=_M)] = True,
    controller_rate: Annotated[float, typer.Option("--controller-rate", help="l0, swr: Step of the controller's log-λ integral per step.", rich_help_panel=_M)] = 0.3,
    controller_warmup: Annotated[float, typer.Option("--controller-warmup", help="l0, swr: Fraction of L0 steps over which the density target falls to --sparsity.", rich_help_panel=_M)] = 0.6,
    grad_clip: Annotated[float, typer.Option("--grad-clip", help="Clip each optimiser's gradients to this norm (0: off).", rich_help_panel=_M)] = 1.0,
    rank: Annotated[int, typer.Option("--rank", help="swr: rank r of each matrix's candidate update B·A.", rich_help_panel=_M)] = 8,
    keep_bases: Annotated[Optional[float], typer.Option("--keep-bases", help="basis: fraction of SVD bases kept after the scale phase, in (0, 1] (default 0.5).", rich_help_panel=_M)] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Hard cap on stored update parameters: a count (14000) or a share of N (0.05%). swr: default --sparsity. basis: instead of --keep-bases, keep as many bases as fit beside the sparse entries.", rich_help_panel=_M)] = None,
    basis_lr: Annotated[float, typer.Option("--basis-lr", help="basis: AdamW learning rate of the scales in the scale phase (linear decay).", rich_help_panel=_M)] = 1e-3,
    basis_embeddings: Annotated[bool, typer.Option("--basis-embeddings/--no-basis-embeddings", help="basis: also rewrite the embedding tables (off: they stay the base's).", rich_help_panel=_M)] = False,
    double_prune: Annotated[bool, typer.Option("--double-prune/--no-double-prune", help="basis: add a sparse diff of --sparsity on top of the scales (giving --sparsity implies it).", rich_help_panel=_M)] = False,
    values: Annotated[Optional[str], typer.Option("--values", help="Quantization-aware fixed phase: train with δ as `pack --values` stores it (fp16, bf16, fp32, int8, int4, ternary; default: full precision). pack then uses it by default.", rich_help_panel=_M)] = None,
    activation_checkpointing: Annotated[int, typer.Option("--activation-checkpointing", help="Recompute the activations of every n-th layer in backward instead of keeping them: less memory, a slower step (1: every layer; 0: off).")] = 0,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda (default: cuda when present).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from <output>.partial/.")] = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Learn a diff: choose a mask (--method: the magnitude of a dense run by default), finetune its entries; keep the best dev epoch."""
    from diffcli.projection import parse_sparsity
    from diffcli.training import Reporter, TrainOptions, check_method_flags, train as run_train

    out = Output(json_, quiet)
    given = _given(ctx)
    check_method_flags(method, given)
    options = TrainOptions(
        method=method, sparsity=parse_sparsity(sparsity), epochs=epochs, fixmask_epochs=fixmask_epochs, batch_size=batch_size,
        eval_batch_size=eval_batch_size, max_seq_length=max_seq_length, seed=seed, lr=lr, alpha_lr=alpha_lr,
        fixmask_lr=fixmask_lr, fixmask_start=fixmask_start, fill=fill, fill_samples=fill_samples, head_lr=head_lr,
        weight_decay=weight_decay, l0_lambda=l0_lambda,
        log_alpha_init=log_alpha_init, gate_l=gate_l, gate_r=gate_r, beta=beta, structured=structured,
        controller=controller, controller_rate=controller_rate, controller_warmup=controller_warmup,
        grad_clip=grad_clip, rank=rank, keep_bases=keep_bases, budget=budget, basis_lr=basis_lr, basis_embeddings=basis_embeddings,
        double_prune=double_prune or (method == "basis" and "sparsity" in given),
        values=values, activation_checkpointing=activation_checkpointing)
    fields = [f.strip() for f in text_fields.split(",") if f.strip()] if text_fields is not None else None
    summary = run_train(task=task, data_dir=str(data_dir) if data_dir else None,
                        train_file=str(train_file) if train_file else None,
                        validation_file=str(validation_file) if validation_file else None, text_fields=fields,
                        label_field=label_field, regression=regression, model=model, max_train_samples=max_train_samples,
                        max_eval_samples=max_eval_samples, output=output, options=options, resume=resume,
                        force=force, device=device, task_type=task_type, reporter=Reporter(out.progress, out.info, out.warn))
    if summary:  # empty on ranks other than 0 under torchrun
        out.result(summary, lambda console: _render(console, summary))


def _given(ctx: typer.Context) -> list[str]:
    """The options typed on the command line (or set through the environment), not left at their default."""
    # by name: typer may ship its own copy of click, whose ParameterSource is another enum
    return [name for name in ctx.params
            if getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")]


def _render(console, s: dict) -> None:
    def metrics(block) -> str:
        if not block or "metrics" not in block:
            return "-"
        return " | ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                          for split, m in block["metrics"].items())

    l0 = s.get("after_l0") or {}
    console.print(f"task {s['task']} on {s['model']}, --method {s.get('method', 'l0')}, "
                  f"data: {s['data'].get('name', '-')}", markup=False)
    if l0:
        console.print(f"after L0 (deterministic gates, density {l0.get('deterministic_density', 0):.3%}): "
                      f"{metrics(l0)}", markup=False)
    if s.get("bases"):
        b = s["bases"]
        console.print(f"basis scaling: kept {b['kept']} of {b['total']} bases in {b['matrices']} matrices; best "
                      f"scales at fixed epoch {b.get('best', {}).get('epoch')}: {metrics(b.get('best'))}", markup=False)
    console.print(f"after projection: {metrics(s.get('after_projection'))}", markup=False)
    best = s.get("after_fixmask") or {}
    console.print(f"after fixed mask (best: epoch {best.get('epoch')}): {metrics(best)}", markup=False)
    console.print(f"density {s['density']:.4%}, nnz {s['nnz']} of {s['budget_numel']}, dense head "
                  f"{s['extras_numel']} values; checkpoint {s['output']}", markup=False)
