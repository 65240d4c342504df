"""The contract of a data-producing stage, and the data set it produces.

A producing stage runs between two training stages, reads the peers as they are at that
point (a frozen teacher, the student trained so far) and returns a :class:`ProducedSet`.
The engine saves the set in the run directory (atomically, with its recipe), so a resumed
run reloads it instead of producing it again, and a later training stage trains on it
(``data: <stage name>``).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ..data.datasets import TensorDataset
from ..finite import FiniteModel


class StageParams(FiniteModel):
    """Base of a stage kind's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ProducedSet:
    """A data set made by a stage: normalised images, labels, the recipe that made it.

    ``answers`` holds, per peer, answers recorded while producing (e.g. a black-box
    teacher's probabilities ``[N, C]``), so training on the set does not query it again.
    ``augment`` says whether training applies the topology's augmentation to it.
    ``provenance`` keeps tensors on how the set was made (e.g. which pool images each mix is made
    of), so a later stage can extend it; the JSON ``recipe`` stays small.
    """

    x: Tensor                      # [N, C, H, W] float32, already normalised
    y: Tensor                      # [N] int64
    recipe: dict[str, Any]
    answers: dict[str, Tensor] = field(default_factory=dict)
    augment: bool = False
    provenance: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)

    def dataset(self) -> TensorDataset:
        """The set as a training split (identity normalisation: the images are stored normalised)."""
        ds = TensorDataset(self.x, self.y, [0.0], [1.0])
        ds.answers = self.answers
        return ds

    def save(self, path: Path) -> None:
        """Write atomically: a crash never leaves a half-written set that a resume would trust."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"x": self.x, "y": self.y, "answers": self.answers, "augment": self.augment,
                    "recipe": json.dumps(self.recipe, sort_keys=True), "provenance": self.provenance}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "ProducedSet":
        d = torch.load(path, weights_only=True)
        return cls(d["x"], d["y"], json.loads(d["recipe"]), dict(d["answers"]), bool(d["augment"]),
                   dict(d.get("provenance", {})))


@dataclass
class ProduceContext:
    """What a producing stage may use: the live runtime (peers), the loaded data, earlier sets."""

    runtime: Any                     # engine.runtime.Runtime holding every peer
    data: Any                        # data.DataBundle of the topology's data set
    topology: Any
    out_dir: Path
    seed: int
    produced: Mapping[str, ProducedSet]
    progress: Callable[[str, int], Any]  # progress(description, total) -> context manager with .advance(n=1)
    log: Callable[[str], None] = lambda message: None  # one line for the run's console (e.g. a cache hit)


class StageKind:
    """A registered producing stage. ``Params`` validates its YAML keys; ``run`` makes the set."""

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = StageParams
    # parameters that may name a black-box peer: the kind only asks it for probabilities (runtime.query)
    blackbox_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel, stage_name: str):
        self.params, self.stage_name = params, stage_name

    def reads(self) -> dict[str, str]:
        """Peers the stage reads, by parameter name (e.g. {'teacher': 'net'}), for validation."""
        return {}

    def check(self, topology, origin: str) -> None:
        """Further checks against the topology; raise TopologyError(place, message)."""

    def run(self, ctx: ProduceContext) -> ProducedSet:
        raise NotImplementedError


class _NullProgress:
    def advance(self, n: int = 1) -> None:
        pass


@contextmanager
def no_progress(description: str, total: int) -> Iterator[_NullProgress]:
    """A progress sink for callers that show none (tests)."""
    yield _NullProgress()
