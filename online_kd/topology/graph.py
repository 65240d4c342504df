"""The loaded topology as a graph: nodes, expanded edges and ordered stages."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import yaml

from ..errors import TopologyError
from .schema import TopologyConfig, WeightSchedule


@dataclass(frozen=True)
class Edge:
    """One expanded distillation edge; ``origin`` is the YAML entry it came from."""

    index: int
    origin: str
    source: str
    target: str
    loss: str
    weight: float
    schedule: WeightSchedule
    until_epoch: int | None
    params: dict[str, Any] = field(default_factory=dict)
    pattern: str | None = None
    name: str | None = None
    link: int | None = None  # its index in the chain entry's ``links`` (per-link parameters), if any

    @property
    def key(self) -> str:
        """A stable name for the edge's modules and metrics: 'loss:source->target'."""
        return f"{self.loss}:{self.source}->{self.target}"

    def weight_at(self, epoch_in_stage: int) -> float:
        """The scheduled weight in a stage's epoch (0-indexed, relative to the stage start)."""
        if self.until_epoch is not None and epoch_in_stage >= self.until_epoch:
            return 0.0
        s = self.schedule
        if s.name == "linear_warmup" and s.epochs > 0:
            return self.weight * min(1.0, epoch_in_stage / s.epochs)  # ReviewKD: 0 in the first epoch
        if s.name == "step":
            return self.weight * s.gamma ** sum(epoch_in_stage >= m for m in s.milestones)
        if s.name == "exponential":  # e.g. info-flow's critical-period decay w·γ^epoch
            return self.weight * s.gamma ** epoch_in_stage
        return self.weight


@dataclass(frozen=True)
class Stage:
    """A training phase in execution order."""

    name: str
    train: tuple[str, ...]
    epochs: int
    origin: str
    edges: tuple[str, ...] | None = None
    task_weight: float | None = None
    data: str | None = None            # the producing stage whose data set it trains on
    freeze_bn: tuple[str, ...] = ()    # trained peers whose BN statistics stay fixed
    hand_over: str = "last"            # 'best': trained peers leave the stage with their best-epoch weights


@dataclass(frozen=True)
class ProducerStage:
    """A stage that makes a data set (``kind`` ≠ train) before training stage number ``before`` starts."""

    name: str
    kind: str
    params: dict[str, Any]
    origin: str
    before: int


