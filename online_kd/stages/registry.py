"""The registry of stage kinds: a data-producing stage registers itself by its YAML ``kind``."""
from __future__ import annotations

STAGE_KINDS: dict[str, type] = {}


def register_stage_kind(name: str):
    """Class decorator: the producing stage used by ``stages[i].kind: <name>``."""

    def deco(cls):
        if name in STAGE_KINDS or name == "train":
            raise ValueError(f"stage kind '{name}' is registered twice or reserved")
        STAGE_KINDS[name] = cls
        cls.name = name
        return cls

    return deco
