"""The entailment set that ships with diffprune (CC0-1.0): `--task rte`'s last resort offline, so the demo always runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "data" / "example-glue"  # GLUE layout: RTE/train.tsv, RTE/dev.tsv
TASKS = ("rte",)
LICENCE = "CC0-1.0"


def covers(task: str) -> bool:
    """Whether the bundled set can stand in for this GLUE task."""
    return task in TASKS


def source(reason: str) -> dict[str, str]:
    """How `train`/`eval` name the bundled set in their output and in the checkpoint."""
    return {"kind": "example", "path": str(ROOT), "licence": LICENCE,
            "name": f"the example set bundled with diffprune ({ROOT}, {LICENCE}; not GLUE)",
            "why": reason}
