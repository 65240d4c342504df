"""What every engine shares before its loop starts: run options, seeding, stage lookup, init checks."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import TopologyError
from ..topology.graph import Topology


@dataclass
class RunOptions:
    """How to run a topology, beyond the YAML: where, whether to resume, tracking."""

    out_dir: Path
    resume: bool = False
    stop_after_epochs: int | None = None
    tracking_uri: str | None = None
    tracking: bool = True
    quiet: bool = False
    verbose: bool = False  # ray engine: Ray's and Ray Train's own output too (forwarded worker logs, INFO lines)
    extra_tags: dict[str, str] = field(default_factory=dict)
    record_steps: bool = False  # write each step's per-peer loss to <out>/steps/ (engine equivalence checks)
    profile: bool = False       # ray engine: time compute, waiting and exchange per step into <out>/profile/
    parent_run_id: str | None = None  # MLflow run (a sweep or seed group) to nest this run's parent run under
    extra_params: dict[str, Any] = field(default_factory=dict)  # more MLflow params (a trial's overridden paths)
    on_epoch: Callable[[int, dict], None] | None = None  # called with (epoch, node metrics) after each epoch (Tune)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def stage_at(topology: Topology, epoch: int) -> tuple[int, int]:
    """(stage index, epoch within that stage) of a global epoch."""
    start = 0
    for i, s in enumerate(topology.stages):
        if epoch < start + s.epochs:
            return i, epoch - start
        start += s.epochs
    raise IndexError(epoch)


def check_inits(topology: Topology) -> None:
    """Every ``init`` checkpoint exists before anything starts."""
    for name, p in topology.config.peers.items():
        if p.init and not Path(p.init).expanduser().is_file():
            raise TopologyError(f"peers.{name}.init", f"no such checkpoint file '{p.init}'")
