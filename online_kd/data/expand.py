"""View expansions: every training batch of B samples becomes ``factor``·B rows before the forward.

``data.expand`` names one (``none`` by default). It is applied after augmentation and after
sharding, sample by sample, so the shards of an expanded batch are the expansion of the shards.
The batch itself keeps its B labels; the expansion says how rows relate to them:

* ``row_labels(y)``    the class of every row ([factor·B]);
* ``joint_labels(y)``  the self-supervised-augmented label of every row (class × transform);
* ``anchor(t)``        the rows of the untransformed samples (the task CE and accuracy use these).

Evaluation runs on test batches as they are (the untransformed view), as HSAKD evaluates rotation 0.
An expansion registers itself with ``@register_expansion("name")``.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import Tensor

from ..registry import registrar

E = TypeVar("E")

EXPANSIONS: dict[str, type] = {}


def register_expansion(name: str) -> Callable[[E], E]:
    """Class decorator: the expansion used by ``data.expand: <name>``."""
    return _register(name)


_register = registrar(EXPANSIONS, "expansion")


@register_expansion("none")
class Expansion:
    """The identity: one row per sample, its label as joint label. Base of every expansion."""

    name = "none"
    factor = 1  # rows per sample

    def __call__(self, x: Tensor) -> Tensor:
        return x

    def rows(self, batch_size: int) -> int:
        """Rows of an expanded batch of ``batch_size`` samples."""
        return self.factor * batch_size

    def anchor(self, t: Tensor) -> Tensor:
        """The rows of the untransformed samples (transform 0 of each sample)."""
        return t[0:: self.factor] if self.factor > 1 else t

    def row_labels(self, y: Tensor) -> Tensor:
        """The class label of every row."""
        return y.repeat_interleave(self.factor) if self.factor > 1 else y

    def joint_labels(self, y: Tensor) -> Tensor:
        """Label ``factor·class + k`` of the row holding transform k of a sample of ``class``."""
        if self.factor == 1:
            return y
        k = torch.arange(self.factor, device=y.device, dtype=y.dtype)
        return (self.factor * y.unsqueeze(1) + k).reshape(-1)

    def check(self, in_channels: int, image_size: tuple[int, int]) -> None:
        """ValueError if the data set's images cannot be expanded this way."""


@register_expansion("rotation4")
class Rotation4(Expansion):
    """HSAKD's rotations by 0°, 90°, 180°, 270° (``rot90`` k times on dims (2, 3)), interleaved per sample:
    rows x0r0, x0r1, x0r2, x0r3, x1r0, …; joint label 4·class + k (N·4 joint classes)."""

    factor = 4

    def __call__(self, x: Tensor) -> Tensor:
        return torch.stack([torch.rot90(x, k, (2, 3)) for k in range(4)], 1).reshape(-1, *x.shape[1:])

    def check(self, in_channels: int, image_size: tuple[int, int]) -> None:
        h, w = image_size
        if h != w:
            raise ValueError(f"rotations need square images, these are {h}×{w}")


def build_expansion(name: str) -> Expansion:
    """The registered expansion ``name``; KeyError(name) if there is none."""
    return EXPANSIONS[name]()
