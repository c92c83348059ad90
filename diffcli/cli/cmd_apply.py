"""`diffprune apply`: rebuild the finetuned model from a base and a diff as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from diffcli.cli.output import JsonOpt, Output, QuietOpt


def apply(
    base: Annotated[str, typer.Argument(help="Base model the diff was made on: folder, alias or hub id.")],
    file: Annotated[Path, typer.Argument(help="A packed .diff file or a diff checkpoint folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output Hugging Face model folder.")],
    max_shard_size: Annotated[str, typer.Option("--max-shard-size",
                                                help="Largest weight shard written, e.g. 2GB, 500MB, 1GiB.")] = "2GB",
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype: auto (the base's), float32, float16 "
                                                       "or bfloat16.")] = "auto",
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output, and apply even "
                                                             "if the base's content differs from the diff's.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write base + diff as a model folder that from_pretrained loads (config, weights, tokenizer)."""
    from diffcli.applying import apply_to_folder

    out = Output(json_, quiet)
    with out.progress("applying", total=None) as bar:
        report = apply_to_folder(base, file, output, force=force, max_shard_size=max_shard_size,
                                 dtype=dtype, on_tensor=lambda name: bar.advance(1, name))
    for warning in report.warnings:
        out.warn(warning)
    data = {"output": str(report.out), **report.to_dict()}  # `out` too: the same folder, its name before `output`

    def render(console) -> None:
        shards = f"{report.shards} shard{'s' if report.shards != 1 else ''}"
        console.print(f"wrote {report.out}: {report.tensors} tensors, {shards}, "
                      f"{report.bytes / 1e6:.1f} MB ({data['dtype']})", markup=False)
        if report.basis_probe_error is not None:
            console.print(f"basis records rebuilt from the base's SVD; largest relative probe error "
                          f"{report.basis_probe_error:.2g}", markup=False)

    out.result(data, render)
