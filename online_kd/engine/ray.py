"""The ray engine: a Ray Train v2 ``TorchTrainer`` with one worker per peer replica.

The driver validates, opens the MLflow runs and starts the trainer; workers run
:func:`online_kd.engine.worker.train_worker`; a controller-side callback turns every rank's
per-epoch report into progress lines, MLflow metrics and the run directory's history.
Without an address, :func:`~online_kd.engine.raystart.ensure_ray` starts a local instance (loopback only,
token authentication): nothing to start by hand.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DivergenceError, TopologyError
from ..registry import register_engine
from ..topology.graph import Topology
from . import ray_checkpoint, ray_storage
from .base import Engine, Resources
from .exchange import label_selectors, placement
from .options import check_inits
from .ray_storage import alive_nodes, check_shared, recorded_storage
from .raystart import RayStarting
from .report import Reporter

#: most workers the ray engine starts for one topology
MAX_WORKERS = 1024


def ray_workers(topology: Topology) -> tuple[int, int, int]:
    """(workers, worker groups, replicas) that placement gives the ray engine, without listing them."""
    c = topology.config
    grouped = {p for g in c.engine.colocate for p in g}
    groups = len(c.engine.colocate) + sum(1 for p in c.peers if p not in grouped)
    replicas = max(p.replicas for p in c.peers.values())
    return groups * replicas, groups, replicas


def scaling_placement(topology: Topology) -> dict[str, Any]:
    """``ScalingConfig``'s placement arguments: the placement group strategy (``engine.placement``) and,
    when peers ask for node labels, one label selector per worker in placement's order."""
    selectors = label_selectors(topology)
    return {"placement_strategy": topology.config.engine.placement.upper(),
            **({"label_selector": selectors} if selectors is not None else {})}


def _replicas_place(topology: Topology) -> str:
    c = topology.config
    most = max(c.peers, key=lambda p: c.peers[p].replicas)
    return f"peers.{most}.replicas"


def check_cluster_resources(topology: Topology, available: Mapping[str, float] | None = None) -> None:
    """The workers that placement starts, each asking for ``resources_per_worker``, fit in the Ray
    cluster's resources (``ray.cluster_resources()`` when ``available`` is None); otherwise Ray Train
    would wait for them forever."""
    c = topology.config
    if available is None:
        import ray

        available = ray.cluster_resources()
    world, groups, replicas = ray_workers(topology)
    for name, amount in sorted((dict(c.engine.resources_per_worker) or {"CPU": 1.0}).items()):
        need, have = world * amount, float(available.get(name, 0))
        if need > have:
            where = _replicas_place(topology) if replicas > 1 else "engine.resources_per_worker"
            raise TopologyError(where, f"the ray engine starts {world} workers ({groups} peer group(s) × {replicas} "
                                       f"replica(s)) of {amount:g} {name} each: {need:g} {name} in all, but the Ray "
                                       f"cluster has {have:g}")


