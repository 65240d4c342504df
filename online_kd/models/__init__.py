"""Model zoo of the distillation literature (RepDistiller's CIFAR nets, small nets, torchvision) with named taps.

``build_model(name, in_channels, num_classes)`` builds a registered model or a
``torchvision:NAME`` one; :class:`TappedModel` returns ``{tap: tensor}`` for the requested
taps (see :mod:`online_kd.models.taps` for tap names).
"""
from __future__ import annotations

from torch import nn

# Importing the family modules registers their models.
from . import mobilenetv2, resnet, shufflenet, small, vgg, wrn  # noqa: F401
from . import preact_resnet, resnet_noskip, resnet_zeropad  # noqa: F401
from . import aux  # noqa: F401  (HSAKD '<name>_aux' models; after the families it wraps)
from .registry import MODELS, get_factory, register_model
from .taps import (
    LOGITS,
    MODULE_PREFIX,
    TapPoint,
    TappedModel,
    available_taps,
    resolve_tap,
    tap_points,
)
from .torchvision_models import PREFIX as TORCHVISION_PREFIX
from .torchvision_models import build_torchvision_model, is_torchvision_name

__all__ = [
    "build_model",
    "model_names",
    "is_known_model",
    "available_taps",
    "tap_points",
    "resolve_tap",
    "TappedModel",
    "TapPoint",
    "register_model",
    "LOGITS",
    "MODULE_PREFIX",
    "TORCHVISION_PREFIX",
]


def build_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` (registered, or ``torchvision:NAME``) for ``in_channels`` inputs and ``num_classes``.

    Extra ``kwargs`` go to the model's constructor.  KeyError(name) if the name is unknown.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return build_torchvision_model(name, in_channels, num_classes, **kwargs)
    return get_factory(name)(in_channels=in_channels, num_classes=num_classes, **kwargs)


def model_names() -> list[str]:
    """All registered model names (torchvision ones not listed), sorted."""
    return sorted(MODELS)


def is_known_model(name: str) -> bool:
    """True if ``name`` is registered or is ``torchvision:X`` for a torchvision classification model X."""
    return name in MODELS or is_torchvision_name(name)
