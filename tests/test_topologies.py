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
    assert plan.shapes and (topo.edges or path.parent.name == "teachers")  # a teacher trains alone
    for e in topo.edges:
        assert e.source in topo.nodes and e.target in topo.config.peers


def test_quick_topologies_use_digits():
    for path in ALL:
        if path.parent.name == "quick":
            assert load_topology(path).config.data.dataset == "digits", path


QUICK = sorted((ROOT / "topologies" / "quick").glob("*.yaml"))


@pytest.mark.parametrize("path", QUICK, ids=[p.stem for p in QUICK])
def test_quick_topology_runs_one_epoch(path, tmp_path):
    """Every quick YAML trains: one epoch of two steps per training stage, producing stages as written."""
    import yaml

    from online_kd.engine.local import LocalEngine
    from online_kd.engine.options import RunOptions

    raw = yaml.safe_load(path.read_text())
    overrides = {"train.epochs": 1, "train.max_steps_per_epoch": 2, "tracking.enabled": False}
    for i, stage in enumerate(raw.get("stages", [])):
        if stage.get("kind", "train") == "train" and "epochs" in stage:
            overrides[f"stages[{i}].epochs"] = 1
    topo = load_topology(raw, overrides)
    summary = LocalEngine(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"] and summary["epochs"] == len(topo.stages)
    trained = {p for s in topo.stages for p in s.train}
    assert trained <= set(summary["peers"]), summary
