"""Where this process runs: rank, world size and device from torchrun's environment, read once.

The same `ldm-train` command runs alone or under `torchrun --nproc_per_node N`: WORLD_SIZE / RANK /
LOCAL_RANK select DDP over NCCL (gloo on CPU). `LDM_TRAIN_DEVICE=cpu` keeps a CUDA machine on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()


_ENV: DistEnv | None = None


def dist_env() -> DistEnv:
    """Read torchrun's env vars once; initialise the process group (NCCL on GPU, gloo on CPU)."""
    global _ENV
    if _ENV is not None:
        return _ENV
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and os.environ.get("LDM_TRAIN_DEVICE", "") != "cpu":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _ENV = DistEnv(rank, world, local, device)
    return _ENV
