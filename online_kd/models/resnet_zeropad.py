"""CIFAR ResNets with zero-padding (option A) shortcuts, as BSS's official code builds its nets:
``resnet8_zeropad``, ``resnet14_zeropad``, ``resnet20_zeropad``, ``resnet26_zeropad``.

He et al.'s option A (bhheo/BSS_distillation ``models/resnet.py``, ``ZeroPadBlock``): where a block
changes resolution or width, the shortcut subsamples the input (a stride-s 1x1 average pool, i.e.
every s-th pixel) and pads the new channels with zeros, so shortcuts hold no parameters. Everything
else, including parameter names and taps, is :class:`~online_kd.models.resnet.CifarResNet`'s
(the reference names the classifier ``linear``, here ``fc``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .resnet import _W, BasicBlock, CifarResNet

__all__ = ["ZeroPadShortcut", "ZeroPadBlock", "CifarResNetZeroPad"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: every ``stride``-th pixel of the input, then ``extra`` zero channels."""

    def __init__(self, stride: int, extra: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra={self.extra}"


class ZeroPadBlock(BasicBlock):
    """Post-activation basic block whose projection shortcut is :class:`ZeroPadShortcut` (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        if self.downsample is not None:
            self.downsample = ZeroPadShortcut(stride, planes - in_planes)


class CifarResNetZeroPad(CifarResNet):
    """A CIFAR ResNet of depth 6n+2 built from :class:`ZeroPadBlock`."""

    block = ZeroPadBlock


def _register(depth: int) -> None:
    def build(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNetZeroPad:
        return CifarResNetZeroPad(depth, _W, in_channels, num_classes, **kw)

    build.__doc__ = f"ResNet-{depth} with zero-padding shortcuts (BSS's ResNet{depth}_zero)."
    register_model(f"resnet{depth}_zeropad")(build)


for _depth in (8, 14, 20, 26):
    _register(_depth)
