"""Topology: the YAML schema, its loading and checks, and the derived exchange plan."""
from .graph import Edge, Stage, Topology
from .load import apply_overrides, load_topology, parse_override, set_path

__all__ = ["Edge", "Stage", "Topology", "load_topology", "apply_overrides", "parse_override", "set_path"]
