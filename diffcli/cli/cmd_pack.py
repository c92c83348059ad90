"""`diffprune pack`: write a diff checkpoint (or re-pack a .diff) as one compact, checksummed file."""

from __future__ import annotations

from typing import Annotated

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt


def pack(
    checkpoint: Annotated[str, typer.Argument(help="A diff checkpoint folder (from train/prune) or a .diff file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .diff file; '-' writes it to stdout.")],
    values: Annotated[str, typer.Option("--values", help="Value precision: fp16, bf16 or fp32 (exact).")] = "fp16",
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pack a diff: Rice-coded positions and byte-plane zstd values, every section checksummed."""
    from diffcli.artifact import pack_checkpoint
    from diffcli.errors import InvalidValueError

    to_stdout = output == "-"
    if to_stdout and json_:
        raise InvalidValueError("--json needs stdout, so it cannot be used with -o -")
    out = Output(json_, quiet)
    report = pack_checkpoint(checkpoint, output, values=values, force=force)
    data = report.to_dict()
    where = "stdout" if to_stdout else report.path
    lines = [f"wrote {where}: {report.bytes:,} bytes, {report.ratio:,.1f}x smaller than the dense fp32 diff "
             f"({report.dense_fp32_bytes:,} bytes)",
             f"{report.nnz:,} entries in {report.tensors} tensors ({report.density:.3%} of {report.budget_numel:,}), "
             f"{report.extras} extras; values {report.values}, max abs cast error {report.max_abs_error:.3g}"]
    if to_stdout:  # stdout carries the file: everything human goes to stderr
        for line in lines:
            out.info(line)
        return
    out.result(data, lambda console: [console.print(line, markup=False) for line in lines])
