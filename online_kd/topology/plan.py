"""The exchange plan: which taps each peer must produce, and what travels between peers each step.

Tap shapes come from a dry forward of every model on a tiny batch; the same pass checks that
each edge's taps exist and fit (a loss's ``build`` raises on a mismatch).
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import TopologyError
from .graph import Edge, Stage, Topology


@dataclass(frozen=True)
class Transfer:
    """One tap that one peer reads from another every step of a stage (``bytes_per_step`` before
    placement: colocated peers send nothing, see ``cli.wire_routes``)."""

    stage: str
    source: str
    tap: str
    target: str
    shape: tuple[int, ...]
    bytes_per_step: int


@dataclass
class ExchangePlan:
    """Taps per peer and per stage, their per-sample shapes, and the transfers they imply."""

    stage_taps: list[dict[str, set[str]]]
    shapes: dict[str, dict[str, tuple[int, ...]]]
    transfers: list[Transfer] = field(default_factory=list)
    batch_size: int = 0


def active_edges(topology: Topology, stage: Stage) -> list[Edge]:
    """The edges whose target this stage trains (only the named ones when the stage lists ``edges``)."""
    return [e for e in topology.edges
            if e.target in stage.train and (stage.edges is None or e.name in stage.edges)]


def needed_taps(topology: Topology, stage: Stage, losses: dict[int, object]) -> dict[str, set[str]]:
    """Per peer, the taps a stage reads: every edge's source and target needs, plus logits."""
    taps: dict[str, set[str]] = {p: {"logits"} for p in topology.config.peers}
    for e in active_edges(topology, stage):
        needs = losses[e.index].needs()
        taps[e.target].update(needs.target)
        for src in topology.peer_sources(e.source):
            taps[src].update(needs.source if topology.kind(e.source) == "peer" else ("logits",))
    return taps


def peers_in_use(topology: Topology, stage: Stage) -> set[str]:
    """Peers that must run forward in a stage: the trained ones and every source they learn from."""
    used = set(stage.train)
    for e in active_edges(topology, stage):
        used |= topology.peer_sources(e.source)
    return used


def _param_naming(edge: Edge, tap: str) -> str | None:
    """The edge parameter whose value names ``tap`` (e.g. ``tap: stage2``), if any."""
    for key, value in edge.params.items():
        if value == tap or (isinstance(value, (list, tuple)) and tap in value):
            return key
    return None


def _aux_hint(model: str, tap: str) -> str:
    """For an ``aux``/``auxK`` tap read from a model without auxiliary heads: the model that has them."""
    from ..models import is_known_model

    if (tap == "aux" or (tap.startswith("aux") and tap[3:].isdigit())) and is_known_model(f"{model}_aux"):
        return f" (auxiliary heads: model '{model}_aux')"
    return ""


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes_text(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:,.1f} GiB)"


def check_input_size(topology: Topology, info, rows: int, memory: int | None = None) -> None:
    """Refuse data whose inputs cannot be allocated here, before anything is: a batch's input tensor
    (``rows`` samples of fp32 images) and, for a synthetic set, its label tensors must fit in memory."""
    c = topology.config
    memory = _memory_bytes() if memory is None else memory
    if not memory:
        return
    shape = (info.in_channels, *info.image_size)
    sample = math.prod(shape) * 4
    where = {"synthetic": "data.synthetic.shape", "imagefolder": "data.image_size"}.get(c.data.dataset, "data.batch_size")
    shape_text = "×".join(map(str, shape))
    if 2 * sample > memory // 2:
        raise TopologyError(where, f"one {shape_text} sample takes {_bytes_text(sample)}: the dry forward's batch of "
                                   f"2 needs more than half of this machine's {_bytes_text(memory)} of memory")
    batch = max(c.data.batch_size, c.data.test_batch_size or 0)
    need = rows * sample
    if need > memory // 2:
        raise TopologyError("data.batch_size" if c.data.test_batch_size is None or c.data.batch_size >= batch
                            else "data.test_batch_size",
                            f"a batch of {batch:,} samples" + (f" ({rows:,} rows)" if rows != batch else "")
                            + f" of {shape_text} floats takes "
                            f"{_bytes_text(need)} for its input alone, more than half of this machine's "
                            f"{_bytes_text(memory)} of memory")
    if c.data.dataset == "synthetic":
        labels = (c.data.synthetic.num_train + c.data.synthetic.num_test) * 16  # int64 labels and their permutation
        if labels > memory // 2:
            raise TopologyError("data.synthetic.num_train", f"{c.data.synthetic.num_train:,} + "
                                                            f"{c.data.synthetic.num_test:,} samples take "
                                                            f"{_bytes_text(labels)} for their labels alone, more than "
                                                            f"half of this machine's {_bytes_text(memory)} of memory")


