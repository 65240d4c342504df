"""Engines run a topology: ``local`` (one process) and ``ray`` (a Ray Train worker per peer)."""
from __future__ import annotations

from typing import Callable


def get_engine(name: str) -> Callable:
    """The engine class for ``engine.name``."""
    if name == "local":
        from .local import LocalEngine

        return LocalEngine
    if name == "ray":
        from .ray import RayEngine

        return RayEngine
    raise KeyError(name)
