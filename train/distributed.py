"""This process's place in a run: torchrun's environment, the process group and the device.

`setup_distributed` joins torchrun's process group (gloo on CPU, nccl on CUDA) when launched
with several processes, picks the device, and on CPU leaves cores to the loader workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.config import TrainConfig


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank, world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def device_ids(self) -> list[int] | None:
        """What DistributedDataParallel wants: the CUDA device index, None on CPU."""
        return [self.device.index] if self.device.type == "cuda" else None


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA), pick the device and set
    deterministic algorithms when asked."""
    if cfg.deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls; must be set before CUDA init.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        # On CPU the loader workers need cores too: more compute threads than free cores make
        # every parallel region wait for a descheduled thread (measured: 8x slower on 2 cores).
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        free = (os.cpu_count() or 1) // max(1, local_world) - cfg.data.num_workers
        torch.set_num_threads(max(1, min(torch.get_num_threads(), free)))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)
