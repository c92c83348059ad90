"""`diffprune prune` as a library call: refuse what the magnitude projection cannot carry, then project and save.

`projection.prune` projects δ to k entries and writes the result; basis scales (`--method basis`) are not δ entries
and would not survive it, so a checkpoint holding them is refused here, from its metadata, before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcli.errors import InvalidValueError


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
    """`diffprune prune`: `projection.prune`, after refusing a checkpoint with basis scales (exit 2, nothing written)."""
    from diffcli import checkpoint
    from diffcli.projection import prune as project_and_save

    if base is None and checkpoint.is_checkpoint(source):
        n = basis_records(source)
        if n:
            raise InvalidValueError(
                f"{source} holds basis scales ({n} matrices, --method basis), which prune would drop: it projects "
                "the sparse δ only",
                hint="choose the sparse part's size when training (--method basis --sparsity S), or apply the diff "
                     "and prune the merged model with --base")
    return project_and_save(source, sparsity, out, base=base, scope=scope, force=force)
