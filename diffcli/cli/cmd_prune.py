"""`diffprune prune`: magnitude projection of a diff (or of a full finetune against its base)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt


def prune(
    source: Annotated[str, typer.Argument(help="A diff checkpoint folder, or a full finetuned model folder (with --base).")],
    sparsity: Annotated[str, typer.Option("--sparsity", "-s", help="Fraction of entries kept: 0.5% or 0.005.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output checkpoint folder.")],
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="Base model (folder, alias or hub id) when SOURCE is a full finetune.")] = None,
    scope: Annotated[str, typer.Option("--scope", help="Top-k over all tensors (global) or within each tensor (per-tensor).")] = "global",
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Keep exactly round(S·N) largest-magnitude diff entries and write a sparse checkpoint."""
    from diffcli.projection import parse_sparsity, prune as run_prune
    from diffcli.pruning import prune_report, render_prune

    out = Output(json_, quiet)
    result = run_prune(source, parse_sparsity(sparsity), output, base=base, scope=scope, force=force)
    report = {"output": str(output), **prune_report(result)}
    out.result(report, lambda console: render_prune(console, report))
    out.info(f"wrote {output}")
