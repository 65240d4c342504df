"""Stage kinds that produce data sets (data-free synthesis, active labelling), registered by YAML ``kind``.

Every module of this package is imported here, so a new kind is one new file.
"""
import importlib
import pkgutil

from .base import ProduceContext, ProducedSet, StageKind, StageParams, no_progress
from .registry import STAGE_KINDS, register_stage_kind

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["ProduceContext", "ProducedSet", "StageKind", "StageParams", "STAGE_KINDS", "no_progress",
           "register_stage_kind"]
