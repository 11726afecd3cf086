"""Where the trainer runs: one process, or one of torchrun's DDP ranks (gloo on CPU, nccl on
CUDA), and what the ranks must agree on."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from app.training.config import TrainConfig


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Single process, or DDP under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and world > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return Runtime(rank=rank, world=world, local_rank=local_rank, device=device)


def finish_runtime(rt: Runtime) -> None:
    """Under DDP: wait for every rank (rank 0 writes the model directory), then leave the group."""
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def sync_bn_statistics(model: nn.Module, world: int) -> None:
    """Average BN running statistics over ranks. DDP keeps parameters identical, but each rank
    updates its running stats from its own shard in every forward; without this the ranks would
    evaluate (and so decide convergence) on different networks."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for buf in (m.running_mean, m.running_var):
                if buf is not None:
                    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                    buf.div_(world)


def state_digest(model: nn.Module) -> str:
    """A hash of the exact weights and buffers: equal across ranks when DDP kept them in sync."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rank_digests(model: nn.Module, rt: Runtime) -> list[str]:
    """Every rank's ``state_digest``, in rank order (the card records them: all equal)."""
    digest = state_digest(model)
    if rt.world == 1:
        return [digest]
    gathered: list[Any] = [None] * rt.world
    dist.all_gather_object(gathered, digest)
    return [str(d) for d in gathered]
