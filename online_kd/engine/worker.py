"""The function every Ray Train worker runs: the epoch loop over its peers and their shard of each
batch, with torch.distributed as the loop's collective (exchange, gradient sync, reductions)."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..data.errors import DataError
from ..topology import load_topology
from ..topology.graph import Stage, Topology
from . import checkpoint as ckpt
from . import zero
from .exchange import Exchange, Worker, exchange_dtype, label_selectors, placement, seat_workers
from .loop import Collective, EpochLoop, EpochRecord, random_state
from .ray_progress import StepPoster
from .record import epoch_record, merge_reports
from .runtime import Runtime


def _groups(workers, replicas):
    """Exchange groups (one per replica index) and replica groups (one per peer group); every rank creates all."""
    exchange = {r: dist.new_group([w.rank for w in workers if w.replica == r]) for r in range(replicas)}
    by_peers: dict[tuple, list[int]] = {}
    for w in workers:
        by_peers.setdefault(w.peers, []).append(w.rank)
    replica = {g: dist.new_group(ranks) for g, ranks in by_peers.items()}
    return exchange, replica


def _grad_sync(group):
    """Average a peer's replicas' gradients (net and edge modules), weighted by shard size, in one all_reduce.

    Shards of the last batch can differ by one sample; weighting makes the result the
    gradient of the whole batch's mean loss, as one replica would compute it.
    """
    def sync(peers, shard_size: int):
        grads = [p.grad for peer in peers for p in peer.parameters() if p.grad is not None]
        if not grads:
            return
        n = float(shard_size)
        flat = torch.cat([g.reshape(-1) * n for g in grads] + [grads[0].new_tensor([n])])
        dist.all_reduce(flat, group=group)
        flat /= flat[-1].clone()
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
    return sync


def quiet_ray_train_logs() -> None:
    """Ray Train logs every report at INFO (from loggers named by file path); keep warnings only."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _seated(topology: Topology) -> list[Worker]:
    """Placement's workers with the Ray Train ranks that hold them: rank i holds worker i, unless peers ask for
    node labels, where each worker goes to a rank on a node that carries its labels (every rank calls this)."""
    workers = placement(topology)
    selectors = label_selectors(topology)
    if selectors is None:
        return workers
    import ray

    labels = [None] * dist.get_world_size()
    dist.all_gather_object(labels, dict(ray.get_runtime_context().get_node_labels()))
    return seat_workers(workers, selectors, labels)


