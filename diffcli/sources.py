"""Open whatever the user points at as a Diff: a checkpoint folder or a packed `.diff` file."""

from __future__ import annotations

from pathlib import Path

from diffcli import checkpoint
from diffcli.diff import Diff
from diffcli.errors import FormatError, NotFoundError


def load_diff(path: str | Path) -> Diff:
    """A checkpoint folder (from train/prune) or a packed artifact (from pack), fully verified."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if path.is_dir():
        if not checkpoint.is_checkpoint(path):
            raise FormatError(f"{path} is a folder but not a diff checkpoint (no {checkpoint.META_FILE})",
                              hint="pass a folder written by train or prune, or a .diff file")
        return checkpoint.load(path)
    from diffcli import artifact

    return artifact.load(path)
