"""The pieces the engines share: the run directory's history, the engine registry and contract, the
exchange's routes as `plan` shows them, and the epoch loop's per-step hook."""
import json
from pathlib import Path

import pytest

from online_kd.cli import wire_routes
from online_kd.engine.exchange import Exchange, placement
from online_kd.engine.local import LocalEngine, LocalLoop
from online_kd.engine.options import RunOptions
from online_kd.engine.ray import RayEngine
from online_kd.errors import TopologyError
from online_kd.registry import engines
from online_kd.rundir import RunDir, accuracy_series
from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

QUICK = Path(__file__).resolve().parents[1] / "topologies" / "quick"


def _rec(epoch, top1):
    return json.dumps({"epoch": epoch, "stage": "s", "seconds": 1.0, "nodes": {"a": {"top1": top1}, "b": {"loss": 1.0}}})


def test_history_has_one_record_per_epoch_the_last_one_and_skips_a_line_being_written(tmp_path):
    run = RunDir(tmp_path)
    assert run.history() == [] and not run.has_checkpoint() and run.read_summary() is None
    run.metrics.write_text("\n".join([_rec(1, 10.0), _rec(2, 20.0), _rec(2, 25.0), _rec(3, 30.0)]) + "\n"
                           + _rec(4, 40.0)[:12])
    history = run.history()
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["nodes"]["a"]["top1"] == 25.0  # the epoch re-run after a restart keeps its last record
    assert len(run.records()) == 4
    assert accuracy_series(history) == {"a": [(1, 10.0), (2, 25.0), (3, 30.0)]}


def test_engines_are_registered_and_validation_asks_the_named_one():
    assert engines()["local"] is LocalEngine and engines()["ray"] is RayEngine
    with pytest.raises(TopologyError) as err:
        load_topology(QUICK / "kd.yaml", {"engine.name": "rey"})
    assert str(err.value) == "engine.name: unknown engine 'rey' (did you mean ray?)"
    topo = load_topology(QUICK / "dml.yaml", {"engine.name": "ray", "peers.a.replicas": 2, "peers.b.replicas": 2,
                                              "engine.resources_per_worker": {"CPU": 2}})
    assert RayEngine.resources(topo).cpus == 4 * 2 + 1  # a worker per peer replica, and the driver
    assert LocalEngine.resources(topo).cpus == 1


@pytest.mark.parametrize("name", ["ofd", "dml"])
def test_plan_shows_the_routes_the_exchange_takes(name):
    """`plan`'s crossing transfers are exactly the routes a worker's exchange sets up (replica 0)."""
    topo = load_topology(QUICK / f"{name}.yaml")
    plan = build_plan(topo)
    workers = placement(topo)
    for stage in topo.stages:
        shown = {(tr.source, tr.tap, route) for tr, route, size in wire_routes(topo, plan, stage.name) if size}
        taken = set()
        for me in workers:
            ex = Exchange(topo, plan, workers, me, None, "cpu", None)
            ex.enter_stage(stage)
            taken |= {(r.peer, r.tap, f"{r.src} → {r.dst}") for r in ex.routes}
        assert shown == taken


def test_the_loop_calls_its_step_hook_once_per_step(tmp_path):
    topo = load_topology(QUICK / "kd.yaml", {"train.epochs": 1, "train.max_steps_per_epoch": 2,
                                             "tracking.enabled": False})
    steps = []

    class Counting(LocalLoop):
        def on_step(self, result):
            super().on_step(result)
            steps.append((self.rt.global_step, sorted(result.terms)))

    loop = Counting(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True))
    assert loop.run() is True
    assert [s for s, _ in steps] == list(range(1, 2 * topo.total_epochs + 1))
    assert len(RunDir(tmp_path).history()) == topo.total_epochs


# The layers, lowest first: a module may import its own layer and the layers below, never one above.
LAYERS = [
    ["errors.py", "finite.py", "registry.py", "rundir.py", "tracking.py", "plot.py", "models"],
    ["data", "compare.py"],
    ["losses"],
    ["build.py"],
    ["stages"],
    ["topology"],
    ["engine"],
    ["tune"],
    ["cli.py"],
]


def _layer_of(parts: tuple[str, ...]) -> int | None:
    for i, layer in enumerate(LAYERS):
        if parts[0] in layer or f"{parts[0]}.py" in layer:
            return i
    return None


def _imports(path, package_parts):
    """online_kd modules that ``path`` imports (absolute or relative), as path parts under online_kd/."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                mod = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("online_kd."):
                mod = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            yield from ([*mod, n] for n in names) if not node.module else [mod]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("online_kd."):
                    yield a.name.split(".")[1:]


def test_no_module_imports_a_layer_above_its_own():
    """Engines are entry points (online_kd.registry.engines), so nothing below them imports them, and the
    topology, losses, stages and factories stay below the engines (lazy imports inside functions count too)."""
    import online_kd

    root = Path(online_kd.__file__).parent
    upward = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        mine = _layer_of(rel)
        for target in _imports(path, rel[:-1]):
            if not target:
                continue
            theirs = _layer_of(tuple(target))
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{'/'.join(rel)} -> {'.'.join(target)}")
    assert upward == []


def test_no_import_cycle_between_modules():
    """No two modules import each other, directly or through others (lazy imports inside functions count)."""
    import online_kd

    root = Path(online_kd.__file__).parent

    def file_of(parts):
        while parts:
            for cand in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
                if cand.is_file():
                    return cand
            parts = parts[:-1]
        return None

    graph = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        targets = {file_of(list(t)) for t in _imports(path, rel[:-1])}
        graph[path] = {t for t in targets if t is not None and t != path}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(str(p.relative_to(root)) for p in stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
    assert cycles == []
