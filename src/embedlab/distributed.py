"""Collectives for cross-device negatives, GradCache under DDP and distributed evaluation.

Every function is the identity (or a no-op) in a single process, so losses and the module call them
unconditionally. All of them are collectives: under DDP every rank must call them in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(*sizes: int, device: torch.device | str = "cpu") -> list[list[int]]:
    """Every rank's ``sizes`` (one small all_gather): ``result[r]`` is rank r's tuple as a list."""
    local = torch.tensor(list(sizes), dtype=torch.long, device=device)
    if world_size() == 1:
        return [local.tolist()]
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather of equal-shape tensors; backward: every rank's gradient for this rank's slice, summed."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)  # (world, n, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce_scatter: sum everything, keep this rank's slice
        return grad[rank()]


def all_gather_with_grad(tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """(n_r, ...) on rank r -> (sum_r n_r, ...) concatenated in rank order, gradients flowing back.

    Ranks may hold different numbers of rows (an uneven last batch, a rank without hard negatives):
    rows are padded to the largest count for the collective and cut back afterwards. ``sizes`` (every
    rank's row count, from :func:`gather_sizes`) saves one collective when the caller already has it.

    In backward, rank r's slice receives the sum over ranks of d(rank's loss)/d(slice). With DDP
    averaging parameter gradients over ranks, every parameter gets the gradient of the mean of the
    per-rank losses, which is the global-batch loss when local batches have equal size (see
    ``MultipleNegativesRankingLoss``).
    """
    if world_size() == 1:
        return tensor
    if sizes is None:
        sizes = [s[0] for s in gather_sizes(tensor.shape[0], device=tensor.device)]
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    local = tensor
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    parts = _GatherWithGrad.apply(local)  # (world, longest, ...)
    return torch.cat([parts[r, :n] for r, n in enumerate(sizes)], dim=0)


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`all_gather_with_grad` without autograd (evaluation outputs); rows may differ per rank."""
    if world_size() == 1:
        return tensor
    sizes = [s[0] for s in gather_sizes(tensor.shape[0], device=tensor.device)]
    longest = max(sizes)
    local = tensor.contiguous()
    if local.shape[0] < longest:
        local = torch.cat([local, local.new_zeros((longest - local.shape[0], *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)], dim=0)


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (one ``all_gather_object``)."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def all_reduce_mean_gradients(parameters: Iterable[torch.nn.Parameter], bucket_numel: int = 25_000_000) -> None:
    """Average ``.grad`` over ranks in place, the way DDP's reducer does after a synchronized backward.

    For GradCache: its per-chunk backward passes run inside ``no_sync()`` and this one call replaces the
    all-reduce DDP would have done. As in DDP, a parameter without a gradient on every rank keeps
    ``grad=None``; one with a gradient on some ranks only counts zeros on the others. Gradients are
    flattened into buckets of at most ``bucket_numel`` elements (one all_reduce each).
    """
    params = [p for p in parameters if p.requires_grad]
    world = world_size()
    if world == 1 or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad)
    grads = []
    for p, used in zip(params, has_grad.tolist()):
        if used == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    numel = 0
    for g in grads + [None]:
        if g is not None and (not bucket or (numel + g.numel() <= bucket_numel and g.dtype == bucket[0].dtype)):
            bucket.append(g)
            numel += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, numel = ([g], g.numel()) if g is not None else ([], 0)
