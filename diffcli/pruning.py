"""What `diffprune prune` reports: the allocation of the k entries, and the basis scales `projection.project` carries.

A `--method basis` checkpoint also holds basis scales, which are not δ entries: the projection keeps k = round(S·N)
entries of its sparse δ (as `--sparsity S` sets the sparse part when training) and carries the scales unchanged.
"""

from __future__ import annotations

from typing import Any


def prune_report(result) -> dict[str, Any]:
    """What `prune` prints: the allocation of the k entries, plus the basis scales carried across (when any)."""
    from diffcli.report import allocation_report

    report = allocation_report(result)
    # `tensor`, as inspect's rows say; `name` stays for the scripts that read it
    report["tensors"] = [{"tensor": row["name"], **row} for row in report["tensors"]]
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
