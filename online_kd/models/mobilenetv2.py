"""CIFAR MobileNetV2 as in RepDistiller (``mobile_half``: expansion 6, width 0.5), registered as ``mobilenetv2``.

Stem conv3x3 stride 2, seven groups of inverted residual blocks (``blocks.0..6``),
1x1 head conv to 1280 channels, global avg pool, Linear.  ReLU (not ReLU6), as in
RepDistiller.  Parameter names follow RepDistiller's ``models/mobilenetv2.py``.

Taps (5 stages):

* ``stem``                output of ``conv1`` (16 px on 32x32 input);
* ``stage1..stage4``      outputs of ``blocks.1``, ``blocks.2``, ``blocks.4``, ``blocks.6``:
                          RepDistiller's f1..f4 (16, 8, 4, 2 px on 32x32 input);
* ``stage1..4_pre``       the same tensors: MobileNetV2 blocks end in a *linear*
                          bottleneck (no ReLU), so there is no pre-/post-ReLU difference
                          (RepDistiller's ``preact`` also returns them unchanged);
* ``stage5``              output of the 1x1 head conv (post-ReLU, 1280 channels);
* ``stage5_pre``          the head's BN output, before its ReLU;
* ``pool``                input of ``classifier``.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import init_weights
from .registry import register_model
from .taps import TapPoint

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(),
    )


class InvertedResidual(nn.Module):
    """pw-expand / dw3x3 / pw-linear, with identity residual when stride 1 and in == out."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        assert stride in (1, 2)
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for small inputs; ``expand`` is the expansion ratio T, ``width_mult`` the width."""

    # t (expansion; None = use `expand`), c (channels), n (blocks), s (first stride)
    SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
               (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
    STAGE_BLOCKS = (1, 2, 4, 6)

    def __init__(self, in_channels: int = 3, num_classes: int = 100, expand: int = 6,
                 width_mult: float = 0.5) -> None:
        super().__init__()
        channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTING:
            out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(channel, out, s if i == 0 else 1, expand if t is None else t))
                channel = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    def tap_points(self) -> dict[str, TapPoint]:
        """stem, stage1..4 (= _pre: linear bottlenecks), stage5 head conv (+ _pre), pool."""
        points = {"stem": TapPoint("conv1")}
        for k, b in enumerate(self.STAGE_BLOCKS, start=1):
            points[f"stage{k}"] = TapPoint(f"blocks.{b}")
            points[f"stage{k}_pre"] = TapPoint(f"blocks.{b}")
        points["stage5"] = TapPoint("conv2")
        points["stage5_pre"] = TapPoint("conv2.2", "input")
        points["pool"] = TapPoint("classifier", "input")
        return points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        x = self.conv2(x)
        return self.classifier(self.flatten(self.avgpool(x)))


@register_model("mobilenetv2")
def mobilenetv2(in_channels: int = 3, num_classes: int = 100, **kw) -> MobileNetV2:
    """RepDistiller's ``mobile_half`` (T=6, width 0.5); pass ``width_mult``/``expand`` to change."""
    return MobileNetV2(in_channels, num_classes, **kw)
