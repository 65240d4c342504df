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


#: the entry-point group that names the engines (pyproject.toml: ``[project.entry-points."online_kd.engines"]``)
ENGINE_GROUP = "online_kd.engines"
_loaded: list[bool] = []


def engines() -> dict[str, type]:
    """Every engine by its ``engine.name``. Engines are plugins: each is declared as an entry point of
    :data:`ENGINE_GROUP` and loaded on first use, so validation can ask an engine what it runs while
    nothing below the engines imports them (an engine of another package registers the same way)."""
    if not _loaded:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENGINE_GROUP):
            if ep.name not in ENGINES:
                ENGINES[ep.name] = ep.load()  # importing it registers it (register_engine) as well
        _loaded.append(True)
    return ENGINES
