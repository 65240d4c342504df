"""CIFAR VGG with BatchNorm as in RepDistiller (FC layers removed): vgg8, vgg11, vgg13, vgg16, vgg19.

Five conv blocks ``block0..block4`` (each conv3x3+bias, BN, ReLU; the block's last ReLU
is the separate module ``reluK``), max-pool between blocks 0-1, 1-2, 2-3 (and 3-4 only
for inputs >= 64 px, as RepDistiller does for 64x64), global avg pool, one Linear.
Parameter names follow RepDistiller's ``models/vgg.py`` so its checkpoints load.
``vgg16_5pool`` is the VGG-16 of Active Mixup's official code (dwang181/active-mixup ``models/vgg.py``):
a max-pool after every one of the five blocks (1x1 before the pool on 32x32 input; a pool is skipped
once the map is 1 px, e.g. on 8x8 digits), same layers and parameter count as ``vgg16``.

Taps: ``stem`` = block0 output (post-ReLU); ``stage1..4`` = outputs of block1..block4
after their ReLU (RepDistiller's block1..block4 feature points: 16, 8, 4, 4 px on
32x32 input); ``stageK_pre`` = the same before that ReLU (the block's last BN);
``pool`` = input of ``classifier``.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import init_weights
from .registry import register_model
from .taps import TapPoint, stage_points

__all__ = ["VGG", "CFG"]

#: channels of the convs in each of the five blocks
CFG: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(channels: list[int], in_channels: int) -> nn.Sequential:
    """conv-BN-ReLU repeated, without the final ReLU (it is the VGG's ``reluK`` module)."""
    layers: list[nn.Module] = []
    for v in channels:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """CIFAR VGG-BN; ``cfg`` is one of :data:`CFG`."""

    def __init__(self, cfg: list[list[int]], in_channels: int = 3, num_classes: int = 100,
                 max_pools: int | None = None) -> None:
        super().__init__()
        if max_pools not in (None, 5):
            raise ValueError(f"max_pools must be None (RepDistiller's placement) or 5, not {max_pools}")
        self.max_pools = max_pools
        prev = in_channels
        for k, channels in enumerate(cfg):
            setattr(self, f"block{k}", _make_block(channels, prev))
            setattr(self, f"relu{k}", nn.ReLU())
            prev = channels[-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        if max_pools == 5:
            self.pool_last = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(prev, num_classes)
        init_weights(self, linear_std=0.01)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..4 (+ _pre before the block's ReLU), pool."""
        points = {"stem": TapPoint("relu0")}
        for k in (1, 2, 3, 4):
            points.update(stage_points(k, f"relu{k}", f"relu{k}", "input"))
        points["pool"] = TapPoint("classifier", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.max_pools == 5
        big = x.shape[2] >= 64
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if big or (five and min(x.shape[2:]) >= 2):
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        if five and min(x.shape[2:]) >= 2:
            x = self.pool_last(x)
        return self.classifier(self.flatten(self.pool4(x)))


@register_model("vgg8")
def vgg8(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-8 (config S) with BN."""
    return VGG(CFG["S"], in_channels, num_classes, **kw)


@register_model("vgg11")
def vgg11(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-11 (config A) with BN."""
    return VGG(CFG["A"], in_channels, num_classes, **kw)


@register_model("vgg13")
def vgg13(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-13 (config B) with BN, ~9.46M parameters."""
    return VGG(CFG["B"], in_channels, num_classes, **kw)


@register_model("vgg16")
def vgg16(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-16 (config D) with BN."""
    return VGG(CFG["D"], in_channels, num_classes, **kw)


@register_model("vgg16_5pool")
def vgg16_5pool(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-16 (config D) with BN and a max-pool after each of the five blocks (Active Mixup's VGG16)."""
    return VGG(CFG["D"], in_channels, num_classes, max_pools=5, **kw)


@register_model("vgg19")
def vgg19(in_channels: int = 3, num_classes: int = 100, **kw) -> VGG:
    """VGG-19 (config E) with BN."""
    return VGG(CFG["E"], in_channels, num_classes, **kw)
