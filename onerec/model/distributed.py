"""Data-parallel training under torchrun: one process per GPU (or CPU), gradients all-reduced by
DistributedDataParallel. On a cluster this is the PyTorchJob of infra/pipelines; locally, without
torchrun, there is no group and training is a single process.

    group = from_env()              # None unless WORLD_SIZE > 1 (torchrun sets it)
    idx = group.shard(idx)          # this rank's share of a global batch (B,) -> (~B / world,)
    stop = group.agree(stop)        # rank 0's decision, on every rank

The global batch, the step count and the LR schedule are those of a single-process run: each
step, every rank takes every world-th example of the same global batch, and DDP averages the
gradients. With equal shards and no dropout or MoE (whose balance loss is not a mean over
examples) the steps equal a single process's up to float rounding; tests check that.
Only rank 0 validates, checkpoints, logs to MLflow and writes files; its decisions to stop
(early stop, time budget) are broadcast so every rank leaves the loop at the same step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """Every world-th example from this rank's offset; a batch smaller than the world (an
        epoch's last) gives a rank without examples its first one, as every rank must step."""
        mine = idx[self.rank::self.world]
        return mine if len(mine) else idx[:1]

    def agree(self, code: int) -> int:
        """Rank 0's `code` on every rank (one tiny broadcast)."""
        flag = torch.tensor([code], dtype=torch.int64,
                            device=self.device() if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over `model` (already on this rank's device). Unused parameters are expected: MoE
        experts a batch does not route to, a head a step does not reach."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def from_env() -> Group | None:
    """The torchrun group (initialised here on first use: NCCL with CUDA, else gloo), or None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Group(dist.get_rank(), dist.get_world_size(), local)
