"""Batch samplers beyond the plain shuffled order: extra samples drawn for each sample of a batch.

``data.sampler`` names one (``random``, the default, draws nothing extra). A sampler keeps the
usual deterministic order of the anchors and adds a second :class:`~online_kd.data.stream.Batch`
in ``batch.pair`` whose row ``j`` belongs to anchor ``j``. Every draw is a hash of (seed, epoch,
anchor index) (:mod:`.hashing`), so shards, worker counts and resuming never change it.

A loss states the batch fields it reads (``EdgeLoss.batch_fields``); each sampler states the fields
it gives (``provides``), so validation can name the sampler a loss needs (:func:`sampler_for`).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from .hashing import below, generator_seed, mix64, sample_uint32


class ClassPairedSampler:
    """CS-KD's partners (alinlab/cs-kd ``PairBatchSampler``): for each anchor, a uniformly drawn
    training sample of the same class, which may be the anchor itself.

    Partners are augmented by the training transform with a seed of their own: a partner's
    augmentation is a function of (seed, epoch, partner index), drawn independently of the
    anchors' (as the reference loads anchors and partners as separate, independently augmented items).
    """

    name = "class_paired"
    provides = frozenset({"pair"})

    def __init__(self, targets: Tensor, seed: int):
        targets = torch.as_tensor(targets, dtype=torch.int64).reshape(-1)
        self.seed = int(seed)
        self.targets = targets
        self.by_class = torch.argsort(targets, stable=True)          # sample indices grouped by class
        counts = torch.bincount(targets, minlength=int(targets.max()) + 1 if len(targets) else 0)
        self.counts = counts
        self.offsets = torch.cumsum(counts, 0) - counts                # start of each class in by_class

    def partners(self, index: Tensor, epoch: int) -> Tensor:
        """The partner (a split index) of each anchor in ``index``, in ``epoch``."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        y = self.targets[index]
        draw = sample_uint32(mix64("online_kd/class_paired", self.seed, int(epoch)), index)
        return self.by_class[self.offsets[y] + below(draw, self.counts[y])]

    def partner_transform(self, transform):
        """The training transform with its own seed, for the partners (None stays None)."""
        if transform is None:
            return None
        t = copy.copy(transform)
        t.seed = generator_seed(transform.seed, "class_paired")
        return t

    def pair(self, dataset, transform, index: Tensor, epoch: int):
        """The partners' batch of these anchors: ``Batch(x, y, index)`` loaded like the anchors."""
        from .stream import Batch

        idx = self.partners(index, epoch)
        t = self.partner_transform(transform)
        x, y = dataset.get(idx) if t is None else t.load(dataset, idx, epoch)
        return Batch(x, y, idx)


SAMPLERS: dict[str, type] = {ClassPairedSampler.name: ClassPairedSampler}


def provided_fields(name: str) -> frozenset[str]:
    """The extra batch fields the sampler ``name`` gives (none for ``random``)."""
    return SAMPLERS[name].provides if name in SAMPLERS else frozenset()


def sampler_for(field: str) -> str | None:
    """The name of a sampler that gives batch field ``field``, if any."""
    return next((n for n, cls in SAMPLERS.items() if field in cls.provides), None)


def build_sampler(name: str, targets: Tensor, seed: int):
    """The sampler named by ``data.sampler`` over a split with these labels; None for ``random``."""
    if name == "random":
        return None
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}' (known: random, {', '.join(SAMPLERS)})")
    return SAMPLERS[name](targets, seed)
