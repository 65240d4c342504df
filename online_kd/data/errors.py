"""The one error this package raises for data a run cannot load."""
from __future__ import annotations

from ..errors import TopologyError


class DataError(TopologyError):
    """Data missing or unusable, reported as ``data.<key>: what is wrong (what to do)``.

    A ``ValueError`` (through ``TopologyError``) so that the CLI and the topology
    validator show it like any other mistake in the YAML.
    """
