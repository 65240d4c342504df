"""One registry mechanism for every YAML-named family (losses, combiners, virtual teachers, view
expansions, synthesis objectives, stage kinds): a class registers itself under the name a YAML uses."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def registrar(table: dict[str, type], what: str, reserved: tuple[str, ...] = ()) -> Callable[[str], Callable[[T], T]]:
    """``register(name)`` decorators for ``table``: each class is stored under ``name`` and gets ``cls.name``."""

    def register(name: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            if name in reserved:
                raise ValueError(f"{what} '{name}' is reserved")
            if name in table:
                raise ValueError(f"{what} '{name}' is registered twice ({table[name].__module__} and {cls.__module__})")
            table[name] = cls
            cls.name = name
            return cls

        return deco

    return register


ENGINES: dict[str, type] = {}
register_engine = registrar(ENGINES, "engine")


def engines() -> dict[str, type]:
    """Every engine by its ``engine.name``; the built-in ones (online_kd.engine) register on first use,
    so validation can ask an engine what it runs without the topology layer importing the engines."""
    if not ENGINES:
        import importlib

        importlib.import_module("online_kd.engine")
    return ENGINES
