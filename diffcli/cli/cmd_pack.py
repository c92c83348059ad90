"""`diffprune pack`: write a diff checkpoint (or re-pack a .diff) as one compact, checksummed file."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from diffcli.cli.output import ForceOpt, JsonOpt, Output, QuietOpt


def pack(
    checkpoint: Annotated[str, typer.Argument(help="A diff checkpoint folder (from train/prune) or a .diff file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Output .diff file; '-' writes it to stdout.")],
    values: Annotated[Optional[str], typer.Option("--values", help="Value format: fp16, bf16, fp32 (exact), int8, int4 "
                                                         "or ternary (block absmax / ternary scales). Default: the "
                                                         "one `train --values` trained with, else fp16.")] = None,
    block: Annotated[Optional[int], typer.Option("--block", help="Values per scale for int8/int4/ternary "
                                                                 "(default 256, 64, 256).")] = None,
    format_version: Annotated[int, typer.Option("--format-version", help="2 (default), or 1 for readers "
                                                                         "older than format v2 (fp16/bf16/fp32).")] = 2,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pack a diff: Rice-coded positions, quantized values and zstd, every stream checksummed."""
    from diffcli.errors import InvalidValueError
    from diffcli.packing import pack_checkpoint

    to_stdout = output == "-"
    if to_stdout and json_:
        raise InvalidValueError("--json needs stdout, so it cannot be used with -o -")
    out = Output(json_, quiet)
    report = pack_checkpoint(checkpoint, output, values=values, force=force, version=format_version, block=block)
    data = {"output": report.path, **report.to_dict()}  # `path` too: the same file, its name before `output`
    where = "stdout" if to_stdout else report.path
    quant = report.values + (f" (blocks of {report.block})" if report.block else "")
    kind = "cast" if report.block is None else "quantization"
    rel = f", max rel error {report.max_rel_error:.3g}" if report.max_rel_error is not None else ""
    lines = [f"wrote {where}: {report.bytes:,} bytes (format v{report.version}), {report.ratio:,.1f}x smaller than "
             f"the dense fp32 diff ({report.dense_fp32_bytes:,} bytes)",
             f"{report.nnz:,} entries in {report.tensors} tensors ({report.density:.3%} of {report.budget_numel:,}), "
             f"{report.extras} extras; values {quant}, max abs {kind} error {report.max_abs_error:.3g}{rel}",
             f"bytes: header {report.header_bytes:,}, positions {report.index_bytes:,}, values "
             f"{report.values_bytes:,}, dense {report.extras_bytes:,}"]
    if to_stdout:  # stdout carries the file: everything human goes to stderr
        for line in lines:
            out.info(line)
        return
    out.result(data, lambda console: [console.print(line, markup=False) for line in lines])
