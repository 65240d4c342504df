"""Engines run a topology: ``local`` (one process) and ``ray`` (a Ray Train worker per peer)."""
from __future__ import annotations

from ..registry import ENGINES
from . import local, ray  # noqa: F401 - register the built-in engines


def get_engine(name: str) -> type:
    """The engine class for ``engine.name``."""
    return ENGINES[name]
