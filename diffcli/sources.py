"""Open whatever the user points at as a Diff: a checkpoint folder or a packed `.diff` file."""

from __future__ import annotations

import logging
from pathlib import Path

from diffcli import checkpoint
from diffcli.diff import Diff
from diffcli.errors import FormatError, NotFoundError

log = logging.getLogger(__name__)


def load_diff(path: str | Path, *, as_trained: bool = True) -> Diff:
    """A checkpoint folder (from train/prune) or a packed artifact (from pack), fully verified.

    A checkpoint trained for packed values (`train --values Q`, quantization-aware) reads, with `as_trained`, as its
    Q-packed file: the model its fixed phase evaluated, not the full-precision δ it keeps so that `pack` may choose.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"{path} does not exist")
    if path.is_dir():
        if not checkpoint.is_checkpoint(path):
            raise FormatError(f"{path} is a folder but not a diff checkpoint (no {checkpoint.META_FILE})",
                              hint="pass a folder written by train or prune, or a .diff file")
        diff = checkpoint.load(path)
        values = trained_values(diff) if as_trained else None
        if values is None:
            return diff
        from diffcli import artifact

        log.info("%s was trained for %s values (train --values): read as packed with them, the model it evaluated",
                 path, values)
        return artifact.loads(artifact.pack(diff, values))
    from diffcli import artifact

    return artifact.load(path)


def trained_values(diff: Diff) -> str | None:
    """The value format a diff's fixed phase was trained for (`train --values`), from its checkpoint meta."""
    from diffcli import quantize

    hp = (diff.meta or {}).get("hyperparameters") or {}
    if not isinstance(hp, dict):
        raise FormatError(f"the diff's meta.hyperparameters is a {type(hp).__name__}, not an object")
    values = hp.get("values")
    if values is not None and values not in quantize.QUANTIZERS:  # a corrupt record, not a flag the user passed
        raise FormatError(f"the diff's meta.hyperparameters.values {values!r} is no value format "
                          f"({', '.join(quantize.QUANTIZERS)})")
    return values
