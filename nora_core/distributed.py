"""torch.distributed plumbing for the trainer: process group, device, and a summing all-reduce.

Under ``torchrun`` (``WORLD_SIZE > 1``) or an already initialised process group the trainer runs
DistributedDataParallel (gloo on CPU, nccl on GPU); otherwise everything here is a no-op for a
single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DistContext", "setup_distributed", "resolve_device", "all_reduce_sum"]


@dataclass
class DistContext:
    """This process's place in the run: ``rank`` of ``world`` processes, its ``local_rank``, and whether
    :func:`setup_distributed` created the process group (and so must destroy it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes."""
        return self.rank == 0


def setup_distributed(device_pref: str) -> DistContext:
    """Join (or create, under ``torchrun``) the process group; a single process gets ``DistContext()``.

    Args:
        device_pref: ``TrainConfig.device``; picks nccl for CUDA, gloo otherwise.

    Returns:
        The :class:`DistContext` of this process.
    """
    import torch.distributed as dist

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_available() or (env_world <= 1 and not dist.is_initialized()):
        return DistContext()
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_pref != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        created = True
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), created)


def resolve_device(pref: str, ctx: DistContext) -> torch.device:
    """The device to train on: ``pref`` with ``"auto"`` resolved, and a CUDA index (``LOCAL_RANK`` under DDP)."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {pref!r}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {pref!r}: MPS is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank if ctx.world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``values`` in place across processes (a no-op for one process); returns ``values``."""
    if ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
