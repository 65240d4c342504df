"""``torchvision:NAME`` models: torchvision classification architectures, untrained, any in_channels.

Taps are the generic ones (see :mod:`.taps`): ``pool`` = input of the last ``nn.Linear``
(flattened), ``stage1..4`` = ``layer1..4`` outputs for ResNet-like models, ``logits``,
and ``module:<path>``.
"""
from __future__ import annotations

from functools import lru_cache

from torch import nn

PREFIX = "torchvision:"


@lru_cache(maxsize=1)
def torchvision_names() -> tuple[str, ...]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    import torchvision.models

    return tuple(torchvision.models.list_models(module=torchvision.models))


def is_torchvision_name(name: str) -> bool:
    """True for ``torchvision:X`` where X is a torchvision classification model."""
    return name.startswith(PREFIX) and name[len(PREFIX):] in torchvision_names()


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the model's first ``nn.Conv2d`` for one with ``in_channels`` inputs (other args kept)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            groups = module.groups if module.groups == 1 or in_channels % module.groups == 0 else 1
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=groups,
                bias=module.bias is not None, padding_mode=module.padding_mode,
            )
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path), child, new)
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} input channels")


def build_torchvision_model(name: str, in_channels: int, num_classes: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(NAME, weights=None, num_classes=...)``; first conv adapted to in_channels.

    ``name`` is ``torchvision:NAME``; KeyError(name) if NAME is not a torchvision classification model.
    """
    import torchvision.models

    if not is_torchvision_name(name):
        raise KeyError(name)
    model = torchvision.models.get_model(name[len(PREFIX):], weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model
