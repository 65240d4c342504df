"""Every YAML under topologies/ loads, checks and dry-runs; the quick ones are small enough for CI."""
from pathlib import Path

import pytest

from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
ALL = sorted((ROOT / "topologies").rglob("*.yaml"))


@pytest.mark.parametrize("path", ALL, ids=[str(p.relative_to(ROOT / "topologies")) for p in ALL])
def test_topology_validates(path):
    topo = load_topology(path)
    plan = build_plan(topo)
    assert plan.shapes and topo.edges
    for e in topo.edges:
        assert e.source in topo.nodes and e.target in topo.config.peers


def test_quick_topologies_use_digits():
    for path in ALL:
        if path.parent.name == "quick":
            assert load_topology(path).config.data.dataset == "digits", path
