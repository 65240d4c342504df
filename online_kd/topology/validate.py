"""Checks that need more than the schema: names, registries, stages, who can learn from whom."""
from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from ..errors import TopologyError, suggest
from .graph import Topology


def validate_params(cls: type[BaseModel], params: Mapping[str, Any], where: str) -> BaseModel:
    """A class's ``Params`` from YAML keys, errors placed under ``where``."""
    try:
        return cls.model_validate(dict(params))
    except ValidationError as err:
        e = err.errors()[0]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(cls.model_fields) or "none"
            msg = f"unknown parameter for this kind (allowed: {allowed})"
        else:
            msg = e["msg"] + (f" (got {e['input']!r})" if not isinstance(e.get("input"), (dict, list)) else "")
        raise TopologyError(f"{where}.{key}" if key else where, msg) from None


def check_topology(topology: Topology) -> None:
    """Raise the first TopologyError found, in YAML order."""
    from ..losses import COMBINERS, LOSSES, VIRTUAL_TEACHERS
    from ..models import is_known_model, model_names

    c = topology.config
    seen: dict[str, str] = {}
    for section in ("peers", "ensembles", "virtual"):
        for name in getattr(c, section):
            if name in seen:
                raise TopologyError(f"{section}.{name}", f"the name is already used in {seen[name]}")
            seen[name] = section
    nodes_hint = _nodes_hint(topology)

    for name, peer in c.peers.items():
        if not is_known_model(peer.model):
            raise TopologyError(f"peers.{name}.model", suggest(peer.model, model_names(), "model"))
        if peer.frozen and not peer.init:
            raise TopologyError(f"peers.{name}.frozen", "a frozen peer needs 'init' (a checkpoint to load)")

    for name, ens in c.ensembles.items():
        for i, m in enumerate(ens.members):
            if topology.kind(m) != "peer":
                raise TopologyError(f"ensembles.{name}.members[{i}]", f"unknown peer '{m}' (peers: {', '.join(c.peers)})")
        if ens.combine not in COMBINERS:
            raise TopologyError(f"ensembles.{name}.combine", suggest(ens.combine, COMBINERS, "combiner"))
        comb = COMBINERS[ens.combine]
        params = validate_params(comb.Params, ens.extras(), f"ensembles.{name}")
        if "refit_every" in type(params).model_fields and c.data.holdout <= 0:
            raise TopologyError(f"ensembles.{name}.combine",
                                f"'{ens.combine}' refits on a held-out split: set data.holdout (e.g. 0.1)")

    for name, v in c.virtual.items():
        if v.kind not in VIRTUAL_TEACHERS:
            raise TopologyError(f"virtual.{name}.kind", suggest(v.kind, VIRTUAL_TEACHERS, "virtual teacher"))
        validate_params(VIRTUAL_TEACHERS[v.kind].Params, v.extras(), f"virtual.{name}")

    stages = topology.stages  # raises for unknown/cyclic 'after'
    for s in stages:
        if not s.train:
            raise TopologyError(f"{s.origin}.train", "the stage trains nothing (list the peers it trains)")
        for i, p in enumerate(s.train):
            if topology.kind(p) != "peer":
                raise TopologyError(f"{s.origin}.train[{i}]", f"unknown peer '{p}' (peers: {', '.join(c.peers)})")
            if c.peers[p].frozen:
                raise TopologyError(f"{s.origin}.train[{i}]", f"peer '{p}' is frozen: remove 'frozen' or the stage entry")

    for e in topology.edges:
        where = e.origin + (f" ({e.pattern} {e.source}→{e.target})" if e.pattern else "")
        for role, node in (("from", e.source), ("to", e.target)):
            if topology.kind(node) is None:
                field = "over" if e.pattern else role
                if e.pattern == "star" and node == e.source:
                    field = "center"
                raise TopologyError(f"{e.origin}.{field}", f"unknown node '{node}' ({nodes_hint})")
        if topology.kind(e.target) != "peer":
            raise TopologyError(f"{e.origin}.to", f"'{e.target}' is {topology.kind(e.target)}: only peers learn")
        if e.loss not in LOSSES:
            raise TopologyError(f"{e.origin}.loss", suggest(e.loss, LOSSES, "loss"))
        loss = LOSSES[e.loss]
        validate_params(loss.Params, e.params, e.origin)
        if e.source == e.target and not loss.allows_self:
            raise TopologyError(where, f"loss '{e.loss}' does not allow a self-edge ({e.source}→{e.target})")
        if topology.kind(e.source) not in loss.source_kinds:
            raise TopologyError(f"{e.origin}.from",
                                f"loss '{e.loss}' takes a source of kind {', '.join(sorted(loss.source_kinds))}, "
                                f"not the {topology.kind(e.source)} '{e.source}'")
        target_stage = topology.trained_stage(e.target)
        if target_stage is None:
            why = "frozen" if c.peers[e.target].frozen else "in no stage's 'train' list"
            raise TopologyError(where, f"edge into '{e.target}', which is never trained ({why})")
        for src in topology.peer_sources(e.source):
            src_stage = topology.trained_stage(src)
            if src_stage is not None and src_stage > target_stage and not c.peers[src].init:
                raise TopologyError(where, f"'{src}' is first trained in stage '{stages[src_stage].name}', after "
                                           f"'{e.target}' (stage '{stages[target_stage].name}'): it would teach untrained")

    for i, group in enumerate(c.engine.colocate):
        for j, p in enumerate(group):
            if topology.kind(p) != "peer":
                raise TopologyError(f"engine.colocate[{i}][{j}]", f"unknown peer '{p}' (peers: {', '.join(c.peers)})")


def _nodes_hint(topology: Topology) -> str:
    c = topology.config
    parts = [f"peers: {', '.join(c.peers)}"]
    if c.ensembles:
        parts.append(f"ensembles: {', '.join(c.ensembles)}")
    if c.virtual:
        parts.append(f"virtual: {', '.join(c.virtual)}")
    return "; ".join(parts)
