"""Data parallelism over `torch.distributed`: shard examples, all-reduce sums, gather rows.

Nothing here starts processes: run your script under `torchrun --nproc_per_node N` (or
initialise a process group yourself) and gimlens's batch functions split their examples across
ranks, all-reduce score sums and counts, and return the same result on every rank. Without an
initialised process group every function is the single-process identity.

Shards are contiguous, so gathered rows come back in the original order, and a result equals the
single-process one up to float summation order.

Examples:
    >>> shard_range(10)  # a single process owns every example
    range(0, 10)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world", "is_main_process", "shard_range", "all_reduce_sum", "all_gather_rows", "barrier",
           "init_from_env"]


def world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group that `torchrun` describes (`WORLD_SIZE` > 1 in the
    environment) unless one is already initialised: NCCL where CUDA is available, else gloo.
    Returns whether more than one process takes part."""
    import os

    if not (dist.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return world()[1] > 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return world()[1] > 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return world()[0] == 0


def shard_range(n: int) -> range:
    """The contiguous block of `range(n)` this rank owns (sizes differ by at most one)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _comm_device(tensor: Tensor) -> torch.device:
    """NCCL moves only CUDA tensors: stage CPU tensors on this rank's GPU."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum `tensor` over ranks in place (and return it); identity in a single process."""
    if world()[1] > 1:
        staged = tensor.to(_comm_device(tensor))
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not tensor:
            tensor.copy_(staged)
    return tensor


def all_gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every rank's `rows` along dim 0, in rank order (shards may differ in size)."""
    rank, size = world()
    if size == 1:
        return rows
    counts = torch.zeros(size, dtype=torch.long, device=rows.device)
    counts[rank] = rows.shape[0]
    all_reduce_sum(counts)
    biggest = int(counts.max())
    padded = rows.new_zeros((biggest, *rows.shape[1:]), device=_comm_device(rows))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)], dim=0).to(rows.device)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()
