"""Checks that need more than the schema: names, registries, stages, who can learn from whom."""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Sequence

import torch
from pydantic import BaseModel, ValidationError

from ..errors import TopologyError, suggest
from ..registry import engines
from .graph import Topology
from .places import SAFE_KEY, message, place
from .schema import EdgeConfig, EnsembleConfig, VirtualConfig


def validate_params(cls: type[BaseModel], params: Mapping[str, Any], where: str,
                    what: str = "this kind", common: Sequence[str] = ()) -> BaseModel:
    """A class's ``Params`` from YAML keys, errors placed under ``where``.

    ``what`` names the class in messages ("loss 'kd'"); ``common`` are the keys the
    section itself takes besides the class's (listed in 'unknown key' errors).
    """
    try:
        return cls.model_validate(dict(params))
    except ValidationError as err:
        e = err.errors()[0]
        loc = [p for p in e["loc"] if p != "[key]"]
        safe = all(isinstance(p, int) or SAFE_KEY.match(str(p)) for p in loc)
        sub = place(loc) if safe else ""
        key = loc[0] if loc else None
        if e["type"] == "extra_forbidden":
            allowed = list(cls.model_fields)
            close = difflib.get_close_matches(str(key), [*allowed, *common], n=1, cutoff=0.6)
            msg = "unknown key" + ("" if safe else f" {key!r}") + (f", did you mean '{close[0]}'?" if close else "")
            msg += f" ({what} takes " + (", ".join(allowed) or "no parameters")
            msg += (f"; besides {', '.join(common)})" if common else ")")
        else:
            msg = message(e)
            if not safe:
                msg = f"key {key!r}: {msg}"
        raise TopologyError(f"{where}.{sub}" if sub else where, msg) from None


def build_stage_kind(topology: Topology, producer):
    """The registered stage kind of a producing stage, its parameters validated."""
    from ..stages import STAGE_KINDS

    cls = STAGE_KINDS[producer.kind]
    params = validate_params(cls.Params, producer.params, producer.origin, f"stage kind '{producer.kind}'",
                             ["name", "kind", "after"])
    return cls(params, producer.name)


_TRAIN_ONLY = ("train", "epochs", "edges", "task_weight", "data", "freeze_bn", "hand_over")


def _check_producing_stages(topology: Topology) -> None:
    """Stage kinds exist and take their keys; training stages name only earlier produced sets."""
    from ..stages import STAGE_KINDS

    c = topology.config
    for i, s in enumerate(c.stages):
        if s.kind == "train":
            for key in s.extras():
                allowed = [k for k in _keys(type(s)) if k != "kind"]
                close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
                raise TopologyError(f"stages[{i}].{key}" if SAFE_KEY.match(str(key)) else f"stages[{i}]",
                                    "unknown key" + (f", did you mean '{close[0]}'?" if close else "")
                                    + f" (allowed: {', '.join(allowed)}; other keys belong to a producing stage's "
                                      f"'kind': {', '.join(sorted(STAGE_KINDS)) or 'none'})")
            continue
        if s.kind not in STAGE_KINDS:
            raise TopologyError(f"stages[{i}].kind", suggest(s.kind, ["train", *STAGE_KINDS], "stage kind"))
        for key in _TRAIN_ONLY:
            if key in s.model_fields_set:
                raise TopologyError(f"stages[{i}].{key}", f"a '{s.kind}' stage produces data and trains nothing: "
                                                          f"'{key}' belongs to the training stage that uses it")
    stages, producers = topology.stages, topology.producers
    names = {p.name: p for p in producers}
    for p in producers:
        if p.before >= len(stages):
            raise TopologyError(f"{p.origin}.kind", "no training stage follows it: add one with "
                                                    f"'data: {p.name}' after it")
        kind = build_stage_kind(topology, p)
        for key, peer in kind.reads().items():
            if topology.kind(peer) != "peer":
                raise TopologyError(f"{p.origin}.{key}", suggest(peer, c.peers, "peer"))
        kind.check(topology, p.origin)
    for idx, s in enumerate(stages):
        if s.data is not None:
            if s.data not in names:
                raise TopologyError(f"{s.origin}.data", suggest(s.data, names, "producing stage")
                                    if names else f"no stage produces a data set named '{s.data}' "
                                                  "(a stage with a 'kind' other than train does)")
            if names[s.data].before > idx:
                raise TopologyError(f"{s.origin}.data", f"stage '{s.data}' runs after this stage: order it before "
                                                        f"(YAML order or 'after')")
        for j, peer in enumerate(s.freeze_bn):
            if peer not in s.train:
                raise TopologyError(f"{s.origin}.freeze_bn[{j}]", f"'{peer}' is not trained in this stage "
                                                                  f"(it trains {', '.join(s.train)})")


