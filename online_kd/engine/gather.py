"""The whole batch for losses that relate a batch's samples (SP, RKD, CRD, infoflow) when a peer has replicas.

Each replica of a peer holds a contiguous shard of the global batch. A loss that relates samples to
each other calls ``ctx.gather(*tensors)`` (its :class:`~online_kd.losses.base.EdgeContext`'s hook) on
its per-sample tensors and gets them for the whole batch, in global order: the replicas' shards
all-gathered over the peer's replica group, with this replica's own slice replaced by the local
tensor, so it keeps its gradient. Every replica then computes the same whole-batch loss L.

Gradients: replica r's backward yields ∂L/∂θ through its own slice only; the engine averages
replicas' gradients weighted by shard size (Σ n_r g_r / N), so the local slice's gradient is scaled
by N/n_r here: the average is then Σ_r ∂L/∂θ|slice r = ∂L/∂θ, what one worker with the whole batch
computes. Edge modules applied to the gathered batch (CRD's embeddings) get the whole-batch gradient
on every replica, which the weighted average leaves unchanged.

On the local engine and for a single replica the hook is the identity (:func:`local_gather`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..losses.base import local_gather


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ReplicaGather:
    """``gather(*tensors)``: the whole batch of per-sample tensors (dim 0) over a replica group.

    The identity until :meth:`join` names a group of more than one rank. Shards may differ in size
    (the last batch); every replica must call it the same number of times in the same order, as
    the losses of one peer do.
    """

    def __init__(self) -> None:
        self.group = None

    def join(self, group) -> None:
        """Gather over ``group`` (a torch.distributed process group) from now on; None: the identity."""
        self.group = group if group is not None and dist.get_world_size(group) > 1 else None

    def __call__(self, *tensors: Tensor) -> Tensor | tuple[Tensor, ...]:
        if self.group is None:
            return local_gather(*tensors)
        n = tensors[0].shape[0]
        counts = [torch.zeros(1, dtype=torch.int64, device=tensors[0].device)
                  for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(counts, torch.tensor([n], dtype=torch.int64, device=tensors[0].device), group=self.group)
        sizes = [int(c) for c in counts]
        me, total = dist.get_rank(self.group), sum(sizes)
        out = tuple(self._gather(t, sizes, me, total) for t in tensors)
        return out[0] if len(out) == 1 else out

    def _gather(self, t: Tensor, sizes: list[int], me: int, total: int) -> Tensor:
        if t.shape[0] != sizes[me]:
            raise ValueError(f"gather: tensors of one call need the same number of rows ({t.shape[0]} != {sizes[me]})")
        biggest = max(sizes)
        padded = t.detach()
        if padded.shape[0] < biggest:
            padded = torch.cat([padded, padded.new_zeros((biggest - padded.shape[0], *t.shape[1:]))])
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        parts = [p[:s] for p, s in zip(parts, sizes)]
        if t.requires_grad and sizes[me]:
            parts[me] = _ScaleGrad.apply(t, total / sizes[me])
        else:
            parts[me] = t
        return torch.cat(parts)
