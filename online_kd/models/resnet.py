"""CIFAR ResNets (He et al. 2016, BasicBlock, depth 6n+2) as in RepDistiller: resnet8..110, resnet8x4, resnet32x4.

Parameter names follow RepDistiller's ``models/resnet.py`` so its checkpoints load.
Taps: ``stem`` (after conv1-bn1-relu), ``stage1..3`` = ``layer1..3`` outputs (post-ReLU),
``stageK_pre`` = input of the last block's ``relu_out`` (the residual sum before the
ReLU, RepDistiller's ``preact``), ``pool`` = input of ``fc``.
``pre_relu_bns()``: ``stageK_pre`` ↦ that block's ``bn2`` (the sum also holds the shortcut;
overhaul-distillation's ``get_bn_before_relu`` takes ``bn2`` all the same).
"""
from __future__ import annotations

import torch
from torch import nn

from .common import init_weights
from .registry import register_model
from .taps import TapPoint, stage_points

__all__ = ["BasicBlock", "CifarResNet"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation basic block; its final ReLU is the module ``relu_out`` so its input is tappable."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages of n BasicBlocks (strides 1/2/2), global avg pool, Linear.

    ``widths`` = (stem, stage1, stage2, stage3) channels, e.g. (16, 16, 32, 64) or
    (32, 64, 128, 256) for the x4 variants.  Works for any input >= 8x8.
    """

    block: type[nn.Module] = BasicBlock  # a subclass may swap the block (zero-pad shortcuts, no skip)

    def __init__(self, depth: int, widths: tuple[int, int, int, int], in_channels: int = 3,
                 num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.in_planes = widths[0]
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [self.block(self.in_planes, planes, stride)]
        self.in_planes = planes
        layers += [self.block(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..3 (+ _pre before the last block's ReLU), pool."""
        points = {"stem": TapPoint("relu")}
        for k in (1, 2, 3):
            layer = f"layer{k}"
            last = len(getattr(self, layer)) - 1
            points.update(stage_points(k, layer, f"{layer}.{last}.relu_out"))
        points["pool"] = TapPoint("fc", "input")
        return points

    def pre_relu_bns(self) -> dict[str, str]:
        """stageK_pre ↦ the last block's bn2 (OFD's margin source)."""
        return {f"stage{k}_pre": f"layer{k}.{len(getattr(self, f'layer{k}')) - 1}.bn2" for k in (1, 2, 3)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_W = (16, 16, 32, 64)
_W4 = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-8 (n=1), 16/32/64 channels."""
    return CifarResNet(8, _W, in_channels, num_classes, **kw)


@register_model("resnet14")
def resnet14(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-14 (n=2)."""
    return CifarResNet(14, _W, in_channels, num_classes, **kw)


@register_model("resnet20")
def resnet20(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-20 (n=3), ~0.27M parameters."""
    return CifarResNet(20, _W, in_channels, num_classes, **kw)


@register_model("resnet26")
def resnet26(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-26 (n=4) with 1x1-conv shortcuts (BSS's zero-padding teacher is ``resnet26_zeropad``)."""
    return CifarResNet(26, _W, in_channels, num_classes, **kw)


@register_model("resnet32")
def resnet32(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return CifarResNet(32, _W, in_channels, num_classes, **kw)


@register_model("resnet44")
def resnet44(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-44 (n=7)."""
    return CifarResNet(44, _W, in_channels, num_classes, **kw)


@register_model("resnet56")
def resnet56(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-56 (n=9), ~0.86M parameters."""
    return CifarResNet(56, _W, in_channels, num_classes, **kw)


@register_model("resnet110")
def resnet110(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-110 (n=18), ~1.73M parameters."""
    return CifarResNet(110, _W, in_channels, num_classes, **kw)


@register_model("resnet8x4")
def resnet8x4(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-8 with 4x channels (32 stem, 64/128/256 stages), ~1.23M parameters."""
    return CifarResNet(8, _W4, in_channels, num_classes, **kw)


@register_model("resnet32x4")
def resnet32x4(in_channels: int = 3, num_classes: int = 100, **kw) -> CifarResNet:
    """ResNet-32 with 4x channels, ~7.43M parameters (the usual CIFAR-100 teacher)."""
    return CifarResNet(32, _W4, in_channels, num_classes, **kw)
