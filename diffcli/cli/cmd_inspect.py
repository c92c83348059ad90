"""`diffprune inspect`: per-layer sparsity report of a checkpoint or packed file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffcli.cli.output import JsonOpt, Output, QuietOpt


def inspect(
    path: Annotated[Path, typer.Argument(help="A packed .diff file or a diff checkpoint folder.")],
    tensors: Annotated[bool, typer.Option("--tensors", "-t", help="Also list every tensor.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Report shapes, nnz, density and bytes per tensor and per layer, totals and header metadata."""
    from diffcli.report import inspect as run_inspect, render_report

    out = Output(json_, quiet)
    report = run_inspect(path)
    out.result(report, lambda console: render_report(console, report, per_tensor=tensors))
