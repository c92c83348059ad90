"""`diffprune pack`: open a checkpoint folder or a packed file and write it in the packed format."""

from __future__ import annotations

import logging
from pathlib import Path

from diffcli import artifact, quantize
from diffcli.sources import load_diff, trained_values

log = logging.getLogger(__name__)


def pack_checkpoint(ckpt_path: str | Path, out: str | Path, values: str | None = None, force: bool = False,
                    version: int = artifact.VERSION, block: int | None = None) -> artifact.PackReport:
    """Check the options and the destination first, then read the diff and write the packed file.

    `values` None: the value format the diff was trained for (`train --values`, quantization-aware), else fp16. A
    format or block other than the trained one is packed as asked, with a warning: that model was never evaluated.
    """
    if values is not None:
        quantize.check_spec(values, block)
    artifact.check_destination(out, force)  # a folder too, before the checkpoint is read
    diff = load_diff(ckpt_path, as_trained=False)  # the full-precision δ: the trained format is one choice of many
    trained = trained_values(diff)
    if values is None:
        values = trained or "fp16"
        quantize.check_spec(values, block)
    if trained is not None and (values != trained or block not in (None, quantize.DEFAULT_BLOCK.get(values))):
        asked = values + (f" in blocks of {block}" if block is not None else "")
        log.warning("%s was trained for %s values (train --values, default blocks); packed as %s, it rebuilds a "
                    "model its training never evaluated: check it with diffprune eval", ckpt_path, trained, asked)
    return artifact.write(diff, out, values=values, force=force, version=version, block=block)
