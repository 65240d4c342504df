"""Distillation losses, ensemble combiners and virtual teachers, each registered by YAML name.

Every module of this package is imported here, so a new method is one new file.
"""
import importlib
import pkgutil

from .base import EdgeContext, EdgeLoss, Needs, Params, kl_div
from .registry import COMBINERS, LOSSES, VIRTUAL_TEACHERS, register_combiner, register_loss, register_virtual

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["EdgeContext", "EdgeLoss", "Needs", "Params", "kl_div", "LOSSES", "COMBINERS", "VIRTUAL_TEACHERS",
           "register_loss", "register_combiner", "register_virtual"]
