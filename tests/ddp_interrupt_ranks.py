"""`diffprune train` under torchrun, stopped on every rank after a given epoch as a Ctrl-C would stop it.

Usage: torchrun ... tests/ddp_interrupt_ranks.py PHASE:EPOCH train ARGS...  After epoch EPOCH of phase PHASE is
saved, every rank raises KeyboardInterrupt (the CLI exits 130), leaving `<output>.partial/` for `train --resume`.
tests/test_ddp_resume.py runs it.
"""

from __future__ import annotations

import sys

from diffcli import trainloop
from diffcli.cli.app import run

phase, epoch = sys.argv.pop(1).split(":")
epoch_done = trainloop.Run.epoch_done


def stopping_epoch_done(self, phase_now: str, epoch_now: int) -> None:
    epoch_done(self, phase_now, epoch_now)
    if (phase_now, epoch_now) == (phase, int(epoch)):
        raise KeyboardInterrupt


trainloop.Run.epoch_done = stopping_epoch_done
sys.exit(run())