def _probs_losses() -> list[str]:
    """Registered losses that read only the source's ``probs`` (with their default parameters)."""
    from ..losses import LOSSES

    names = []
    for name, cls in sorted(LOSSES.items()):
        try:
            loss = cls(cls.Params())
        except Exception:  # a loss whose parameters have no defaults; it names its taps in them
            continue
        if set(loss.needs().source) == {"probs"} and not cls.needs_source_model:
            names.append(name)
    return names


def _check_blackbox(topology: Topology) -> None:
    """Only a black-box peer's probabilities leave it: edges from it read ``probs`` only, no ensemble
    combines its logits, no stage kind reads its network, and it trains only before it first answers."""
    from ..losses import LOSSES
    from ..stages import STAGE_KINDS

    c = topology.config
    boxes = [n for n, p in c.peers.items() if p.blackbox]
    if not boxes:
        return

    def what(peer: str) -> str:
        return f"'{peer}' is a black box (peers.{peer}.blackbox)"

    for name, ens in c.ensembles.items():
        for i, m in enumerate(ens.members):
            if m in boxes:
                raise TopologyError(f"ensembles.{name}.members[{i}]", f"{what(m)}: only its probabilities leave it, "
                                                                      "but an ensemble combines its members' logits")
    first_use: dict[str, tuple[int, str]] = {}  # black box → (training stage index, name of what reads it first)
    for p in topology.producers:
        kind = build_stage_kind(topology, p)
        for key, peer in kind.reads().items():
            if peer not in boxes:
                continue
            if key not in kind.blackbox_params:
                allowed = sorted(k for k, cls in STAGE_KINDS.items() if cls.blackbox_params)
                raise TopologyError(f"{p.origin}.{key}", f"{what(peer)}: stage kind '{p.kind}' reads more than its "
                                                         f"probabilities (stage kinds that only query a black box: "
                                                         f"{', '.join(allowed) or 'none'})")
            first_use[peer] = min(first_use.get(peer, (p.before, p.name)), (p.before, p.name))
    for e in topology.edges:
        if e.source not in boxes:
            continue
        loss = LOSSES[e.loss](LOSSES[e.loss].Params.model_validate(e.params))
        reads = sorted(set(loss.needs().source) - {"probs"})
        if reads or loss.needs_source_model:
            read = ", ".join(f"'{t}'" for t in reads) or "the network itself"
            raise TopologyError(f"{e.origin}.loss", f"{what(e.source)}: only 'probs' may cross its edges, but loss "
                                                    f"'{e.loss}' reads {read} (losses that read only probs: "
                                                    f"{', '.join(_probs_losses()) or 'none'})")
        for k, s in enumerate(topology.stages):
            if e.target in s.train and (s.edges is None or e.name in s.edges):
                first_use[e.source] = min(first_use.get(e.source, (k, s.name)), (k, s.name))
                break
    for peer, (start, user) in first_use.items():
        for s in topology.stages[start:]:
            if peer in s.train and not c.stages:  # the implicit stage trains every unfrozen peer
                raise TopologyError(f"peers.{peer}", f"{what(peer)}, so it only answers: freeze it (frozen: true "
                                                     "with an init checkpoint) or train it in a stage of its own first")
            if peer in s.train:
                raise TopologyError(f"{s.origin}.train[{s.train.index(peer)}]",
                                    f"{what(peer)} and answers as one from stage '{user}' on: it can be trained "
                                    "only in stages before that")


