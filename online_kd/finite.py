"""The base of every parameter model: a float must be a finite number.

``inf``, ``nan`` and strings such as ``'1e999'`` validate as floats in pydantic by default and
make a run diverge at its first step. Every schema section and every ``Params`` model (losses,
combiners, virtual teachers, stage kinds, search spaces) derives from :class:`FiniteModel`; a
field that means to accept them says so with ``Field(allow_inf_nan=True)``.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FiniteModel(BaseModel):
    """A pydantic model whose floats (also inside lists, tuples and mappings) must be finite."""

    model_config = ConfigDict(allow_inf_nan=False)
