"""The few collectives a distributed SAE step needs, as plain functions of tensors and process groups.

Every function takes `group=None` to mean "no group": a single process, where each is the identity
(or the local answer), so one code path serves one process and many.

- `copy_to_group` / `reduce_from_group`: the conjugate pair of tensor-parallel training (Megatron's
  f and g). A latent shard reads the same input on every rank of its group and adds its partial
  reconstruction to the others'; these make the backward pass give each rank exactly the gradient
  an unsharded SAE would give its slice of the weights.
- `kth_largest_rows` / `kth_largest`: exact top-k across shards without a capacity factor. Each rank
  offers its own k best values; the k-th largest of the union is the selection threshold, and a value
  is selected where it reaches it. Only values travel (k per row), never activations.

Time spent in these calls accumulates in `COMM`, which the trainer reports per rank.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saelab.errors import TrainingError


class CommClock:
    """Seconds spent in collectives by this process (on CUDA each is synchronised to be timed)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def run(self, collective: Any, tensor: Tensor, *args: Any, **kwargs: Any) -> None:
        """Call `collective(tensor, ...)` and count its time; a peer that died raises `TrainingError`."""
        sync = tensor.is_cuda
        if sync:
            torch.cuda.synchronize(tensor.device)
        t0 = time.perf_counter()
        try:
            collective(tensor, *args, **kwargs)
        except (RuntimeError, dist.DistError) as e:  # gloo / nccl report a lost peer as one of these
            raise TrainingError(
                f"rank {dist.get_rank()}: a collective failed, most likely because another rank stopped or died "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); see that rank's error"
            ) from None
        if sync:
            torch.cuda.synchronize(tensor.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1


COMM = CommClock()


def size(group: Any) -> int:
    """Ranks in `group` (1 for None)."""
    return 1 if group is None else dist.get_world_size(group)


def all_reduce(t: Tensor, group: Any, op: Any = None) -> Tensor:
    """`t` reduced in place over `group` (sum unless `op` says otherwise); the identity for None."""
    if size(group) > 1:
        COMM.run(dist.all_reduce, t, op=op or dist.ReduceOp.SUM, group=group)
    return t


def all_gather(t: Tensor, group: Any) -> Tensor:
    """Every rank's `t` (all of one shape) stacked along a new first axis, in group-rank order."""
    n = size(group)
    if n == 1:
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(n)]
    COMM.run(lambda x: dist.all_gather(parts, x, group=group), t.contiguous())
    return torch.stack(parts)


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum over the group forward; the backward passes the (identical) gradient through."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Any) -> Tensor:
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def copy_to_group(x: Tensor, group: Any) -> Tensor:
    """`x`, read by every shard of `group`: each shard's gradient with respect to it is summed."""
    return x if size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group: Any) -> Tensor:
    """The sum of every shard's partial `x`; its gradient reaches each shard unchanged."""
    return x if size(group) == 1 else _ReduceFromGroup.apply(x, group)


def kth_largest_rows(values: Tensor, k: int, group: Any) -> Tensor:
    """Per row, the k-th largest value of the rows of `values` [N, C] on every rank of `group` together.

    Each rank passes its own C >= min(k, its width) best values per row (padded with -inf); the result
    [N] is the same on every rank. -inf where the union holds fewer than k finite values.
    """
    n, c = values.shape
    if c < k:
        values = torch.cat([values, values.new_full((n, k - c), float("-inf"))], dim=1)
    union = all_gather(values.detach(), group).permute(1, 0, 2).reshape(n, -1)  # [N, group * C]
    return union.topk(k, dim=1, sorted=False).values.min(dim=1).values


def kth_largest(values: Tensor, k: int, group: Any) -> Tensor:
    """The k-th largest entry of `values` (any shape) on every rank of `group` together, as a 0-d tensor."""
    flat = values.detach().reshape(-1)
    own = flat.topk(min(k, flat.numel()), sorted=False).values
    if len(own) < k:
        own = torch.cat([own, own.new_full((k - len(own),), float("-inf"))])
    return all_gather(own, group).reshape(-1).topk(k, sorted=False).values.min()


def kth_largest_columns(values: Tensor, k: int, group: Any) -> Tensor:
    """Per column, the k-th largest value of `values` [N, F] over the rows of every rank of `group` [F]."""
    n, f = values.shape
    own = values.detach().topk(min(k, n), dim=0, sorted=False).values
    if len(own) < k:
        own = torch.cat([own, own.new_full((k - len(own), f), float("-inf"))])
    return all_gather(own, group).reshape(-1, f).topk(k, dim=0, sorted=False).values.min(dim=0).values


def spread(x: Tensor, group: Any) -> Tensor | None:
    """||x - mean(x)||^2 over the rows of `x` [N, d] on every rank of `group` together (detached); None
    for no group, where `saelab.losses.fvu` computes it from the rows it has."""
    if size(group) == 1:
        return None
    x = x.detach().float()
    sums = all_reduce(torch.cat([x.sum(0), x.new_tensor([len(x)])]), group)
    mean = sums[:-1] / sums[-1]
    return all_reduce((x - mean).pow(2).sum().reshape(1), group)[0]


def whole(own: Tensor, group: Any, mean: bool = False) -> Tensor:
    """This rank's part `own` (a scalar) summed, or averaged, over `group`, differentiable as `own`: a loss
    built on it has the whole group's value and gives each rank the gradient of its own part."""
    if size(group) == 1:
        return own
    total = all_reduce(own.detach().clone().reshape(1), group)[0]
    return own + ((total / size(group) if mean else total) - own).detach()
