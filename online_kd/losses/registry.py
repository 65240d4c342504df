"""Registries: a loss, an ensemble combiner or a virtual teacher registers itself by its YAML name."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

LOSSES: dict[str, type] = {}
COMBINERS: dict[str, type] = {}
VIRTUAL_TEACHERS: dict[str, type] = {}


def _register(table: dict[str, type], name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        if name in table:
            raise ValueError(f"'{name}' is registered twice ({table[name].__module__} and {cls.__module__})")
        table[name] = cls
        cls.name = name
        return cls

    return deco


def register_loss(name: str):
    """Class decorator: the edge loss used by ``loss: <name>``."""
    return _register(LOSSES, name)


def register_combiner(name: str):
    """Class decorator: the ensemble combiner used by ``combine: <name>``."""
    return _register(COMBINERS, name)


def register_virtual(name: str):
    """Class decorator: the virtual teacher used by ``kind: <name>``."""
    return _register(VIRTUAL_TEACHERS, name)
