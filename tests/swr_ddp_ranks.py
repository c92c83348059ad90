"""`diffprune train --method swr` under torchrun, recording whether every rank holds the same state.

Usage: torchrun ... tests/swr_ddp_ranks.py RECORD.json train ARGS...  After the unit choice and after the fixed
phase, every rank's factors, gate log α, chosen units and head are gathered; rank 0 writes to RECORD.json whether
they are equal bit for bit, and every rank's mean loss of the last fixed epoch (different data, so different
losses: equal tensors then mean the gradients were averaged). tests/test_ddp.py runs it.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from diffcli.cli.app import run
from diffcli.methods import swr

record_path = sys.argv.pop(1)
record: dict = {}
fixed_phase = swr.fixed_phase


def _gather_same(tag: str, tensors: list[torch.Tensor], chosen: list[int]) -> None:
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, ([t.detach().cpu() for t in tensors], chosen))
    first_t, first_c = got[0]
    record[tag] = {"tensors": len(first_t), "chosen": first_c,
                   "same": all(c == first_c and len(ts) == len(first_t) and all(torch.equal(a, b) for a, b in
                                                                               zip(ts, first_t)) for ts, c in got)}


def _state(tr: swr.SWRTrainer) -> list[torch.Tensor]:
    return [*[t for f in tr.factors for t in f], tr.log_alpha, *tr.head]


def checked_fixed_phase(run_, pruner, done):
    tr = pruner.phase
    _gather_same("after_choice", _state(tr), tr.chosen)
    best = fixed_phase(run_, pruner, done)
    _gather_same("after_fixed", _state(tr), tr.chosen)
    losses: list = [None] * dist.get_world_size()
    dist.all_gather_object(losses, run_.history[-1]["loss"])
    record["fixed_losses"] = losses
    return best


swr.fixed_phase = checked_fixed_phase
try:
    code = run()
finally:
    if dist.is_initialized() and dist.get_rank() == 0:
        with open(record_path, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
sys.exit(code)
