"""`diffprune pack`: open a checkpoint folder or a packed file and write it in the packed format."""

from __future__ import annotations

from pathlib import Path

from diffcli import artifact, quantize
from diffcli.sources import load_diff


def pack_checkpoint(ckpt_path: str | Path, out: str | Path, values: str = "fp16", force: bool = False,
                    version: int = artifact.VERSION, block: int | None = None) -> artifact.PackReport:
    """Check the options and the destination first, then read the diff and write the packed file."""
    quantize.check_spec(values, block)
    artifact.check_destination(out, force)
    return artifact.write(load_diff(ckpt_path), out, values=values, force=force, version=version, block=block)
