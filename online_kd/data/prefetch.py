"""Prefetching: the next batches of a stream loaded and augmented in background worker processes.

A ``torch.utils.data.DataLoader`` walks the stream's own batch keys (epoch, split
indices of one shard of one global batch) and each worker runs the stream's
``load`` on them: the very code the training thread runs without prefetch. The
batches are therefore the same bit for bit whatever the number of workers, and a
function of (seed, epoch, sample index) as before; only where they are computed
changes. Workers are forked per epoch and shut down when the epoch's iterator ends
or is dropped (a loop that stops early).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoaderOptions:
    """How a stream is fed: ``workers`` background processes (0: in the training thread),
    ``prefetch`` batches loaded ahead per worker, ``pin_memory`` for asynchronous copies to a GPU."""

    workers: int = 0
    prefetch: int = 2
    pin_memory: bool = False

    def on(self, device) -> "LoaderOptions":
        """These options for a consumer on ``device``: pinned host memory when it is a CUDA device."""
        return replace(self, pin_memory=torch.device(device).type == "cuda")


class _BatchLoads(torch.utils.data.Dataset):
    """Map-style view of a stream keyed by whole batches: ``[(epoch, indices)]`` is ``stream.load``."""

    def __init__(self, stream):
        self.stream = stream

    def __getitem__(self, key):
        epoch, index = key
        return self.stream.load(torch.tensor(index, dtype=torch.int64), epoch)

    def __len__(self) -> int:  # pragma: no cover - the sampler decides what is loaded
        return len(self.stream)


def _as_is(batch):
    return batch


def _one_decode_thread(worker_id: int) -> None:
    """Processes give the parallelism now: an image folder decodes in its worker's own thread."""
    dataset = torch.utils.data.get_worker_info().dataset.stream.dataset
    if hasattr(dataset, "workers"):
        dataset.workers = 1


def prefetched(stream, epoch: int, batches: Sequence[Tensor], options: LoaderOptions) -> Iterator:
    """``stream.load(index, epoch)`` for every index tensor in ``batches``, in order, from ``options.workers`` processes."""
    keys = [(int(epoch), b.tolist()) for b in batches]
    if not keys:
        return
    loader = torch.utils.data.DataLoader(
        _BatchLoads(stream), batch_size=None, sampler=keys, collate_fn=_as_is,
        num_workers=options.workers, prefetch_factor=options.prefetch, pin_memory=options.pin_memory,
        persistent_workers=False, worker_init_fn=_one_decode_thread)
    it = iter(loader)
    try:
        yield from it
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # now, not when the garbage collector gets to the iterator
