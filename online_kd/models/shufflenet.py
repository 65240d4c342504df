"""CIFAR ShuffleNetV1 (g=3) and ShuffleNetV2 (1x) as in RepDistiller (``ShuffleV1``/``ShuffleV2``).

Both use a 1x1 stem (24 channels) and three stride-2 stages: 16/8/4 px on 32x32 input.
Parameter names follow RepDistiller's ``models/ShuffleNetv1.py``/``ShuffleNetv2.py``.
Every block's final ReLU is the module ``relu_out``.

Taps:

* shufflenetv1 (3 stages, no head conv): ``stem`` (stem ReLU output), ``stage1..3`` =
  ``layer1..3`` outputs, ``stageK_pre`` = input of the last block's ``relu_out``
  (RepDistiller's ``preact``), ``pool``.
* shufflenetv2 (4 stages): ``stem``, ``stage1..3`` = ``layer1..3`` outputs,
  ``stageK_pre`` = input of the last block's ``relu_out``, ``stage4`` = the 1x1 head
  conv (1024 channels, post-ReLU), ``stage4_pre`` = its BN output, ``pool``.
  RepDistiller's V2 block returns ``relu(cat(x1, b))`` *then* shuffles, and its
  ``preact`` is unshuffled; here the block computes ``relu_out(shuffle(cat(x1, b)))``.
  Since the pass-through half ``x1`` is already >= 0 (it is a previous ReLU output) and
  shuffling is a channel permutation, the forward is numerically identical, and
  ``stageK_pre`` is RepDistiller's ``preact`` with channels shuffled so that
  ``relu(stageK_pre) == stageK``.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import register_model
from .taps import TapPoint, stage_points

__all__ = ["ShuffleNetV1", "ShuffleNetV2"]


class ShuffleBlock(nn.Module):
    """Channel shuffle: [N,C,H,W] -> [N,g,C/g,H,W] -> [N,C/g,g,H,W] -> [N,C,H,W]."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        g = self.groups
        return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


# ---------------------------------------------------------------- ShuffleNetV1


class V1Bottleneck(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1, shuffle, dw3x3, grouped 1x1; add (stride 1) or concat avg-pool (stride 2)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(pre)


class ShuffleNetV1(nn.Module):
    """ShuffleNetV1 for CIFAR: 1x1 stem to 24, three stages, global avg pool, Linear."""

    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3,
                 in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The strided first unit concatenates its (avg-pooled) input, so it makes fewer channels.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(V1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..3 (+ _pre before the last unit's ReLU), pool."""
        points = {"stem": TapPoint("relu")}
        for k in (1, 2, 3):
            layer = f"layer{k}"
            last = len(getattr(self, layer)) - 1
            points.update(stage_points(k, layer, f"{layer}.{last}.relu_out"))
        points["pool"] = TapPoint("linear", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.avgpool(out)))


# ---------------------------------------------------------------- ShuffleNetV2


class SplitBlock(nn.Module):
    """Split channels into the first ``ratio`` part and the rest."""

    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class V2BasicBlock(nn.Module):
    """ShuffleNetV2 unit: split; 1x1-dw3x3-1x1 on one half; concat; shuffle; ReLU (``relu_out``)."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.split(x)
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # x1 >= 0 already (a previous ReLU output), so relu_out only acts on `out`.
        return self.relu_out(self.shuffle(torch.cat([x1, out], 1)))


class V2DownBlock(nn.Module):
    """ShuffleNetV2 stride-2 unit: two branches (dw3x3-1x1 and 1x1-dw3x3-1x1), concat, shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        out2 = self.relu3(self.bn3(self.conv3(x)))
        out2 = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(out2)))))
        return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for CIFAR: 1x1 stem to 24, three stages, 1x1 head conv, global avg pool, Linear."""

    CONFIGS = {
        0.5: ((48, 96, 192, 1024), (3, 7, 3)),
        1: ((116, 232, 464, 1024), (3, 7, 3)),
        1.5: ((176, 352, 704, 1024), (3, 7, 3)),
        2: ((224, 488, 976, 2048), (3, 7, 3)),
    }

    def __init__(self, net_size: float = 1, in_channels: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        out_channels, num_blocks = self.CONFIGS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [V2DownBlock(self.in_channels, out_channels)]
        layers += [V2BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..3 (+ _pre before the last unit's ReLU), stage4 head conv (+ _pre), pool."""
        points = {"stem": TapPoint("relu")}
        for k in (1, 2, 3):
            layer = f"layer{k}"
            last = len(getattr(self, layer)) - 1
            points.update(stage_points(k, layer, f"{layer}.{last}.relu_out"))
        points.update(stage_points(4, "relu2", "relu2"))
        points["pool"] = TapPoint("linear", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.flatten(self.avgpool(out)))


@register_model("shufflenetv1")
def shufflenetv1(in_channels: int = 3, num_classes: int = 100, **kw) -> ShuffleNetV1:
    """RepDistiller's ShuffleV1: groups 3, 240/480/960 channels, 4/8/4 units."""
    return ShuffleNetV1(in_channels=in_channels, num_classes=num_classes, **kw)


@register_model("shufflenetv2")
def shufflenetv2(in_channels: int = 3, num_classes: int = 100, **kw) -> ShuffleNetV2:
    """RepDistiller's ShuffleV2: net size 1 (116/232/464, head 1024), 3/7/3 units."""
    return ShuffleNetV2(in_channels=in_channels, num_classes=num_classes, **kw)
