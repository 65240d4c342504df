"""The deterministic stream of global batches of one split, optionally cut into shards.

Epoch ``e`` visits the split in ``randperm(n)`` drawn from a generator seeded by
(seed, e) only; global batch ``b`` is ``perm[b*B:(b+1)*B]``; shard ``r`` of ``R`` is
the r-th piece of ``tensor_split(batch, R)``. So every peer with the same seed sees
the same batches, and the shards of R data-parallel ranks concatenate back to
exactly the single-process batch (augmentation included, since it is a function
of (seed, epoch, sample index)). With ``loader.workers > 0`` the same batches are
loaded ahead in background processes (``prefetch``).
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from .hashing import generator_seed
from .prefetch import LoaderOptions, prefetched


class Batch(NamedTuple):
    """Inputs ``x`` [B, C, H, W] float32, labels ``y`` [B] int64, ``index`` [B] int64: positions in the split.

    ``pair``: a sampler's extra samples, row j for sample j (``data.sampler: class_paired``), else None.
    """

    x: Tensor
    y: Tensor
    index: Tensor
    pair: "Batch | None" = None

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """``x``, ``y`` (and the pair's) on ``device``; ``index`` stays where it is (it addresses the split)."""
        pair = None if self.pair is None else self.pair.to(device, non_blocking)
        return self._replace(x=self.x.to(device, non_blocking=non_blocking),
                             y=self.y.to(device, non_blocking=non_blocking), pair=pair)


class BatchStream:
    """The deterministic stream of global batches of one split.

    A shard may be empty when the last global batch has fewer samples than
    ``num_shards``; it is still yielded so that every rank takes the same number of
    steps.
    """

    def __init__(self, dataset, batch_size: int, seed: int, transform=None, shuffle: bool = True,
                 drop_last: bool = False, num_shards: int = 1, shard: int = 0, sampler=None,
                 loader: LoaderOptions | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, num_shards), got shard={shard}, num_shards={num_shards}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.transform = transform
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_shards = int(num_shards)
        self.shard = int(shard)
        self.sampler = sampler  # adds ``batch.pair`` (online_kd.data.samplers), or None
        self.loader = loader or LoaderOptions()  # data.workers / data.prefetch: where batches are loaded

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The visiting order of the whole split in ``epoch`` (identity without shuffle)."""
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(generator_seed("online_kd/order", self.seed, int(epoch)))
        return torch.randperm(n, generator=g)

    def global_indices(self, epoch: int, batch: int, order: Tensor | None = None) -> Tensor:
        """Split indices of global batch ``batch`` of ``epoch`` (all shards)."""
        order = self.order(epoch) if order is None else order
        return order[batch * self.batch_size:(batch + 1) * self.batch_size]

    def shard_indices(self, global_batch: Tensor) -> Tensor:
        """This shard's contiguous piece of a global batch."""
        if self.num_shards == 1:
            return global_batch
        return torch.tensor_split(global_batch, self.num_shards)[self.shard]

    def load(self, index: Tensor, epoch: int) -> Batch:
        """The (augmented, if a transform is set) batch of these split indices."""
        if self.transform is None:
            x, y = self.dataset.get(index)
        else:
            x, y = self.transform.load(self.dataset, index, epoch)
        pair = None if self.sampler is None else self.sampler.pair(self.dataset, self.transform, index, epoch)
        return Batch(x, y, index, pair)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """This shard of every global batch of ``epoch``, from ``start_batch`` on (to resume mid-epoch)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        order = self.order(epoch)
        indices = [self.shard_indices(self.global_indices(epoch, b, order)) for b in range(start_batch, len(self))]
        if self.loader.workers > 0:
            yield from prefetched(self, epoch, indices, self.loader)
            return
        for index in indices:
            yield self.load(index, epoch)

    def __repr__(self) -> str:
        return (f"BatchStream(n={len(self.dataset)}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shuffle={self.shuffle}, shard={self.shard}/{self.num_shards}, batches={len(self)})")
