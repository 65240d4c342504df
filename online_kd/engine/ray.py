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

from ray.train import UserCallback

from ..errors import DivergenceError, TopologyError
from ..topology.graph import Topology
from .checkpoint import atomic_write_text
from .exchange import placement
from .local import RunOptions, check_inits
from .report import Reporter

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


def read_history(out: Path) -> list[dict]:
    """Per-epoch records of a run directory, one per epoch (a re-reported epoch keeps its last record);
    a record's ``epoch`` is the epoch's number (from 1), i.e. the epochs done when it ended."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    by_epoch = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]


def _options_dict(opts: RunOptions) -> dict:
    return {"out_dir": str(Path(opts.out_dir).resolve()), "tracking": opts.tracking, "quiet": opts.quiet,
            "tracking_uri": opts.tracking_uri}


class EpochReports(UserCallback):
    """Controller-side: merges every rank's epoch report and logs it once (MLflow, history, progress)."""

    def __init__(self, raw: dict, options: dict, tracker_state: dict | None):
        self.raw, self.options, self.tracker_state = raw, options, tracker_state
        self._reporter = None

    def _get_reporter(self) -> Reporter:
        if self._reporter is None:
            from ..topology import load_topology

            topo = load_topology(self.raw, check=False)
            opts = RunOptions(out_dir=Path(self.options["out_dir"]), tracking=self.options["tracking"],
                              quiet=self.options["quiet"], tracking_uri=self.options["tracking_uri"])
            self._reporter = Reporter(topo, opts, history=read_history(opts.out_dir), tracker_state=self.tracker_state)
            self._reporter.attach()
        return self._reporter

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        rep = self._get_reporter()
        epoch = metrics[0]["epoch"]  # the workers' 0-based loop index
        if checkpoint is not None:
            atomic_write_text(str(checkpoint.path), rep.out / "checkpoints" / "latest")
        if any(h["epoch"] == epoch + 1 for h in rep.history):
            return  # re-run after a restart: already logged once
        train: dict[str, dict] = {}
        evals: dict[str, dict] = {}
        for m in metrics:
            train.update(m.get("train", {}))
            evals.update(m.get("eval", {}))
        stage = next(s for s in rep.topology.stages if s.name == metrics[0]["stage"])
        rep.epoch_done(epoch, stage, train, evals, max(m["seconds"] for m in metrics))


class RayEngine:
    """Runs a topology with each peer (replica) as a Ray Train worker exchanging taps over torch.distributed."""

    def __init__(self, topology: Topology, options: RunOptions):
        self.topology, self.opt = topology, options

    def _check(self) -> None:
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
        from .worker import train_worker

        topo, c, opts = self.topology, self.topology.config, self.opt
        check_inits(topo)
        self._check()
        dataset_info(c.data)
        workers = placement(topo)
        world = len(workers)
        resources = dict(c.engine.resources_per_worker) or {"CPU": 1}
        use_gpu = resources.get("GPU", 0) > 0
        out = Path(opts.out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        tracker_file = out / "tracker.json"
        history = read_history(out) if opts.resume else []
        tracker_state = json.loads(tracker_file.read_text()) if opts.resume and tracker_file.is_file() else None
        reporter = Reporter(topo, opts, history=history, tracker_state=tracker_state)
        reporter.start(None, 0, history[-1]["epoch"] if history else 0)
        state = reporter.tracker_state()
        if state:
            tracker_file.write_text(json.dumps(state))

        self._ensure_ray(world, use_gpu)
        threads = c.train.threads or max(1, (os.cpu_count() or 1) // world)
        config = {"raw": topo.raw, "out_dir": str(out), "threads": threads, "use_gpu": use_gpu,
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
                callbacks=[EpochReports(topo.raw, _options_dict(opts), state)],
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
        reporter.history = read_history(out)
        if reporter.history and reporter.history[-1]["epoch"] < topo.total_epochs:
            reporter.stopped(reporter.history[-1]["epoch"])
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
