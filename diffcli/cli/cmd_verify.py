"""`diffprune verify`: check a packed file's checksums, bounds and payload, and optionally its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcli.cli.output import JsonOpt, Output, QuietOpt


def verify(
    file: Annotated[Path, typer.Argument(help="A packed .diff file.")],
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="Also check it was made on this base "
                                                                     "(folder, alias or hub id).")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Exit 0 only if every checksum, bound and section holds (and the base matches, with --base)."""
    from diffcli.artifact import verify as run_verify

    out = Output(json_, quiet)
    report = run_verify(file, base=base)

    def render(console) -> None:
        console.print(f"{report.path}: OK ({report.bytes:,} bytes, format v{report.version}, "
                      f"written by {report.producer})", markup=False)
        for check in report.checks:
            console.print(f"  ok  {check}", markup=False)
        if report.base is None:
            console.print("  --  base not checked (pass --base to check it)", markup=False)

    out.result(report.to_dict(), render)
