"""Registries: a loss, an ensemble combiner or a virtual teacher registers itself by its YAML name."""
from __future__ import annotations

from ..registry import registrar

LOSSES: dict[str, type] = {}
COMBINERS: dict[str, type] = {}
VIRTUAL_TEACHERS: dict[str, type] = {}
_register_loss = registrar(LOSSES, "loss")
_register_combiner = registrar(COMBINERS, "combiner")
_register_virtual = registrar(VIRTUAL_TEACHERS, "virtual teacher")


def register_loss(name: str):
    """Class decorator: the edge loss used by ``loss: <name>``."""
    return _register_loss(name)


def register_combiner(name: str):
    """Class decorator: the ensemble combiner used by ``combine: <name>``."""
    return _register_combiner(name)


def register_virtual(name: str):
    """Class decorator: the virtual teacher used by ``kind: <name>``."""
    return _register_virtual(name)