@dataclass
class Topology:
    """A validated topology: the schema object plus what is derived from it."""

    config: TopologyConfig
    edges: list[Edge]
    raw: dict

    @property
    def name(self) -> str:
        return self.config.name

    def kind(self, node: str) -> str | None:
        """'peer', 'ensemble', 'virtual' or None."""
        c = self.config
        return "peer" if node in c.peers else "ensemble" if node in c.ensembles else "virtual" if node in c.virtual else None

    @property
    def nodes(self) -> list[str]:
        c = self.config
        return [*c.peers, *c.ensembles, *c.virtual]

    @cached_property
    def _resolved(self) -> tuple[list[Stage], list[ProducerStage]]:
        return resolve_stages(self.config)

    @property
    def stages(self) -> list[Stage]:
        """The training stages in execution order."""
        return self._resolved[0]

    @property
    def producers(self) -> list[ProducerStage]:
        """The data-producing stages in execution order, each placed before a training stage."""
        return self._resolved[1]

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def peer_sources(self, node: str) -> set[str]:
        """The peers whose outputs a node's output is made of (itself, or an ensemble's members)."""
        k = self.kind(node)
        if k == "peer":
            return {node}
        if k == "ensemble":
            return set().union(*(self.peer_sources(m) for m in self.config.ensembles[node].members))
        return set()

    def trained_stage(self, peer: str) -> int | None:
        """Index of the first stage that trains ``peer``."""
        return next((i for i, s in enumerate(self.stages) if peer in s.train), None)

    def to_yaml(self) -> str:
        """The topology as run: overrides applied, patterns expanded, defaults filled in.

        It loads again as the same topology; where each edge came from in the original YAML
        is a comment at the top.
        """
        data = self.config.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["edges"] = [
            {"from": e.source, "to": e.target, "loss": e.loss, "weight": e.weight,
             **({"schedule": e.schedule.model_dump()} if e.schedule.name != "constant" else {}),
             **({"until_epoch": e.until_epoch} if e.until_epoch is not None else {}),
             **e.params}
            for e in self.edges
        ]
        data["stages"] = [self._stage_yaml(s) for s in self.stages]
        for p in self.producers:
            data["stages"].insert(p.before + self.producers.index(p),
                                  {"name": p.name, "kind": p.kind, **p.params})
        origins = "".join(f"#   edges[{e.index}] {e.source}->{e.target}: from {e.origin}"
                          f"{f' ({e.pattern})' if e.pattern else ''}\n" for e in self.edges)
        header = f"# topology {self.name!r} as run (patterns expanded, defaults filled in)\n"
        return header + (f"# edges:\n{origins}" if origins else "") + yaml.safe_dump(data, sort_keys=False)

    @staticmethod
    def _stage_yaml(s: Stage) -> dict:
        out: dict[str, Any] = {"name": s.name, "train": list(s.train), "epochs": s.epochs}
        if s.edges is not None:
            out["edges"] = list(s.edges)
        if s.task_weight is not None:
            out["task_weight"] = s.task_weight
        if s.data:
            out["data"] = s.data
        if s.freeze_bn:
            out["freeze_bn"] = list(s.freeze_bn)
        if s.hand_over != "last":
            out["hand_over"] = s.hand_over
        return out

    def graph_spec(self) -> tuple[list[dict], list[dict]]:
        """Nodes and edges in the form :func:`online_kd.plot.draw_topology` takes."""
        c = self.config
        nodes = [{"name": n, "kind": "peer", "label": p.model, "frozen": p.frozen or self.trained_stage(n) is None}
                 for n, p in c.peers.items()]
        nodes += [{"name": n, "kind": "ensemble", "label": e.combine, "frozen": False} for n, e in c.ensembles.items()]
        nodes += [{"name": n, "kind": "virtual", "label": v.kind, "frozen": False} for n, v in c.virtual.items()]
        edges = [{"source": e.source, "target": e.target, "loss": e.loss,
                  "label": e.loss + (f" w={e.weight:g}" if e.weight != 1 else "")} for e in self.edges]
        for n, e in c.ensembles.items():
            edges += [{"source": m, "target": n, "loss": "member", "label": "member"} for m in e.members]
        return nodes, edges


def resolve_stages(config: TopologyConfig) -> tuple[list[Stage], list[ProducerStage]]:
    """Training and producing stages in execution order (YAML order, moved only by ``after``).

    With no ``stages`` there is one implicit training stage of every unfrozen peer."""
    if not config.stages:
        train = tuple(n for n, p in config.peers.items() if not p.frozen)
        return [Stage(name="train", train=train, epochs=config.train.epochs, origin="train")], []
    named = {}
    for i, s in enumerate(config.stages):
        name = s.name or f"stage{i + 1}"
        if name in named:
            raise TopologyError(f"stages[{i}].name", f"duplicate stage name '{name}'")
        named[name] = (i, s)
    for name, (i, s) in named.items():
        for dep in s.after:
            if dep not in named:
                raise TopologyError(f"stages[{i}].after", f"unknown stage '{dep}' (stages: {', '.join(named)})")
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cyc = path[path.index(name):] + (name,)
            i = named[cyc[0]][0]
            raise TopologyError(f"stages[{i}].after", "stages depend on each other in a cycle: " + " → ".join(cyc))
        state[name] = 1
        for dep in named[name][1].after:
            visit(dep, path + (name,))
        state[name] = 2
        order.append(name)

    for name in named:
        visit(name, ())
    stages: list[Stage] = []
    producers: list[ProducerStage] = []
    for n in order:
        i, s = named[n]
        if s.kind != "train":
            producers.append(ProducerStage(name=n, kind=s.kind, params=s.extras(), origin=f"stages[{i}]",
                                           before=len(stages)))
            continue
        stages.append(Stage(name=n, train=tuple(s.train), epochs=s.epochs or config.train.epochs, origin=f"stages[{i}]",
                            edges=tuple(s.edges) if s.edges is not None else None, task_weight=s.task_weight,
                            data=s.data, freeze_bn=tuple(s.freeze_bn), hand_over=s.hand_over))
    return stages, producers
