"""The registry of stage kinds: a data-producing stage registers itself by its YAML ``kind``."""
from __future__ import annotations

from ..registry import registrar

STAGE_KINDS: dict[str, type] = {}
_register = registrar(STAGE_KINDS, "stage kind", reserved=("train",))


def register_stage_kind(name: str):
    """Class decorator: the producing stage used by ``stages[i].kind: <name>``."""
    return _register(name)