def _check_batch_fields(topology: Topology, e, loss, active: list[int]) -> None:
    """The batch fields a loss reads (``EdgeLoss.batch_fields``) come from ``data.sampler``, in every stage
    the edge is active in (a stage training on a produced set has none)."""
    from ..data.samplers import provided_fields, sampler_for

    sampler = topology.config.data.sampler
    for field in sorted(loss.batch_fields - provided_fields(sampler)):
        need = sampler_for(field)
        raise TopologyError(f"{e.origin}.loss", f"loss '{e.loss}' ({e.source}→{e.target}) reads batch.{field}, which "
                                                f"data.sampler '{sampler}' does not give: set data.sampler: {need}")
    for i in active:
        s = topology.stages[i]
        if loss.batch_fields and s.data is not None:
            raise TopologyError(f"{s.origin}.data", f"loss '{e.loss}' ({e.source}→{e.target}) reads batch."
                                                    f"{', batch.'.join(sorted(loss.batch_fields))} from data.sampler, "
                                                    f"which the produced set '{s.data}' does not give")


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


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

    from ..data.expand import EXPANSIONS

    if c.engine.name not in engines():
        raise TopologyError("engine.name", suggest(c.engine.name, engines(), "engine"))
    if c.data.expand not in EXPANSIONS:
        raise TopologyError("data.expand", suggest(c.data.expand, EXPANSIONS, "expansion"))

    if c.train.device != "auto":
        try:
            torch.device(c.train.device)
        except (RuntimeError, ValueError, TypeError):
            raise TopologyError("train.device", f"not a device: '{c.train.device}' (auto, cpu, cuda, cuda:1, mps, …)") from None

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
        params = validate_params(comb.Params, ens.extras(), f"ensembles.{name}", f"combiner '{ens.combine}'",
                                 _keys(EnsembleConfig))
        if "refit_every" in type(params).model_fields and c.data.holdout <= 0:
            raise TopologyError(f"ensembles.{name}.combine",
                                f"'{ens.combine}' refits on a held-out split: set data.holdout (e.g. 0.1)")

    for name, v in c.virtual.items():
        if v.kind not in VIRTUAL_TEACHERS:
            raise TopologyError(f"virtual.{name}.kind", suggest(v.kind, VIRTUAL_TEACHERS, "virtual teacher"))
        validate_params(VIRTUAL_TEACHERS[v.kind].Params, v.extras(), f"virtual.{name}", f"virtual teacher '{v.kind}'",
                        _keys(VirtualConfig))

    stages = topology.stages  # raises for unknown/cyclic 'after'
    for s in stages:
        if not s.train:
            if not c.stages:
                raise TopologyError("peers", "every peer is frozen, so nothing trains (unfreeze one, or add stages)")
            raise TopologyError(f"{s.origin}.train", "the stage trains nothing (list the peers it trains)")
        for i, p in enumerate(s.train):
            if topology.kind(p) != "peer":
                raise TopologyError(f"{s.origin}.train[{i}]", suggest(p, c.peers, "peer"))
            if c.peers[p].frozen:
                raise TopologyError(f"{s.origin}.train[{i}]", f"peer '{p}' is frozen: remove 'frozen' or the stage entry")
            if p in s.train[:i]:
                raise TopologyError(f"{s.origin}.train[{i}]", f"peer '{p}' is listed twice")

    _check_producing_stages(topology)

    for i, cfg in enumerate(c.edges):
        if cfg.pattern is None and isinstance(cfg.to, list) and not cfg.to:
            raise TopologyError(f"edges[{i}].to", "lists no target peer")

    edge_names = {e.name for e in topology.edges if e.name is not None}
    for s in stages:
        for j, name in enumerate(s.edges or ()):
            if name not in edge_names:
                raise TopologyError(f"{s.origin}.edges[{j}]", suggest(name, edge_names, "edge name")
                                    if edge_names else f"unknown edge name '{name}' (no edge has a 'name')")

    edge_keys: dict[tuple[str, str, str], str] = {}
    for e in topology.edges:
        how = f" ({e.pattern} {e.source}→{e.target})" if e.pattern else ""

        def at(role: str) -> str:
            """The YAML key that put ``role`` ('from'/'to') of this edge there."""
            if not e.pattern:
                return f"{e.origin}.{role}"
            return f"{e.origin}.center" if e.pattern == "star" and role == "from" else f"{e.origin}.over"

        for role, node in (("from", e.source), ("to", e.target)):
            if topology.kind(node) is None:
                raise TopologyError(at(role), f"unknown node '{node}' ({nodes_hint})")
        if topology.kind(e.target) != "peer":
            raise TopologyError(at("to"), f"'{e.target}' is {'an' if topology.kind(e.target) == 'ensemble' else 'a'} "
                                          f"{topology.kind(e.target)} node: only peers learn{how}")
        if e.loss not in LOSSES:
            raise TopologyError(f"{e.origin}.loss", suggest(e.loss, LOSSES, "loss"))
        loss = LOSSES[e.loss]
        validate_params(loss.Params, e.params, e.origin if e.link is None else f"{e.origin}.links[{e.link}]",
                        f"loss '{e.loss}'", _keys(EdgeConfig))
        if loss.needs_expansion and c.data.expand == "none":
            views = ", ".join(sorted(set(EXPANSIONS) - {"none"}))
            raise TopologyError(f"{e.origin}.loss", f"loss '{e.loss}' reads expanded views (joint labels): set "
                                                    f"data.expand ({views})")
        if e.source == e.target and not loss.allows_self:
            raise TopologyError(at("to"), f"loss '{e.loss}' does not allow a self-edge" + (how or f" ({e.source}→{e.target})"))
        if topology.kind(e.source) not in loss.source_kinds:
            raise TopologyError(at("from"),
                                f"loss '{e.loss}' takes a source of kind {', '.join(sorted(loss.source_kinds))}, "
                                f"not the {topology.kind(e.source)} '{e.source}'")
        key = (e.loss, e.source, e.target)
        if key in edge_keys:
            raise TopologyError(at("to"), f"the {e.loss} edge {e.source}→{e.target} is already given by {edge_keys[key]}")
        edge_keys[key] = e.origin + how
        if topology.trained_stage(e.target) is None:
            why = "frozen" if c.peers[e.target].frozen else "in no stage's 'train' list"
            raise TopologyError(at("to"), f"edge into '{e.target}', which is never trained ({why}){how}")
        active = [i for i, s in enumerate(stages) if e.target in s.train and (s.edges is None or e.name in s.edges)]
        if not active:
            lists = ", ".join(s.origin for s in stages if e.target in s.train)
            raise TopologyError(f"{e.origin}.name" if e.name is not None else e.origin,
                                f"the edge into '{e.target}' is active in no stage: the stages that train it "
                                f"({lists}) list other 'edges'{how}")
        target_stage = active[0]
        _check_batch_fields(topology, e, loss, active)
        for src in sorted(topology.peer_sources(e.source)):
            src_stage = topology.trained_stage(src)
            if c.peers[src].init:
                continue
            if src_stage is None:
                raise TopologyError(at("from"), f"'{src}' is in no stage's 'train' list and has no 'init': "
                                                f"it would teach '{e.target}' untrained{how}")
            if src_stage > target_stage:
                raise TopologyError(at("from"), f"'{src}' is first trained in stage '{stages[src_stage].name}', after "
                                                f"this edge teaches '{e.target}' (stage '{stages[target_stage].name}'): "
                                                f"it would teach untrained{how}")

    _check_blackbox(topology)

    colocated: dict[str, int] = {}
    for i, group in enumerate(c.engine.colocate):
        for j, p in enumerate(group):
            if topology.kind(p) != "peer":
                raise TopologyError(f"engine.colocate[{i}][{j}]", f"unknown peer '{p}' (peers: {', '.join(c.peers)})")
            if p in colocated:
                raise TopologyError(f"engine.colocate[{i}][{j}]", f"peer '{p}' is already in colocate[{colocated[p]}]")
            colocated[p] = i
    engines()[c.engine.name].check(topology)  # what the chosen engine cannot run


def _nodes_hint(topology: Topology) -> str:
    c = topology.config
    parts = [f"peers: {', '.join(c.peers)}"]
    if c.ensembles:
        parts.append(f"ensembles: {', '.join(c.ensembles)}")
    if c.virtual:
        parts.append(f"virtual: {', '.join(c.virtual)}")
    return "; ".join(parts)
