"""torch.distributed set-up for training under ``torchrun`` (env RANK / WORLD_SIZE / LOCAL_RANK).

One process per GPU with NCCL, or processes on the CPU with gloo (tests). Without those
variables (or with WORLD_SIZE=1) training runs as a single process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.training.loader import StreamingLoader, epoch_order

if TYPE_CHECKING:
    import torch

__all__ = ["DistContext", "GlobalBatchLoader", "setup_distributed"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (a no-op for one process); returns it."""
        if self.distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if :func:`setup_distributed` created it."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError as err:
        raise ConfigError(f"environment {name}={value!r}, expected an integer") from err


def setup_distributed(device: str) -> DistContext:
    """Join the torchrun job described by the environment (if any) and pick this rank's device.

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` (NCCL); "cpu" uses gloo.
    """
    import torch

    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested, but torch {torch.__version__} sees no CUDA GPU")
        dev = torch.device("cuda", local_rank) if world > 1 or device == "cuda" else torch.device(device)
        torch.cuda.set_device(dev)
    elif device == "cpu":
        dev = torch.device("cpu")
    else:
        raise ConfigError(f"device {device!r} unknown, expected 'cpu', 'cuda' or 'cuda:N'")
    if world <= 1:
        return DistContext(0, 1, 0, dev)
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


class GlobalBatchLoader(StreamingLoader):
    """Shards each *global* batch between the ranks (rank r takes the r-th slice of the sorted
    global batch), so the ranks' slices in rank order are the single-process batch of that step;
    ``skip`` drops the first batches (resume)."""

    skip = 0

    def batch_indices(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch after the first ``skip``, each sorted."""
        c, b = self.config, self.config.batch_size
        order = epoch_order(self.indices, c.chunk, c.seed, self.epoch, c.shuffle)
        order = order[:self.per_rank * self.world_size]
        step = b * self.world_size
        glob = [np.sort(order[s:s + step]) for s in range(step * self.skip, order.size, step)]
        return [g[self.rank * b:(self.rank + 1) * b] for g in glob]
