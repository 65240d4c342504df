"""Moving taps between Ray workers every step, over torch.distributed.

Placement gives each worker a group of peers and a replica index; replica r of every group
exchanges only with replica r of the others. A stage whose graph is dense in logits (every
worker needs every other worker's logits, e.g. DML, KDCL) uses one ``all_gather``; any other
stage sends each needed tap along its edges with ``batch_isend_irecv``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import TopologyError
from ..topology.graph import Stage, Topology
from ..topology.plan import ExchangePlan


@dataclass(frozen=True)
class Worker:
    """One Ray Train worker: its rank, the peers it holds and their replica index."""

    rank: int
    peers: tuple[str, ...]
    replica: int


def placement(topology: Topology) -> list[Worker]:
    """Colocated groups share a worker; every other peer gets its own; one worker per replica."""
    c = topology.config
    groups = [tuple(g) for g in c.engine.colocate]
    grouped = {p for g in groups for p in g}
    groups += [(p,) for p in c.peers if p not in grouped]
    replicas = max(p.replicas for p in c.peers.values())
    return [Worker(rank=i * replicas + r, peers=g, replica=r)
            for i, g in enumerate(groups) for r in range(replicas)]


def label_selectors(topology: Topology) -> list[dict[str, str]] | None:
    """Each worker's Ray node label selector (``peers.X.node_labels``), in placement's rank order, or None
    when no peer asks for labels. The peers of a colocated group share a worker, so they must agree."""
    c = topology.config
    if not any(p.node_labels for p in c.peers.values()):
        return None
    for i, group in enumerate(c.engine.colocate):
        for p in group[1:]:
            if c.peers[p].node_labels != c.peers[group[0]].node_labels:
                raise TopologyError(f"peers.{p}.node_labels",
                                    f"'{p}' shares a worker with '{group[0]}' (engine.colocate[{i}]), so it needs "
                                    f"the same node labels ({dict(c.peers[group[0]].node_labels) or 'none'})")
    return [dict(c.peers[w.peers[0]].node_labels) for w in placement(topology)]


def _matches(selector: dict[str, str], labels: dict) -> bool:
    def has(key, value):
        got = labels.get(key)
        return got == value or (isinstance(got, (list, tuple)) and value in got)
    return all(has(k, v) for k, v in selector.items())


def seat_workers(workers: list[Worker], selectors: list[dict[str, str]], node_labels: list[dict]) -> list[Worker]:
    """Placement with each worker's rank replaced by the Ray Train rank whose node carries its labels.

    Ray places bundle i (placement's worker i) on a node matching selector i, but numbers its workers
    grouped by node, so rank i may sit on another node: each placement worker takes a rank whose
    ``node_labels`` (one dict per Ray Train rank) match its selector, rank i itself where it does
    (a bipartite matching; one exists because Ray placed every bundle on a matching node).
    """
    n = len(workers)
    fits = [[r for r in [i, *range(n)] if _matches(selectors[i], node_labels[r])] for i in range(n)]
    holder: dict[int, int] = {}  # rank -> placement index

    def seat(i: int, tried: set[int]) -> bool:
        for r in fits[i]:
            if r in tried:
                continue
            tried.add(r)
            if r not in holder or seat(holder[r], tried):
                holder[r] = i
                return True
        return False

    for i in range(n):
        if not seat(i, set()):
            raise TopologyError(f"peers.{workers[i].peers[0]}.node_labels",
                                f"no Ray Train worker runs on a node labelled {selectors[i]}")
    rank_of = {i: r for r, i in holder.items()}
    return [Worker(rank=rank_of[i], peers=w.peers, replica=w.replica) for i, w in enumerate(workers)]


def exchange_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class Route:
    """One tap of one peer, sent from one worker to another each step."""

    peer: str
    tap: str
    src: int
    dst: int
    shape: tuple[int, ...]


def stage_routes(plan: ExchangePlan, workers: list[Worker], stage: str, replica: int = 0) -> list[tuple]:
    """(transfer, src rank, dst rank, route) for each planned transfer of ``stage`` among the workers of
    ``replica``: route is None where no copy crosses workers (colocated peers pass taps by reference, a tap
    goes to a worker once)."""
    home = {(p, w.replica): w.rank for w in workers for p in w.peers}
    seen, out = set(), []
    for t in plan.transfers:
        if t.stage != stage:
            continue
        src, dst = home[(t.source, replica)], home[(t.target, replica)]
        route = None
        if src != dst and (t.source, t.tap, dst) not in seen:
            seen.add((t.source, t.tap, dst))
            route = Route(t.source, t.tap, src, dst, tuple(t.shape))
        out.append((t, src, dst, route))
    return out


class Exchange:
    """The per-stage routes of this worker and the collective that serves them."""

    def __init__(self, topology: Topology, plan: ExchangePlan, workers: list[Worker], me: Worker,
                 group, device: torch.device, dtype: torch.dtype):
        self.topology, self.plan, self.workers, self.me = topology, plan, workers, me
        self.group, self.device, self.dtype = group, device, dtype
        self.mates = sorted(w.rank for w in workers if w.replica == me.replica)  # my exchange group, in rank order
        self.routes: list[Route] = []
        self.dense = False
        self.bytes_sent = 0

    def enter_stage(self, stage: Stage) -> None:
        """Routes for a stage: the plan's transfers between different workers, each tap once per worker."""
        routes = [r for *_, r in stage_routes(self.plan, self.workers, stage.name, self.me.replica) if r is not None]
        self.routes = routes
        one_peer_each = all(len(w.peers) == 1 for w in self.workers)
        pairs = {(x.src, x.dst) for x in routes}
        full = {(a, b) for a in self.mates for b in self.mates if a != b}
        # one all_gather beats n·(n-1) sends from three workers up; with two, a send each way is cheaper
        self.dense = (one_peer_each and len(self.mates) > 2 and all(x.tap == "logits" for x in routes)
                      and pairs == full)

    def __call__(self, outs: dict[str, dict[str, Tensor]], batch_size: int) -> dict[str, dict[str, Tensor]]:
        """Received taps, keyed like ``outs`` (peer → tap → tensor), detached."""
        if not self.routes:
            return {}
        if self.dense:
            return self._all_gather(outs, batch_size)
        return self._p2p(outs, batch_size)

    def _all_gather(self, outs, batch_size):
        mine = self.me.peers[0]
        send = outs[mine]["logits"].detach().to(self.dtype).contiguous()
        bufs = [torch.empty_like(send) for _ in self.mates]
        dist.all_gather(bufs, send, group=self.group)
        self.bytes_sent += send.numel() * send.element_size()
        got = {}
        for rank, buf in zip(self.mates, bufs):
            if rank != self.me.rank:
                peer = next(w.peers[0] for w in self.workers if w.rank == rank)
                got[peer] = {"logits": buf}
        return got

    def _p2p(self, outs, batch_size):
        ops, got = [], {}
        for x in self.routes:
            if x.src == self.me.rank:
                t = outs[x.peer][x.tap].detach().to(self.dtype).contiguous()
                ops.append(dist.P2POp(dist.isend, t, x.dst))
                self.bytes_sent += t.numel() * t.element_size()
            elif x.dst == self.me.rank:
                buf = torch.empty((batch_size, *x.shape), dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, x.src))
                got.setdefault(x.peer, {})[x.tap] = buf
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        return got
