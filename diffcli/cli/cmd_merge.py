"""`diffprune merge`: combine diffs made on one base (weighted sum or TIES) into one sparse diff."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt


def merge(
    files: Annotated[list[Path], typer.Argument(help="Two or more .diff files or diff checkpoint folders.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Merged diff: OUT.diff is packed, any other path becomes a checkpoint folder.")],
    weights: Annotated[Optional[list[str]], typer.Option(
        "--weights", "-w", help="One weight per input, comma-separated (0.5,0.5) or repeated; default 1 each.")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="sum (task arithmetic) or ties (sign election, "
                                        "disjoint mean).")] = "sum",
    extras: Annotated[str, typer.Option("--extras", help="Heads: first (take the first input's head and config) or "
                                        "mean (average; all heads must have equal shapes).")] = "first",
    density: Annotated[Optional[float], typer.Option("--density", help="Trim each input to this fraction of its own "
                                                     "largest entries before merging (TIES trim), e.g. 0.2.")] = None,
    values: Annotated[Optional[str], typer.Option("--values", help="Value format of a packed OUT.diff: fp16 "
                                                  "(default), bf16, fp32 (exact), int8, int4 or ternary (as "
                                                  "pack).")] = None,
    base: Annotated[Optional[str], typer.Option(
        "--base", "-b", help="Base the diffs were made on (folder, alias or hub id), checked against every input: "
                             "needed to merge basis scales, which are rebuilt on it (probe-checked) into a dense "
                             "δ.")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Merge diffs without densifying sparse δ and report their overlap (shared positions, sign conflicts)."""
    from diffcli.merging import merge_files, parse_weights, render_merge

    out = Output(json_, quiet)
    report = merge_files(files, output, weights=parse_weights(weights, len(files)), method=method, extras=extras,
                         density=density, values=values, force=force, base=base)
    out.result(report, lambda console: render_merge(console, report))
    out.info(f"wrote {output}")