@register_engine("ray")
class RayEngine(Engine):
    """Runs a topology with each peer (replica) as a Ray Train worker exchanging taps over torch.distributed."""

    epochs_in_process = False  # the controller-side callback writes the epochs (metrics.jsonl)

    @classmethod
    def check(cls, topology: Topology) -> None:
        from ..losses import LOSSES

        c = topology.config
        producers = topology.producers
        if producers:
            raise TopologyError(f"{producers[0].origin}.kind", f"'{producers[0].kind}' stages run on the local engine "
                                                               "only (set engine.name: local)")
        colocated = {p: i for i, group in enumerate(c.engine.colocate) for p in group}
        for e in topology.edges:
            # a loss that reads the source network itself needs its source and target in one worker
            if not LOSSES[e.loss].needs_source_model or e.source == e.target or topology.kind(e.source) != "peer":
                continue
            if e.source not in colocated or colocated[e.source] != colocated.get(e.target):
                raise TopologyError(f"{e.origin}.loss",
                                    f"loss '{e.loss}' reads the network of '{e.source}' itself: on the ray engine put "
                                    f"'{e.source}' and '{e.target}' in one worker "
                                    f"(engine.colocate: [[{e.source}, {e.target}]])")
        world, groups, replicas = ray_workers(topology)
        if world > MAX_WORKERS:
            raise TopologyError(_replicas_place(topology), f"the ray engine would start {world:,} workers ({groups} "
                                                           f"peer group(s) × {replicas} replicas); at most {MAX_WORKERS:,}")
        label_selectors(topology)  # a colocated group's peers agree on their node labels

    @classmethod
    def resources(cls, topology: Topology) -> Resources:
        """The driver (a trial actor) on one CPU, and the resources of a worker per peer replica."""
        c = topology.config
        cpu_per_worker = float(dict(c.engine.resources_per_worker).get("CPU", 1))
        return Resources({"CPU": 1}, len(placement(topology)) * cpu_per_worker + 1)

    def _check(self) -> None:
        """What the ray engine checks when it starts: replica counts, colocated DeepSpeed peers, ZeRO configs."""
        c = self.topology.config
        counts = {p.replicas for p in c.peers.values()}
        if len(counts) > 1:
            first = next(iter(c.peers))
            odd = next(n for n, p in c.peers.items() if p.replicas != c.peers[first].replicas)
            raise TopologyError(f"peers.{odd}.replicas", f"every peer needs the same number of replicas on the ray "
                                                        f"engine ('{first}' has {c.peers[first].replicas})")
        for i, group in enumerate(c.engine.colocate):
            if len({c.peers[p].replicas for p in group}) > 1:
                raise TopologyError(f"engine.colocate[{i}]", "colocated peers need the same number of replicas")
            if any(c.peers[p].deepspeed for p in group):
                raise TopologyError(f"engine.colocate[{i}]", "a DeepSpeed peer needs a worker of its own "
                                                             "(DeepSpeed keeps one engine per process)")
        from .zero import read_config

        for name, p in c.peers.items():
            if p.deepspeed is not None:
                read_config(name, p.deepspeed.config)

    def run(self) -> dict[str, Any]:
        topo, c, opts = self.topology, self.topology.config, self.opt
        check_inits(topo)
        self._check()
        world = ray_workers(topo)[0]
        ray_up = RayStarting(max(os.cpu_count() or 1, world + 1),  # a logical CPU per worker, whatever the core count
                             log_to_driver=opts.verbose, logging_level="INFO" if opts.verbose else "WARNING")
        try:
            reporter, state, plan = self._prepare()
            reporter.phase("starting Ray…")
            started = ray_up.wait()
        except BaseException:
            ray_up.abandon()
            raise
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from .ray_progress import Relay, open_channel
        from .ray_reports import EpochReports, options_dict
        from .rendezvous import BoundStoreTorchConfig
        from .worker import train_worker

        check_cluster_resources(topo)
        channel = open_channel()
        resources = dict(c.engine.resources_per_worker) or {"CPU": 1}
        use_gpu = resources.get("GPU", 0) > 0
        out = Path(opts.out_dir).resolve()
        recorded = recorded_storage(out)  # a resumed run keeps the storage it started with
        check_shared(c.engine.storage or (recorded.base if recorded else None), alive_nodes())
        where = ray_storage.for_run(out, c.engine.storage, c.engine.storage_endpoint)
        threads = c.train.threads or max(1, (os.cpu_count() or 1) // world)
        config = {"raw": topo.raw, "plan": plan, "out_dir": str(out), "threads": threads, "use_gpu": use_gpu,
                  "record_steps": opts.record_steps, "profile": opts.profile,
                  "stop_after_epochs": opts.stop_after_epochs, "progress": channel, "verbose": opts.verbose}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            torch_config=BoundStoreTorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources,
                                         **scaling_placement(topo)),
            run_config=RunConfig(
                name=ray_storage.NAME, **where.run_config_args(),
                failure_config=FailureConfig(max_failures=c.engine.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[EpochReports(topo.raw, options_dict(opts), state, channel)],
                logging_config=LoggingConfig(log_level="INFO" if opts.verbose else "WARNING"),
            ),
        )
        relay = Relay(channel, reporter, world).start()
        try:
            result = trainer.fit()
        except Exception as err:
            reporter.failed(err)
            raise _translate(err, out) from None
        finally:
            relay.stop()
            import ray

            if started:
                ray.shutdown()  # now, not at exit: the summary is the run's last line
                ray_up.release()
            else:
                ray.kill(channel)  # a Tune trial's Ray lives on
        if result.error is not None:
            reporter.failed(result.error)
            raise _translate(result.error, out) from None
        reporter.history = reporter.run.history()
        if reporter.history and reporter.history[-1]["epoch"] < topo.total_epochs:
            reporter.stopped(reporter.history[-1]["epoch"])
            return reporter.summary(finished=False)
        return reporter.finish()

    def _prepare(self) -> tuple[Reporter, dict | None, Any]:
        """What the driver does while Ray starts: the plan's dry forward (once for every worker), the run
        directory, the reporter and its MLflow runs. Returns (reporter, tracker state, plan)."""
        from ..data import dataset_info
        from ..rundir import RunDir
        from ..topology.plan import build_plan

        topo, c, opts = self.topology, self.topology.config, self.opt
        with torch.random.fork_rng(devices=[]):
            plan = build_plan(topo, dataset_info(c.data))
        out = Path(opts.out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        tracker_file = RunDir(out).tracker
        notes: list[str] = []
        history = self._resume(out, notes.append) if opts.resume else []
        tracker_state = json.loads(tracker_file.read_text()) if opts.resume and tracker_file.is_file() else None
        reporter = Reporter(topo, opts, history=history, tracker_state=tracker_state)
        reporter.start(None, 0, history[-1]["epoch"] if history else 0)
        for note in notes:
            reporter.notice(note)
        state = reporter.tracker_state()
        if state:
            tracker_file.write_text(json.dumps(state))
        return reporter, state, plan

    @staticmethod
    def _resume(out: Path, say) -> list[dict]:
        """The history of the checkpoint Ray Train restores from ([] and a note when there is none)."""
        directory, state = ray_checkpoint.restore_point(out, say)
        if directory is None:
            say(f"--resume: no checkpoint under {ray_checkpoint.storage(out)} (stopped before its first epoch "
                "ended); starting from epoch 1")
            return []
        return state.get("history", [])


def _translate(err: BaseException, out: Path) -> BaseException:
    """A worker's DivergenceError comes back wrapped by Ray: unwrap it so the CLI reports it plainly,
    saying which checkpoint the run keeps."""
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, DivergenceError):
            return e.keeping(ray_checkpoint.kept_words(out))
        if isinstance(e, TopologyError):  # e.g. a worker's node without the data
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    text = str(err)
    if "DivergenceError" in text:
        line = next((ln for ln in text.splitlines() if "diverged at" in ln), text)
        return RuntimeError(f"{line.split('DivergenceError:')[-1].strip()} ({ray_checkpoint.kept_words(out)})")
    return err
