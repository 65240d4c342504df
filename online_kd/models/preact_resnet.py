"""Pre-activation ResNet-18 for CIFAR as CS-KD's official code builds it (alinlab/cs-kd ``models/resnet.py``,
``CIFAR_ResNet18``): ``preact_resnet18``, 11.2M parameters with 100 classes.

A 3x3 stem conv (64) + BN + ReLU, four stages of two :class:`PreActBlock` (64/128/256/512 channels,
strides 1/2/2/2; each block BN-ReLU-conv-BN-ReLU-conv, the shortcut a strided 1x1 conv of the
*activated* input where the shape changes), average pool, Linear. No BN after the last stage, and
PyTorch's default initialisation, as the reference. Parameter names are the reference's
(``linear``, ``layerK.i.shortcut.0``), so its state dicts load.

Taps: ``stem`` (after the stem's ReLU); ``stageK`` = output of ``layerK``, the raw residual sum (no
ReLU follows a stage inside a pre-activation block's output); ``stageK_pre`` is the same tensor,
since nothing separates it from a ReLU of its own; ``pool`` = input of ``linear``.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .taps import TapPoint

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut (identity, or a 1x1 conv of the activated input)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + self.shortcut(act)


class PreActResNet(nn.Module):
    """CIFAR pre-activation ResNet: ``blocks`` PreActBlocks per stage at 64/128/256/512 channels."""

    def __init__(self, blocks: tuple[int, int, int, int], in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.in_planes = 64
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            setattr(self, f"layer{k}", self._make_layer(planes, n, 1 if k == 1 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4) on its 4x4 map
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = [PreActBlock(self.in_planes, planes, stride)]
        self.in_planes = planes
        layers += [PreActBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..4 (``_pre`` = the same raw sums), pool."""
        points = {"stem": TapPoint("relu")}
        for k in (1, 2, 3, 4):
            points[f"stage{k}"] = points[f"stage{k}_pre"] = TapPoint(f"layer{k}")
        points["pool"] = TapPoint("linear", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model("preact_resnet18")
def preact_resnet18(in_channels: int = 3, num_classes: int = 100, **kw) -> PreActResNet:
    """Pre-activation ResNet-18 (CS-KD's CIFAR_ResNet18), ~11.2M parameters with 100 classes."""
    return PreActResNet((2, 2, 2, 2), in_channels, num_classes, **kw)
