"""All-gather that carries gradients back to each feature's owner.

Forward concatenates every rank's [n, D] block into [W*n, D]. Backward sums the incoming
gradient over ranks (every rank's loss may depend on every block) and returns the caller's
own slice, so each rank's encoder sees the exact gradient of the global loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _sum_own_slice_nccl(grad: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    out = torch.empty(grad.shape[0] // world, *grad.shape[1:], dtype=grad.dtype, device=grad.device)
    dist.reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=group)
    return out


def _sum_own_slice_allreduce(grad: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=group)
    rank = dist.get_rank(group)
    n = grad.shape[0] // world
    return grad[rank * n : (rank + 1) * n]


# Backward reduction per backend: NCCL has reduce-scatter; gloo does not.
_GRAD_REDUCERS = {"nccl": _sum_own_slice_nccl, "gloo": _sum_own_slice_allreduce}


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        world = dist.get_world_size(group)
        ctx.group, ctx.world = group, world
        out = torch.empty(world * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
        dist.all_gather_single(out, x.contiguous(), group=group)
        return out  # [W*n, D]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        backend = str(dist.get_backend(ctx.group))
        reducer = _GRAD_REDUCERS.get(backend, _sum_own_slice_allreduce)
        return reducer(grad, ctx.world, ctx.group), None


def all_gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """[n, D] on each of W ranks -> [W*n, D] on every rank, differentiable to the owner.

    Every rank must pass the same n (training drops the last incomplete batch).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    out: torch.Tensor = _AllGatherWithGrad.apply(x, group)
    return out


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1
