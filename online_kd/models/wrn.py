"""Wide ResNets (Zagoruyko & Komodakis 2016, pre-activation, depth 6n+4) as in RepDistiller: wrn_16_1/16_2/40_1/40_2.

Parameter names follow RepDistiller's ``models/wrn.py`` (hence ``convShortcut``) so its
checkpoints load.  Dropout defaults to 0.

Taps (pre-activation net, so a stage's output has no ReLU of its own):

* ``stem``        output of ``conv1``;
* ``stageK``      output of ``blockK``: the raw residual sum, as RepDistiller's ``f_K``
                  (not ReLU'd; may be negative);
* ``stageK_pre``  that tensor passed through the *next* BN - ``block{K+1}.layer.0.bn1``
                  for K=1,2 and the final ``bn1`` for K=3 - i.e. the value right before
                  the ReLU that follows the stage (RepDistiller ``preact`` / overhaul's
                  pre-ReLU feature).  Hence ``relu(stageK_pre) != stageK`` here;
* ``pool``        input of ``fc`` (avg-pooled relu(bn1(stage3))).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import init_weights
from .registry import register_model
from .taps import TapPoint, stage_points

__all__ = ["WRNBlock", "WideResNet"]


class WRNBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv3x3-BN-ReLU-conv3x3 with identity or 1x1 shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # As in the original: identity shortcut takes the raw input, projection the activated one.
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage: ``nb_layers`` WRNBlocks in ``self.layer`` (first one strided)."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WRNBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen: conv3x3(16), three stages of 16k/32k/64k channels, BN-ReLU, global avg pool, Linear."""

    def __init__(self, depth: int, widen_factor: int = 1, in_channels: int = 3, num_classes: int = 100,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch[3], num_classes)
        init_weights(self)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..3 (raw block outputs; _pre = next BN output), pool."""
        points = {"stem": TapPoint("conv1")}
        next_bn = ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]
        for k in (1, 2, 3):
            points.update(stage_points(k, f"block{k}", next_bn[k - 1], "output"))
        points["pool"] = TapPoint("fc", "input")
        return points

    def pre_relu_bns(self) -> dict[str, str]:
        """stageK_pre ↦ the next BN, whose output that tap is (OFD's margin source)."""
        return {"stage1_pre": "block2.layer.0.bn1", "stage2_pre": "block3.layer.0.bn1", "stage3_pre": "bn1"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.flatten(self.avgpool(out)))


@register_model("wrn_16_1")
def wrn_16_1(in_channels: int = 3, num_classes: int = 100, **kw) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, in_channels, num_classes, **kw)


@register_model("wrn_16_2")
def wrn_16_2(in_channels: int = 3, num_classes: int = 100, **kw) -> WideResNet:
    """WRN-16-2, ~0.70M parameters."""
    return WideResNet(16, 2, in_channels, num_classes, **kw)


@register_model("wrn_40_1")
def wrn_40_1(in_channels: int = 3, num_classes: int = 100, **kw) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, 1, in_channels, num_classes, **kw)


@register_model("wrn_40_2")
def wrn_40_2(in_channels: int = 3, num_classes: int = 100, **kw) -> WideResNet:
    """WRN-40-2, ~2.26M parameters (a common CIFAR-100 teacher)."""
    return WideResNet(40, 2, in_channels, num_classes, **kw)
