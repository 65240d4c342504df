"""Shorthand edge patterns (all_pairs, ring, star, chain) expanded into plain edges."""
from __future__ import annotations

from itertools import permutations

from ..errors import TopologyError
from .graph import Edge
from .schema import EdgeConfig, TopologyConfig

#: most plain edges a topology may expand to (all_pairs over 64 nodes makes 4,032)
MAX_EDGES = 4096


def count_pairs(cfg: EdgeConfig) -> int:
    """How many plain edges ``cfg`` expands to, without expanding it."""
    n = len(cfg.over or [])
    if cfg.pattern == "all_pairs":
        return n * (n - 1)
    if cfg.pattern == "ring":
        return n if n > 2 else 2
    if cfg.pattern == "star":
        return n
    if cfg.pattern == "chain":
        return max(n - 1, 0)
    return len(cfg.to) if isinstance(cfg.to, list) else 1


def _pairs(cfg: EdgeConfig) -> list[tuple[str, str]]:
    over = list(cfg.over or [])
    if cfg.pattern == "all_pairs":
        return list(permutations(over, 2))
    if cfg.pattern == "ring":  # net k learns from net k-1 (AFD's cyclic scheme)
        return [(over[i - 1], over[i]) for i in range(len(over))] if len(over) > 2 else [(over[0], over[1]), (over[1], over[0])]
    if cfg.pattern == "star":
        return [(cfg.center, node) for node in over]
    if cfg.pattern == "chain":
        return list(zip(over, over[1:]))
    targets = cfg.to if isinstance(cfg.to, list) else [cfg.to]
    return [(cfg.source, t) for t in targets]


def expand_edges(config: TopologyConfig) -> list[Edge]:
    """Every edge entry, pattern or list-valued ``to``, as one Edge per (source, target)."""
    total = 0
    for i, cfg in enumerate(config.edges):
        total += count_pairs(cfg)
        if total > MAX_EDGES:
            what = f"'{cfg.pattern}' over {len(cfg.over or [])} nodes" if cfg.pattern else f"{count_pairs(cfg)} targets"
            raise TopologyError(f"edges[{i}].{'over' if cfg.pattern else 'to'}",
                                f"{what} brings the topology to {total:,} edges; at most {MAX_EDGES:,}")
    edges: list[Edge] = []
    for i, cfg in enumerate(config.edges):
        for k, (source, target) in enumerate(_pairs(cfg)):
            link = dict(cfg.links[k]) if cfg.links is not None else {}
            weight = link.pop("weight", cfg.weight)
            edges.append(Edge(
                index=len(edges), origin=f"edges[{i}]", source=str(source), target=str(target),
                loss=cfg.loss, weight=weight, schedule=cfg.schedule, until_epoch=cfg.until_epoch,
                params={**cfg.extras(), **link}, pattern=cfg.pattern, name=cfg.name,
                link=k if cfg.links is not None else None,
            ))
    return edges