class StepBuffer:
    """``--record-steps`` lines kept in the worker until its next report (the run directory is the driver's)."""

    def __init__(self):
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def flush(self) -> None:
        pass

    def drain(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class DistCollective(Collective):
    """The loop's hooks over torch.distributed: the exchange of taps, replicas' gradient sync and
    epoch sums, buffer broadcast, and eval/held-out logits gathered from every worker."""

    def __init__(self, topology: Topology, device: torch.device, profile: bool = False):
        self.topology, self.device, self.profile = topology, device, profile
        self.workers = _seated(topology)
        self.rank = dist.get_rank()
        self.index = next(i for i, w in enumerate(self.workers) if w.rank == self.rank)  # placement's worker
        self.me = self.workers[self.index]
        self.replica, self.replicas = self.me.replica, max(p.replicas for p in topology.config.peers.values())
        self.primary, self.leader = self.me.replica == 0, self.rank == 0
        exchange_groups, replica_groups = _groups(self.workers, self.replicas)
        self.exchange_group, self.replica_group = exchange_groups[self.me.replica], replica_groups[self.me.peers]
        self.own_groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
        self.routes: Exchange | None = None
        self.timings = {"wait": [], "exchange": []}

    def attach(self, rt: Runtime) -> None:
        c = self.topology.config
        self.routes = Exchange(self.topology, rt.plan, self.workers, self.me, self.exchange_group, self.device,
                               exchange_dtype(c.train.precision))
        if self.replicas > 1:
            rt.grad_sync = _grad_sync(self.replica_group)
            rt.gather.join(self.replica_group)  # batch-relational losses see the whole batch
        for name, peer in rt.peers.items():
            if peer.cfg.deepspeed is not None and peer.optimizer is not None:
                peer.ds = zero.wrap(peer, zero.read_config(name, peer.cfg.deepspeed.config),
                                    c.data.batch_size // self.replicas, self.replica_group, self.own_groups[self.rank])

    def enter_stage(self, stage: Stage) -> None:
        self.routes.enter_stage(stage)

    def exchange(self, outs, rows):
        if not self.profile:
            return self.routes(outs, rows)
        t1 = time.perf_counter()
        dist.barrier(group=self.exchange_group)
        t2 = time.perf_counter()
        got = self.routes(outs, rows)
        self.timings["wait"].append(t2 - t1)
        self.timings["exchange"].append(time.perf_counter() - t2)
        return got

    def reduce_sums(self, vec):
        if self.replicas > 1:
            dist.all_reduce(vec, group=self.replica_group)
        return vec

    @property
    def replica_source(self) -> int:
        """The rank of replica 0 of this worker's peers (what the other replicas copy)."""
        return next(w.rank for w in self.workers if w.peers == self.me.peers and w.replica == 0)

    def end_epoch(self, rt: Runtime) -> None:
        if self.replicas > 1:
            src = self.replica_source
            for peer in rt.peers.values():
                for buf in peer.buffers():
                    dist.broadcast(buf, src=src, group=self.replica_group)

    def share_weights(self, rt: Runtime, names: list[str]) -> None:
        if self.replicas > 1:
            src = self.replica_source
            for name in names:
                for t in rt.peers[name].net.state_dict().values():
                    dist.broadcast(t, src=src, group=self.replica_group)

    def gather(self, logits, labels):
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, ({k: v.cpu() for k, v in logits.items()},
                                          None if labels is None else labels.cpu()))
        everything, labels = {}, None
        for part, ys in gathered:
            everything.update(part)
            labels = ys if ys is not None else labels
        return everything, labels


class WorkerLoop(EpochLoop):
    """The epoch loop of one Ray Train worker: reports each epoch and its checkpoint part to Ray Train."""

    def __init__(self, topology: Topology, config: dict, device: torch.device):
        col = DistCollective(topology, device, profile=bool(config.get("profile")))
        super().__init__(topology, Path(config["out_dir"]), device, collective=col, peers=col.me.peers,
                         threads=config["threads"], stop_after=config.get("stop_after_epochs"),
                         step_log=f"rank{col.rank}" if config.get("record_steps") else None, plan=config["plan"])
        self.compute: list[float] = []
        self.steps = StepBuffer()
        self.record: EpochRecord | None = None
        self.history: list[dict] = []  # every epoch's record: rank 0's checkpoint commits it with the epoch's state
        channel = config.get("progress")  # the driver's progress channel (ray_progress)
        self.poster = StepPoster(channel, col.rank, col.primary) if channel is not None else None

    def started(self, state, info, steps_per_epoch, start_epoch) -> None:
        self.history = state.get("history", []) if state else []

    def epoch_started(self, epoch, stage, steps_per_epoch) -> None:
        if self.poster is not None:
            self.poster.epoch_started(epoch, stage.name, steps_per_epoch)

    def on_step(self, result) -> None:
        if self.poster is not None:
            self.poster.step_done(result.terms)
        if self.collective.profile:
            t = self.collective.timings
            n = len(self.rt.phases)
            self.compute.append(time.perf_counter() - self.step_started - sum(t["wait"][-n:]) - sum(t["exchange"][-n:]))

    def epoch_done(self, record: EpochRecord) -> None:
        col = self.collective
        self.record = record
        self.metrics = {"epoch": record.epoch, "stage": record.stage.name, "seconds": record.seconds, "rank": col.rank,
                        "train": record.train if col.primary else {}, "eval": record.evals}
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, self.metrics)
        self.history.append(epoch_record(self.topology.nodes, self.history, *merge_reports(reports)))

    def engine_state(self) -> dict:
        return {"history": self.history}

    def open_step_log(self):
        return self.steps

    def rng_file(self) -> str:
        """This worker's random state in the checkpoint (by placement's worker index, which a restart keeps)."""
        return f"rng_worker{self.collective.index}.pt"

    def checkpoint_files(self) -> dict:
        return {**super().checkpoint_files(), self.rng_file(): random_state(self.device)}

    def saved_rng(self, directory, state):
        path = Path(directory) / self.rng_file()
        return ckpt.load(path) if path.is_file() else None

    def save(self, epoch, files) -> None:
        import ray.train
        from ray.train import Checkpoint

        # what the driver's run directory gets from this worker travels with the report (the controller writes it)
        metrics = {**self.metrics, "pid": os.getpid(), "steps": self.steps.drain()}
        if self.collective.profile:
            metrics["profile"] = self.profile()
        with tempfile.TemporaryDirectory() as d:
            for name, obj in files.items():
                torch.save(obj, Path(d) / name)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if files else None)

    @contextlib.contextmanager
    def restored(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    def profile(self) -> dict:
        """Median per-step compute, waiting and exchange times of this rank so far (``<out>/profile/rank{r}.json``,
        written by the controller from the report)."""
        col = self.collective
        timings = {"compute": self.compute, **col.timings}
        med = {k: 1e3 * statistics.median(v[3:] or v) for k, v in timings.items() if v}
        n = len(self.compute) or 1
        return {
            "rank": col.rank, "peers": list(col.me.peers), "replica": col.replica,
            "compute_ms": med.get("compute"), "wait_ms": med.get("wait"), "exchange_ms": med.get("exchange"),
            "bytes_per_step": col.routes.bytes_sent / n, "mode": "all_gather" if col.routes.dense else "p2p",
            "steps": n,
        }


def train_worker(config: dict) -> None:
    """Ray Train entry point: run this rank's share of the topology, report once per epoch."""
    import ray.train

    quiet_ray_train_logs()
    topo = load_topology(config["raw"], check=False)
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    loop = WorkerLoop(topo, config, device)
    if loop.poster is not None:
        loop.poster.up(forward_warnings=not config.get("verbose"))
    try:
        loop.run()
    except DataError as err:  # data.root may differ per node: say which node lacks the data
        raise DataError(err.place, f"{err.message} (on node {socket.gethostname()}, "
                                   f"Ray node {ray.get_runtime_context().get_node_id()})") from None
