"""Engines run a topology: ``local`` (one process) and ``ray`` (a Ray Train worker per peer)."""
from __future__ import annotations

from ..registry import engines


def get_engine(name: str) -> type:
    """The engine class for ``engine.name`` (the engines are entry points: see online_kd.registry.engines)."""
    return engines()[name]
