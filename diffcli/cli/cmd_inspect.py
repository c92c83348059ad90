"""`diffprune inspect`: per-layer sparsity report of checkpoints or packed files, optionally as a heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt


def inspect(
    paths: Annotated[list[Path], typer.Argument(help="Packed .diff files or diff checkpoint folders.")],
    tensors: Annotated[bool, typer.Option("--tensors", "-t", help="Also list every tensor.")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw a heatmap (layer × tensor kind, one "
                                                 "panel per diff) to this .png or .svg file.")] = None,
    plot_by: Annotated[Optional[str], typer.Option("--plot-by", help="Colour the heatmap by density (nnz/numel, "
                                                   "default) or bytes.")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Report shapes, nnz, density and bytes per tensor and per layer, totals and header metadata.

    With several inputs, --json prints one JSON array of their reports (one input: the report itself).
    """
    from diffcli.errors import InvalidValueError
    from diffcli.plot import inspect_and_plot
    from diffcli.report import inspect as run_inspect, render_report

    out = Output(json_, quiet)
    if plot is None:
        if plot_by is not None or force:
            raise InvalidValueError("--plot-by and --force only apply with --plot", hint="add --plot OUT.png")
        reports = [run_inspect(p) for p in paths]
    else:
        reports = inspect_and_plot(paths, plot, by=plot_by or "density", force=force)

    def render(console) -> None:
        for i, report in enumerate(reports):
            if i:
                console.print()
            render_report(console, report, per_tensor=tensors)

    out.result(reports[0] if len(reports) == 1 else reports, render)
    if plot is not None:
        out.info(f"wrote {plot}")
