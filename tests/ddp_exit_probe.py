"""`diffprune` under torchrun, recording whether each rank still held its process group when Python began to exit.

Usage: torchrun ... tests/ddp_exit_probe.py RECORD_DIR ARGS...  Registered before diffprune runs, the probe's exit
handler runs after any diffprune registers (last in, first out) and writes RECORD_DIR/rank-N.json.
tests/test_ddp.py runs it: a group left joined at exit lets gloo's threads abort the rank (SIGABRT) now and then; the
record also shows that `diffprune`'s own exit path (os._exit after the handlers) still runs every handler.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from diffcli.cli.app import main

record_dir = Path(sys.argv.pop(1))


def _record() -> None:
    path = record_dir / f"rank-{os.environ['RANK']}.json"
    path.write_text(json.dumps({"joined_at_exit": dist.is_initialized()}), encoding="utf-8")


atexit.register(_record)
main()  # as `diffprune` does: under torchrun the exit handlers run, then os._exit
