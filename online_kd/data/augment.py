"""Seeded training augmentation: the same sample, seed and epoch always get the same crop and flip.

Random parameters come from ``hashing`` (a hash of seed, epoch and the sample's
index in its split), never from a global RNG, so they do not depend on the batch
a sample lands in, on the shard, or on the number of loading threads.
"""
from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from .hashing import below, mix64, sample_uint32


class BatchTransform:
    """A per-sample, seeded augmentation of whole batches.

    ``load(dataset, index, epoch)`` returns the augmented batch ``(x, y)`` of those
    split indices; tensor augmentations only override ``__call__`` on the
    normalised batch, those needing the decoded image (imagefolder) override ``load``.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def key(self, epoch: int, purpose: str) -> int:
        """The 64-bit hash key of one kind of draw in one epoch."""
        return mix64("online_kd/augment", self.seed, int(epoch), purpose)

    def load(self, dataset, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        x, y = dataset.get(index)
        return self(x, index, epoch), y

    def __call__(self, x: Tensor, index: Tensor, epoch: int) -> Tensor:
        raise NotImplementedError


class PadCropFlip(BatchTransform):
    """Pad by ``pad``, crop back to the original size at a random offset, flip horizontally with p=0.5,
    then (``rotation`` > 0) rotate by an angle drawn uniformly from [−rotation, rotation] degrees.

    Vectorised over the batch (one gather). Pads with ``fill`` per channel: the
    normalised value of a raw zero pixel, so on normalised input this equals
    torchvision's ``RandomCrop(size, padding=pad)`` (zero fill) on raw pixels
    followed by normalisation, as RepDistiller does for CIFAR. ``padding_mode: reflect``
    mirrors the border instead (``Pad(pad, padding_mode='reflect')``, as OFD's loader). The
    rotation is ``RandomRotation(rotation)`` (nearest neighbour, about the centre, corners
    filled with ``fill``), as Tf-KD's loader applies after crop and flip.
    """

    def __init__(self, seed: int, pad: int, flip: bool, fill: Tensor | None = None, padding_mode: str = "constant",
                 rotation: float = 0.0):
        super().__init__(seed)
        self.pad, self.flip = int(pad), bool(flip)
        self.fill = None if fill is None else torch.as_tensor(fill, dtype=torch.float32).reshape(-1)
        if padding_mode not in ("constant", "reflect"):
            raise ValueError(f"padding_mode must be constant or reflect, not {padding_mode!r}")
        self.padding_mode, self.rotation = padding_mode, float(rotation)

    def angles(self, index: Tensor, epoch: int) -> Tensor:
        """Per-sample rotation in degrees, uniform in [−rotation, rotation], ``[B]``."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        u = sample_uint32(self.key(epoch, "rotate"), index).double() / 2.0 ** 32
        return ((2.0 * u - 1.0) * self.rotation).float()

    def params(self, index: Tensor, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample (row offset, column offset, flip) in the padded image, each ``[B]``."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        n = 2 * self.pad + 1
        dy = below(sample_uint32(self.key(epoch, "crop-y"), index), n)
        dx = below(sample_uint32(self.key(epoch, "crop-x"), index), n)
        if self.flip:
            flip = below(sample_uint32(self.key(epoch, "flip"), index), 2).bool()
        else:
            flip = torch.zeros(len(index), dtype=torch.bool)
        return dy, dx, flip

    def __call__(self, x: Tensor, index: Tensor, epoch: int) -> Tensor:
        b, c, h, w = x.shape
        if b == 0:
            return x
        dy, dx, flip = self.params(index, epoch)
        p = self.pad
        fill = torch.zeros(c) if self.fill is None else self.fill.expand(c)
        if self.padding_mode == "reflect" and p:
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
        else:
            padded = fill.to(x.dtype).view(1, c, 1, 1).expand(b, c, h + 2 * p, w + 2 * p).clone()
            padded[:, :, p:p + h, p:p + w] = x
        rows = dy[:, None] + torch.arange(h)                      # [B, H]
        cols = dx[:, None] + torch.arange(w)                      # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        out = padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
        if self.rotation:
            out = rotate(out, self.angles(index, epoch), fill.to(x.dtype))
        return out


def rotate(x: Tensor, degrees: Tensor, fill: Tensor) -> Tensor:
    """Rotate each image of ``x`` [B, C, H, W] counter-clockwise by ``degrees`` [B] about its centre, nearest
    neighbour, pixels from outside the image set to ``fill`` [C] (torchvision's ``rotate`` convention)."""
    theta = torch.deg2rad(degrees.to(torch.float64))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # output (u, v) samples input R(−θ)(u, v) in y-down normalised coordinates
    matrix = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = torch.nn.functional.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    shifted = x - fill.view(1, -1, 1, 1)
    out = torch.nn.functional.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out + fill.view(1, -1, 1, 1)


class RandomResizedCropFlip(BatchTransform):
    """ImageNet-style ``RandomResizedCrop(size)`` + horizontal flip on decoded images.

    Same algorithm as torchvision's (10 tries of area in ``scale`` and log-uniform
    aspect ratio in ``ratio``, else a centre crop), but drawn from a
    ``random.Random`` seeded by the sample's hash instead of torch's global RNG:
    images are decoded in threads, where a shared global RNG (even under
    ``fork_rng``) would race.
    """

    def __init__(self, seed: int, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
        super().__init__(seed)
        self.size, self.scale, self.ratio, self.flip = int(size), tuple(scale), tuple(ratio), bool(flip)

    def crop_params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as ``RandomResizedCrop.get_params``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def augment_image(self, img, sample_seed: int) -> Tensor:
        """One PIL image -> ``[3, size, size]`` floats in [0, 1], a pure function of ``sample_seed``."""
        from torchvision.transforms import functional as TF

        rng = random.Random(sample_seed)
        top, left, h, w = self.crop_params(img.width, img.height, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if self.flip and rng.random() < 0.5:
            img = TF.hflip(img)
        return TF.to_tensor(img)

    def load(self, dataset, index: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        seeds = sample_uint32(self.key(epoch, "resized-crop"), index).tolist()
        return dataset.get_with(index, lambda img, i: self.augment_image(img, seeds[i]))

    def __call__(self, x, index, epoch):
        raise TypeError("RandomResizedCropFlip works on decoded images: call load(dataset, index, epoch)")
