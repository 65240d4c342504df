"""Small helpers shared by the model families (weight init)."""
from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """RepDistiller-style init: He-normal (fan_out) convs with zero bias, BN to (1, 0).

    Linear layers get N(0, linear_std) weights and zero bias when ``linear_std`` is
    given, otherwise only their bias is zeroed.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
