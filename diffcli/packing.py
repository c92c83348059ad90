"""`diffprune pack`: open a checkpoint folder or a packed file and write it in the packed format."""

from __future__ import annotations

from pathlib import Path

from diffcli import artifact, quantize
from diffcli.sources import load_diff


def pack_checkpoint(ckpt_path: str | Path, out: str | Path, values: str | None = None, force: bool = False,
                    version: int = artifact.VERSION, block: int | None = None) -> artifact.PackReport:
    """Check the options and the destination first, then read the diff and write the packed file.

    `values` None: the value format the diff was trained for (`train --values`, quantization-aware), else fp16."""
    if values is not None:
        quantize.check_spec(values, block)
    artifact.check_destination(out, force)
    diff = load_diff(ckpt_path)
    if values is None:
        values = trained_values(diff) or "fp16"
        quantize.check_spec(values, block)
    return artifact.write(diff, out, values=values, force=force, version=version, block=block)


def trained_values(diff) -> str | None:
    """The value format a diff's fixed phase was trained for (`train --values`), from its checkpoint meta."""
    hp = (diff.meta or {}).get("hyperparameters") or {}
    return hp.get("values")
