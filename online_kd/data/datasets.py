"""Splits addressable by sample index: ``get(LongTensor) -> (normalised x, y)``.

Every split returns float32 images already normalised, so evaluation needs no
transform. Each split also knows ``pad_fill``: the normalised value of a raw zero
pixel, which augmentation pads with (so padding in normalised space is exactly
RepDistiller's zero padding of raw images followed by normalisation).
"""
from __future__ import annotations

import copy
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .hashing import generator_seed, mix64, sample_uint32


def _as_index(index) -> Tensor:
    return torch.as_tensor(index, dtype=torch.int64).reshape(-1)


class IndexedDataset:
    """One split (train, test or holdout): ``len``, ``targets`` and ``get(indices)``.

    Sample ``i`` of the split is storage row ``rows[i]``; ``subset`` makes a new
    split over some of the rows without copying the storage, so a holdout and the
    rest of the train split share one tensor.
    """

    in_channels: int
    image_size: tuple[int, int]

    def __init__(self, targets: Tensor, rows: Tensor | None = None):
        self._all_targets = torch.as_tensor(targets, dtype=torch.int64)
        self._rows = torch.arange(len(self._all_targets)) if rows is None else _as_index(rows)
        self.targets: Tensor = self._all_targets[self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> Tensor:
        """Storage rows of this split's samples (to check that two splits are disjoint)."""
        return self._rows

    @property
    def pad_fill(self) -> Tensor:
        """Per-channel normalised value of a raw zero pixel (shape [C])."""
        return torch.zeros(self.in_channels)

    def get(self, index) -> tuple[Tensor, Tensor]:
        """Normalised float32 images ``[B, C, H, W]`` and int64 labels ``[B]`` of these split indices."""
        index = _as_index(index)
        return self._load(self._rows[index]), self.targets[index]

    def _load(self, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def subset(self, index) -> "IndexedDataset":
        """The split made of these samples of this one (renumbered 0..len-1)."""
        out = copy.copy(self)
        out._rows = self._rows[_as_index(index)]
        out.targets = out._all_targets[out._rows]
        return out


class TensorDataset(IndexedDataset):
    """An in-memory split: raw images (uint8 or float) normalised per batch on ``get``.

    x = (raw * scale - mean) / std, with per-channel (or scalar) mean and std.
    Keeping CIFAR as uint8 costs 150 MB instead of 600 MB and the cast is cheap.
    """

    def __init__(self, data: Tensor, targets: Tensor, mean: Sequence[float], std: Sequence[float],
                 scale: float = 1.0):
        super().__init__(targets)
        if data.dim() != 4 or len(data) != len(self._all_targets):
            raise ValueError(f"data must be [N, C, H, W] with N == len(targets), got {tuple(data.shape)}")
        self.data = data
        self.scale = float(scale)
        c = data.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(c).clone()
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(c).clone()
        self.in_channels = c
        self.image_size = (data.shape[2], data.shape[3])

    @property
    def pad_fill(self) -> Tensor:
        return -self.mean / self.std

    def _load(self, rows: Tensor) -> Tensor:
        x = self.data[rows].to(torch.float32)
        if self.scale != 1.0:
            x = x * self.scale
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)


class SyntheticDataset(IndexedDataset):
    """A learnable random data set generated on demand (no storage, any size).

    Class ``k`` has a smooth mean image (a random low-resolution pattern upsampled
    bilinearly); a sample is its class mean plus standard normal noise drawn from a
    generator seeded by the hash of (split, sample index), so ``get`` is a pure
    function of the index.
    Labels are balanced. Everything derives from a constant key, not from the run's
    seed: like a real data set, all seeds of a topology see the same data.
    """

    KEY = "online_kd/synthetic/v1"

    def __init__(self, num: int, shape: Sequence[int], num_classes: int, split: str,
                 signal: float = 1.0, noise: float = 1.0):
        c, h, w = (int(v) for v in shape)
        g = torch.Generator().manual_seed(generator_seed(self.KEY, "labels", split, num, num_classes))
        targets = (torch.arange(num) % num_classes)[torch.randperm(num, generator=g)]
        super().__init__(targets)
        g = torch.Generator().manual_seed(generator_seed(self.KEY, "means", c, h, w, num_classes))
        self.patterns = signal * torch.randn(num_classes, c, min(4, h), min(4, w), generator=g)
        self.noise = float(noise)
        self.in_channels, self.image_size = c, (h, w)
        self.num_classes = int(num_classes)
        self._key, self._key2 = mix64(self.KEY, "noise", split), mix64(self.KEY, "noise-2", split)
        self._means: Tensor | None = None

    def class_means(self) -> Tensor:
        """The noiseless mean image of every class, ``[K, C, H, W]``."""
        return F.interpolate(self.patterns, size=self.image_size, mode="bilinear", align_corners=False)

    def _load(self, rows: Tensor) -> Tensor:
        c, (h, w) = self.in_channels, self.image_size
        labels = self._all_targets[rows]
        if self._means is None and len(self.patterns) * c * h * w <= 1 << 24:
            self._means = self.class_means()          # cache up to 64 MB of class means
        if self._means is not None:
            means = self._means[labels]
        else:
            means = F.interpolate(self.patterns[labels], size=(h, w), mode="bilinear", align_corners=False)
        g = torch.Generator()
        noise = []
        seeds = ((sample_uint32(self._key, rows) >> 1) << 32) | sample_uint32(self._key2, rows)   # 63 bits
        for s in seeds.tolist():   # one seeded generator per sample
            g.manual_seed(s)
            noise.append(torch.randn(c, h, w, generator=g))
        if not noise:
            return means
        return means + self.noise * torch.stack(noise)


class ImageFolderDataset(IndexedDataset):
    """Image files decoded lazily per batch (in a few threads), resized to ``size`` x ``size``.

    ``get`` applies the evaluation transform (resize the short side to size/0.875,
    centre crop); ``get_with`` lets a training augmentation replace it per image.
    """

    def __init__(self, paths: Sequence[str], targets: Sequence[int], size: int,
                 mean: Sequence[float], std: Sequence[float], workers: int | None = None):
        super().__init__(torch.as_tensor(list(targets), dtype=torch.int64))
        self.paths = list(paths)
        self.size = int(size)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.in_channels, self.image_size = 3, (self.size, self.size)
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)

    @property
    def pad_fill(self) -> Tensor:
        return -self.mean / self.std

    def open(self, row: int):
        """The RGB PIL image of storage row ``row``."""
        from PIL import Image

        with open(self.paths[row], "rb") as f:
            return Image.open(f).convert("RGB")

    def eval_image(self, img) -> Tensor:
        """Resize + centre crop to ``[3, size, size]`` floats in [0, 1] (not normalised)."""
        from torchvision.transforms import functional as TF

        img = TF.resize(img, round(self.size / 0.875))
        return TF.to_tensor(TF.center_crop(img, [self.size, self.size]))

    def get_with(self, index, fn: Callable[[object, int], Tensor]) -> tuple[Tensor, Tensor]:
        """Like ``get``, with ``fn(pil_image, position_in_batch) -> [3, size, size] in [0, 1]`` per image."""
        index = _as_index(index)
        rows = self._rows[index].tolist()

        def one(i: int) -> Tensor:
            return fn(self.open(rows[i]), i)

        if not rows:
            x = torch.empty(0, 3, self.size, self.size)
        elif self.workers > 1 and len(rows) > 1:
            with ThreadPoolExecutor(min(self.workers, len(rows))) as pool:
                x = torch.stack(list(pool.map(one, range(len(rows)))))
        else:
            x = torch.stack([one(i) for i in range(len(rows))])
        x = (x - self.mean.view(1, 3, 1, 1)) / self.std.view(1, 3, 1, 1)
        return x, self.targets[index]

    def get(self, index) -> tuple[Tensor, Tensor]:
        return self.get_with(index, lambda img, i: self.eval_image(img))


def stratified_split(targets: Tensor, fraction: float, *key: int | str) -> tuple[Tensor, Tensor]:
    """Split indices into (keep, take) with ``ceil(fraction * n)`` taken, proportionally from every class.

    Deterministic in ``key`` (a constant for fixed splits): each class is shuffled,
    every sample gets its fractional position (rank + 0.5) / class_size and the
    lowest positions are taken, so every class gives its share (within one sample)
    even when the split is smaller than the number of classes. Both parts are sorted.
    """
    targets = torch.as_tensor(targets, dtype=torch.int64)
    n = len(targets)
    m = math.ceil(fraction * n) if fraction > 0 else 0
    g = torch.Generator().manual_seed(generator_seed("online_kd/split", *key))
    u = torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.unique(targets, return_inverse=True)[1]
    order = torch.argsort(labels.double() + u)  # grouped by class, shuffled within
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(n, dtype=torch.int64)
    rank[order] = torch.arange(n) - starts[labels[order]]
    position = (rank.double() + 0.5) / counts[labels].double() + u * 1e-9
    chosen = torch.argsort(position)
    take, keep = chosen[:m].sort().values, chosen[m:].sort().values
    return keep, take
