"""Small nets for quick runs on tiny inputs (scikit-learn digits, 1x8x8): ``mlp``, ``convnet``, ``convnet_small``.

Taps: ``stageK`` = output of the K-th hidden stage (post-ReLU), ``stageK_pre`` = the same
before its ReLU (Linear / BN output), ``pool`` = input of the final Linear.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import register_model
from .taps import TapPoint, stage_points

__all__ = ["MLP", "ConvNet"]


class MLP(nn.Module):
    """Avg-pool to ``input_size`` x ``input_size`` (identity on 8x8), flatten, hidden Linear-ReLU layers, Linear.

    The adaptive pool lets one MLP take any input >= ``input_size`` px.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, hidden: tuple[int, ...] = (128, 64),
                 input_size: int = 8) -> None:
        super().__init__()
        self.resize = nn.AdaptiveAvgPool2d(input_size)
        self.flatten = nn.Flatten(1)
        prev = in_channels * input_size * input_size
        stages = []
        for width in hidden:
            stages.append(nn.Sequential(OrderedDict(fc=nn.Linear(prev, width), relu=nn.ReLU())))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(prev, num_classes)

    def tap_points(self) -> dict[str, TapPoint]:
        """stage1..N (+ _pre = Linear output before ReLU), pool."""
        points: dict[str, TapPoint] = {}
        for k in range(1, len(self.stages) + 1):
            points.update(stage_points(k, f"stages.{k - 1}", f"stages.{k - 1}.relu"))
        points["pool"] = TapPoint("fc", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.flatten(self.resize(x))))


class ConvNet(nn.Module):
    """Stages of conv3x3-BN-ReLU (given widths and strides), global avg pool, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                 strides: tuple[int, ...] = (1, 2, 2)) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError("widths and strides must have the same length")
        prev = in_channels
        stages = []
        for width, stride in zip(widths, strides):
            stages.append(nn.Sequential(OrderedDict(
                conv=nn.Conv2d(prev, width, 3, stride=stride, padding=1, bias=False),
                bn=nn.BatchNorm2d(width),
                relu=nn.ReLU(),
            )))
            prev = width
        self.stages = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def tap_points(self) -> dict[str, TapPoint]:
        """stage1..N (+ _pre = BN output before ReLU), pool."""
        points: dict[str, TapPoint] = {}
        for k in range(1, len(self.stages) + 1):
            points.update(stage_points(k, f"stages.{k - 1}", f"stages.{k - 1}.relu"))
        points["pool"] = TapPoint("fc", "input")
        return points

    def pre_relu_bns(self) -> dict[str, str]:
        """stageK_pre ↦ stage K's BN (OFD's margin source)."""
        return {f"stage{k}_pre": f"stages.{k - 1}.bn" for k in range(1, len(self.stages) + 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.avgpool(self.stages(x))))


@register_model("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, **kw) -> MLP:
    """MLP 128-64 (taps stage1, stage2, pool, logits)."""
    return MLP(in_channels, num_classes, **kw)


@register_model("convnet")
def convnet(in_channels: int = 1, num_classes: int = 10, **kw) -> ConvNet:
    """Three conv stages, 16/32/64 channels, strides 1/2/2."""
    return ConvNet(in_channels, num_classes, **kw)


@register_model("convnet_small")
def convnet_small(in_channels: int = 1, num_classes: int = 10, **kw) -> ConvNet:
    """Two conv stages, 8/16 channels, strides 1/2: a deliberately weak student."""
    kw.setdefault("widths", (8, 16))
    kw.setdefault("strides", (1, 2))
    return ConvNet(in_channels, num_classes, **kw)
