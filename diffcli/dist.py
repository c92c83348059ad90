"""Process-group set-up for training: torchrun's rank and world, and the device each process uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffcli.errors import InvalidValueError

if TYPE_CHECKING:
    import torch


@dataclass
class Dist:
    """Process-group facts; world 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def check_device(device_hint: str | None) -> None:
    """Reject a --device that is not cpu/cuda, or cuda without a GPU, before any work."""
    import torch

    if device_hint is not None:
        try:
            kind = torch.device(device_hint).type
        except (RuntimeError, ValueError):
            raise InvalidValueError(f"unknown device {device_hint!r}; use cpu or cuda") from None
        if kind not in ("cpu", "cuda"):
            raise InvalidValueError(f"unsupported device {device_hint!r}; use cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            raise InvalidValueError("--device cuda was asked for but no CUDA GPU is visible")


def launched_world() -> int:
    """The number of processes torchrun started (1 without torchrun), known before the process group is joined."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_dist(device_hint: str | None) -> tuple[Dist, "torch.device"]:
    """Join the torchrun process group when launched by it (gloo on CPU, nccl on GPU); pick the device."""
    import torch

    world = launched_world()
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        gpus = torch.cuda.device_count() if use_cuda else 0
        if use_cuda and per_node > gpus:
            # checked by every rank before joining, so none waits forever for a rank that cannot start
            raise InvalidValueError(f"torchrun started {per_node} processes on this node but {gpus} CUDA GPU(s) are "
                                    f"visible; use --nproc_per_node {gpus} (one process per GPU), or --device cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        d = Dist(dist.get_rank(), dist.get_world_size(), local)
        if use_cuda:
            torch.cuda.set_device(local)
            return d, torch.device("cuda", local)
        return d, torch.device("cpu")
    return Dist(), torch.device(device_hint) if device_hint else torch.device("cuda" if use_cuda else "cpu")


def wrap_ddp(model, dist: Dist, device: "torch.device"):
    """The model wrapped in DistributedDataParallel when several processes train, else None."""
    if dist.world <= 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def autocast(device: "torch.device"):
    """The precision every training loop here runs under: bf16 autocast on a cuda GPU that has it, fp32 elsewhere."""
    from contextlib import nullcontext

    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
