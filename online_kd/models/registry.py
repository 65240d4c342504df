"""Model registry: a model family registers each named factory with ``@register_model("name")``."""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

#: name -> factory(in_channels, num_classes, **kwargs) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator: register a factory ``f(in_channels, num_classes, **kwargs)`` under ``name``.

    Adding a model to the zoo is one decorated function in one family file.
    """

    def deco(factory: F) -> F:
        if name in MODELS:
            raise ValueError(
                f"model '{name}' is registered twice "
                f"({MODELS[name].__module__} and {factory.__module__})"
            )
        MODELS[name] = factory
        return factory

    return deco


def get_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name``; KeyError(name) if there is none."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(name) from None
