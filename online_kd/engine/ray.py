"""The ray engine: a Ray Train v2 ``TorchTrainer`` with one worker per peer replica.

The driver validates, opens the MLflow runs and starts the trainer; workers run
:func:`online_kd.engine.worker.train_worker`; a controller-side callback turns every rank's
per-epoch report into progress lines, MLflow metrics and the run directory's history.
Without an address, ``ray.init()`` starts a local instance: nothing to start by hand.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import DivergenceError, TopologyError
from ..registry import register_engine
from ..topology.graph import Topology
from .base import Engine, Resources
from .exchange import placement
from .options import check_inits
from .report import Reporter

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


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
        for e in topology.edges:
            # replicas each see a shard of the batch: a loss relating a batch's samples would relate only a shard's
            if not LOSSES[e.loss].relates_samples:
                continue
            for p in (e.target, *sorted(topology.peer_sources(e.source))):
                if c.peers[p].replicas > 1:
                    raise TopologyError(f"peers.{p}.replicas",
                                        f"{c.peers[p].replicas} replicas would each relate only their shard of the "
                                        f"batch in loss '{e.loss}' ({e.origin}, {e.source}→{e.target}), which relates "
                                        f"a batch's samples to each other: use replicas: 1 for its peers")

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

    def _ensure_ray(self, world: int, use_gpu: bool) -> None:
        import ray

        preset = HEALTH_CHECK_ENV in os.environ  # e.g. by a job's runtime env, which ray.init must not contradict
        os.environ.setdefault(HEALTH_CHECK_ENV, "0.25")
        if ray.is_initialized():
            return
        env = None if preset else {"env_vars": {HEALTH_CHECK_ENV: os.environ[HEALTH_CHECK_ENV]}}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=env, log_to_driver=True)
        else:  # a local instance with a logical CPU per worker, whatever the core count
            ray.init(num_cpus=max(os.cpu_count() or 1, world + 1), runtime_env=env, log_to_driver=True)

    def run(self) -> dict[str, Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from ..data import dataset_info
        from ..rundir import RunDir
        from .ray_reports import EpochReports, options_dict
        from .worker import train_worker

        topo, c, opts = self.topology, self.topology.config, self.opt
        check_inits(topo)
        self._check()
        from ..topology.plan import build_plan

        with torch.random.fork_rng(devices=[]):
            plan = build_plan(topo, dataset_info(c.data))  # the dry forward, once for every worker
        workers = placement(topo)
        world = len(workers)
        resources = dict(c.engine.resources_per_worker) or {"CPU": 1}
        use_gpu = resources.get("GPU", 0) > 0
        out = Path(opts.out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        run = RunDir(out)
        tracker_file = run.tracker
        history = run.history() if opts.resume else []
        tracker_state = json.loads(tracker_file.read_text()) if opts.resume and tracker_file.is_file() else None
        reporter = Reporter(topo, opts, history=history, tracker_state=tracker_state)
        reporter.start(None, 0, history[-1]["epoch"] + 1 if history else 0)
        state = reporter.tracker_state()
        if state:
            tracker_file.write_text(json.dumps(state))

        self._ensure_ray(world, use_gpu)
        threads = c.train.threads or max(1, (os.cpu_count() or 1) // world)
        config = {"raw": topo.raw, "plan": plan, "out_dir": str(out), "threads": threads, "use_gpu": use_gpu,
                  "record_steps": opts.record_steps, "profile": opts.profile,
                  "stop_after_epochs": opts.stop_after_epochs}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name="ray", storage_path=str(out / "ray"),
                failure_config=FailureConfig(max_failures=c.engine.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                callbacks=[EpochReports(topo.raw, options_dict(opts), state)],
            ),
        )
        try:
            result = trainer.fit()
        except Exception as err:
            reporter.failed(err)
            raise _translate(err) from None
        if result.error is not None:
            reporter.failed(result.error)
            raise _translate(result.error) from None
        reporter.history = run.history()
        if reporter.history and reporter.history[-1]["epoch"] + 1 < topo.total_epochs:
            reporter.stopped(reporter.history[-1]["epoch"] + 1)
            return reporter.summary(finished=False)
        return reporter.finish()


def _translate(err: BaseException) -> BaseException:
    """A worker's DivergenceError comes back wrapped by Ray: unwrap it so the CLI reports it plainly."""
    seen = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        if isinstance(e, DivergenceError):
            return e
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    text = str(err)
    if "DivergenceError" in text:
        line = next((ln for ln in text.splitlines() if "diverged at" in ln), text)
        return RuntimeError(line.split("DivergenceError:")[-1].strip())
    return err
