"""CIFAR ResNets without skip connections (``resnet20_noskip``, …): the plain students of
"On the Demystification of Knowledge Distillation: A Residual Network Perspective" (Jha et al., 2020).

Same stem, stages, widths, parameter names and taps as :class:`~online_kd.models.resnet.CifarResNet`;
each block is conv-bn-relu-conv-bn-relu with no shortcut (and so no downsample branch).
"""
from __future__ import annotations

import torch

from .resnet import _W, _W4, BasicBlock, CifarResNet
from .registry import register_model

__all__ = ["PlainBlock", "CifarPlainNet"]


class PlainBlock(BasicBlock):
    """A basic block with the shortcut removed: relu(bn2(conv2(relu(bn1(conv1(x))))))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__(in_planes, planes, stride)
        self.downsample = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu_out(self.bn2(self.conv2(out)))


class CifarPlainNet(CifarResNet):
    """A CIFAR ResNet of depth 6n+2 built from :class:`PlainBlock` (no residual connections)."""

    block = PlainBlock


def _register(depth: int, widths: tuple[int, int, int, int], name: str) -> None:
    def build(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarPlainNet:
        return CifarPlainNet(depth, widths, in_channels, num_classes, **kw)

    build.__doc__ = f"{name} without skip connections."
    register_model(f"{name}_noskip")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, _W, f"resnet{_depth}")
_register(8, _W4, "resnet8x4")
_register(32, _W4, "resnet32x4")
