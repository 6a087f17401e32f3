"""Collectives for cross-device negatives; each is the identity in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, gradients flowing back to every rank's slice.

    ``torch.distributed.nn.functional.all_gather`` sums the incoming gradients across ranks in backward,
    so with DDP (which averages gradients over ranks) every parameter gets the gradient of the global-batch
    loss averaged over ranks: the same as one process computing the mean of the per-rank losses.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def all_gather_object_list(items: list) -> list:
    """Concatenate a picklable list from every rank, in rank order."""
    if not is_distributed() or world_size() == 1:
        return list(items)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]
