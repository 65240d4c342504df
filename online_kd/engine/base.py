"""The engine contract: what validation, the CLI and Tune ask of an engine; an engine is one file that
subclasses :class:`Engine` and registers it (``@register_engine("name")``, online_kd/registry.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..topology.graph import Topology


@dataclass(frozen=True)
class Resources:
    """What one run occupies: ``driver``, the Ray resources of the process that calls ``run()`` (a Tune
    trial); ``cpus``, the CPUs of the whole run (its workers too)."""

    driver: dict[str, float]
    cpus: float


class Engine:
    """Runs a topology. ``epochs_in_process``: ``options.on_epoch`` is called in the process that calls
    ``run()`` (else the epochs are read back from the run directory's metrics.jsonl)."""

    name: str
    epochs_in_process = True

    def __init__(self, topology: Topology, options):
        self.topology, self.opt = topology, options

    @classmethod
    def check(cls, topology: Topology) -> None:
        """Raise TopologyError on what this engine cannot run (called by topology validation)."""

    @classmethod
    def resources(cls, topology: Topology) -> Resources:
        """What one run of ``topology`` occupies."""
        return Resources({"CPU": 1}, 1)

    def run(self) -> dict[str, Any]:
        """Train; the summary (``finished`` false when stopped early)."""
        raise NotImplementedError