def build_plan(topology: Topology, info=None, dtype_bytes: int | None = None) -> ExchangePlan:
    """Dry-run every model and loss on a 2-sample batch; TopologyError on missing taps or shape mismatches."""
    from ..data import dataset_info
    from ..data.expand import build_expansion
    from ..build import build_loss, build_model_for
    from ..models import TappedModel, resolve_tap

    c = topology.config
    if info is None:
        try:
            info = dataset_info(c.data)
        except OSError as err:
            raise TopologyError("data.root", f"cannot read the data set's folders ({err})") from None
    dtype_bytes = dtype_bytes or (2 if c.train.precision in ("bf16", "fp16") else 4)
    expansion = build_expansion(c.data.expand)
    try:
        expansion.check(info.in_channels, info.image_size)
    except ValueError as err:
        raise TopologyError("data.expand", f"'{c.data.expand}' does not fit {info.name}: {err}") from None
    check_input_size(topology, info, expansion.rows(max(c.data.batch_size, c.data.test_batch_size or 0)))
    losses = {}
    for e in topology.edges:
        try:
            losses[e.index] = build_loss(e)
        except (KeyError, ValueError, TypeError) as err:  # only reachable with load_topology(check=False)
            raise TopologyError(e.origin, f"cannot build loss '{e.loss}': {err}") from None
    stage_taps = [needed_taps(topology, s, losses) for s in topology.stages]
    all_taps = {p: set().union(*(st[p] for st in stage_taps)) for p in c.peers}

    for e in topology.edges:
        needs = losses[e.index].needs()
        extra = set(needs.source) - {"logits"}
        if topology.kind(e.source) != "peer" and extra:
            raise TopologyError(e.origin, f"{topology.kind(e.source)} '{e.source}' provides only logits, "
                                          f"but loss '{e.loss}' reads {', '.join(sorted(extra))}")

    shape_text = "×".join(str(d) for d in (2, info.in_channels, *info.image_size))
    models = {}
    for name, peer in c.peers.items():
        where = f"peers.{name}.model_args" if peer.model_args else f"peers.{name}.model"
        try:
            with warnings.catch_warnings():  # a dry run's warnings (e.g. zero-size layers) would garble the
                warnings.simplefilter("ignore")  # one-line error; the engine's real build shows them
                models[name] = build_model_for(peer, info)
        except Exception as err:  # a model's constructor may reject its arguments in any way
            raise TopologyError(where, f"cannot build '{peer.model}' for {info.in_channels}-channel inputs and "
                                       f"{info.num_classes} classes: {type(err).__name__}: {err}") from None

    for e in topology.edges:  # every tap an edge reads exists on the peers it reads it from
        needs = losses[e.index].needs()
        sources = sorted(topology.peer_sources(e.source)) if topology.kind(e.source) == "peer" else []
        for peers, taps in ((sources, needs.source), ([e.target], needs.target)):
            for p in peers:
                for tap in taps:
                    try:
                        resolve_tap(models[p], tap)
                    except ValueError as err:
                        param = _param_naming(e, tap)
                        raise TopologyError(f"{e.origin}.{param}" if param else e.origin,
                                            f"peer '{p}' ({c.peers[p].model}) has {err} — loss '{e.loss}' on "
                                            f"{e.source}→{e.target} reads it{_aux_hint(c.peers[p].model, tap)}") from None

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    try:
        x = torch.zeros(2, info.in_channels, *info.image_size)
    except (RuntimeError, MemoryError) as err:
        size = 2 * math.prod((info.in_channels, *info.image_size)) * 4
        raise TopologyError("data", f"cannot allocate the dry forward's {shape_text} batch ({_bytes_text(size)}): "
                                    f"{type(err).__name__}") from None
    for name, peer in c.peers.items():
        model = models.pop(name)
        where = f"peers.{name}.model_args" if peer.model_args else f"peers.{name}.model"
        try:
            tapped = TappedModel(model, sorted(all_taps[name]))
        except ValueError as err:
            raise TopologyError(f"peers.{name}", f"'{peer.model}': {err}") from None
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = tapped(x)
        except Exception as err:  # whatever the model's forward raises on this input, an allocation failure too
            raise TopologyError(where, f"'{peer.model}' fails a dry forward on a {shape_text} batch "
                                       f"({info.name}): {type(err).__name__}: {err}") from None
        shapes[name] = {k: tuple(v.shape[1:]) for k, v in out.items()}
        if shapes[name]["logits"] != (info.num_classes,):
            raise TopologyError(where, f"'{peer.model}' gives logits of shape {list(shapes[name]['logits'])} per "
                                       f"sample, not [{info.num_classes}] ({info.name} has {info.num_classes} classes)")
        del tapped, model

    logit_shape = (info.num_classes,)
    for e in topology.edges:
        src = shapes[e.source] if topology.kind(e.source) == "peer" else {"logits": logit_shape}
        try:
            losses[e.index].build({k: torch.Size(v) for k, v in src.items()},
                                  {k: torch.Size(v) for k, v in shapes[e.target].items()})
        except (ValueError, RuntimeError) as err:
            raise TopologyError(e.origin, f"{e.source}→{e.target} ({e.loss}): {err}") from None

    transfers = []
    for stage in topology.stages:
        seen = set()
        for e in active_edges(topology, stage):
            needs = losses[e.index].needs()
            for src in sorted(topology.peer_sources(e.source)):
                taps = needs.source if topology.kind(e.source) == "peer" else ("logits",)
                for tap in taps:
                    key = (src, tap, e.target)
                    if src == e.target or key in seen:
                        continue
                    seen.add(key)
                    shape = shapes[src][tap]
                    transfers.append(Transfer(stage.name, src, tap, e.target, shape,
                                              math.prod(shape) * expansion.rows(c.data.batch_size) * dtype_bytes))
    return ExchangePlan(stage_taps=stage_taps, shapes=shapes, transfers=transfers, batch_size=c.data.batch_size)
