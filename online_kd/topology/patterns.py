"""Shorthand edge patterns (all_pairs, ring, star, chain) expanded into plain edges."""
from __future__ import annotations

from itertools import permutations

from .graph import Edge
from .schema import EdgeConfig, TopologyConfig


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
