"""`diffprune prune` as a library call: the magnitude projection, carrying a double-pruned checkpoint's basis scales.

`projection.prune` projects δ to k entries and writes the result. A `--method basis` checkpoint also holds basis
scales, which are not δ entries: here only its sparse δ is projected (k = round(S·N), as `--sparsity S` sets the
sparse part when training) and the scales are written unchanged beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def basis_records(source: str | Path) -> int:
    """How many basis-scale records a checkpoint folder's metadata lists (0 when it lists none or is unreadable)."""
    from diffcli.checkpoint import META_FILE

    try:
        meta = json.loads((Path(source) / META_FILE).read_text(encoding="utf-8"))
        return sum(1 for e in meta["tensors"].values() if isinstance(e, dict) and "basis" in e)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0  # not a readable checkpoint: projection.prune says what is wrong with it


def prune(source: str | Path, sparsity: float, out: str | Path, *, base: str | None = None,
          scope: str = "global", force: bool = False):
    """`diffprune prune`: `projection.prune`; a checkpoint with basis scales keeps them, only its δ is projected."""
    from diffcli import checkpoint
    from diffcli.projection import prune as project_and_save

    if base is None and checkpoint.is_checkpoint(source) and basis_records(source):
        return _prune_keeping_bases(source, sparsity, out, scope, force)
    return project_and_save(source, sparsity, out, base=base, scope=scope, force=force)


def _prune_keeping_bases(source: str | Path, sparsity: float, out: str | Path, scope: str, force: bool):
    """Project the sparse δ of a basis checkpoint to k entries and save it with its basis scales as they were."""
    from dataclasses import replace

    from diffcli import checkpoint
    from diffcli.outputs import check_output
    from diffcli.projection import project

    check_output(Path(out), force)
    diff = checkpoint.load(source)
    result = project(diff, sparsity, scope)
    result.diff = replace(result.diff, bases=dict(diff.bases))
    checkpoint.save(result.diff, out, force=force)
    return result


def prune_report(result) -> dict[str, Any]:
    """What `prune` prints: the allocation of the k entries, plus the basis scales carried across (when any)."""
    from diffcli.report import allocation_report

    report = allocation_report(result)
    bases = result.diff.bases
    if bases:
        report["basis_scales"] = {"matrices": len(bases), "kept": sum(bs.nkept for bs in bases.values()),
                                  "rank": sum(bs.rank for bs in bases.values())}
    return report


def render_prune(console, report: dict[str, Any]) -> None:
    """`render_allocation`, and one line for the basis scales kept unchanged."""
    from diffcli.report import render_allocation

    render_allocation(console, report)
    b = report.get("basis_scales")
    if b:
        console.print(f"basis scales kept unchanged (outside k): {b['kept']:,} of {b['rank']:,} bases on "
                      f"{b['matrices']} matrices")
