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
from typing import Any

from ray.train import UserCallback

from ..errors import DivergenceError, TopologyError
from ..topology.graph import Topology
from ..topology.validate import check_cluster_resources
from . import ray_checkpoint
from .checkpoint import atomic_write_text, fault_point
from .exchange import placement
from .local import RunOptions, check_inits
from .raystart import ensure_ray
from .record import epoch_record, merge_reports, read_history
from .report import Reporter


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
        records = None
        if checkpoint is not None:  # Ray has committed it: its history is the truth, the records follow it
            fault_point("ray-reported")
            atomic_write_text(str(checkpoint.path), rep.out / "checkpoints" / "latest")
            records = ray_checkpoint.committed_history(checkpoint)
        if records is None:
            records = [epoch_record(rep.topology.nodes, rep.history, *merge_reports(metrics))]
        logged = {h["epoch"] for h in rep.history}
        for record in records:  # epochs a killed controller committed but never logged, then this one
            if record["epoch"] not in logged:  # a re-run after a restart is logged once
                rep.log_record(record)


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

    def run(self) -> dict[str, Any]:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from ..data import dataset_info
        from .rendezvous import BoundStoreTorchConfig
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
        notes: list[str] = []
        history = self._resume(out, notes.append) if opts.resume else []
        tracker_state = json.loads(tracker_file.read_text()) if opts.resume and tracker_file.is_file() else None
        reporter = Reporter(topo, opts, history=history, tracker_state=tracker_state)
        reporter.start(None, 0, history[-1]["epoch"] + 1 if history else 0)
        for note in notes:
            reporter.notice(note)
        state = reporter.tracker_state()
        if state:
            tracker_file.write_text(json.dumps(state))

        ensure_ray(max(os.cpu_count() or 1, world + 1))  # a logical CPU per worker, whatever the core count
        check_cluster_resources(topo)
        threads = c.train.threads or max(1, (os.cpu_count() or 1) // world)
        config = {"raw": topo.raw, "out_dir": str(out), "threads": threads, "use_gpu": use_gpu,
                  "record_steps": opts.record_steps, "profile": opts.profile,
                  "stop_after_epochs": opts.stop_after_epochs}
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=config,
            torch_config=BoundStoreTorchConfig(backend="nccl" if use_gpu else "gloo"),
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
            raise _translate(err, out) from None
        if result.error is not None:
            reporter.failed(result.error)
            raise _translate(result.error, out) from None
        reporter.history = read_history(out)
        if reporter.history and reporter.history[-1]["epoch"] + 1 < topo.total_epochs:
            reporter.stopped(reporter.history[-1]["epoch"] + 1)
            return reporter.summary(finished=False)
        return reporter.finish()

    @staticmethod
    def _resume(out: Path, say) -> list[dict]:
        """The history of the checkpoint Ray Train restores from ([] and a note when there is none)."""
        directory, state = ray_checkpoint.restore_point(out, say)
        if directory is None:
            say(f"--resume: no checkpoint under {ray_checkpoint.storage(out)} (stopped before its first epoch "
                "ended); starting from epoch 0")
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
        todo += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    text = str(err)
    if "DivergenceError" in text:
        line = next((ln for ln in text.splitlines() if "diverged at" in ln), text)
        return RuntimeError(f"{line.split('DivergenceError:')[-1].strip()} ({ray_checkpoint.kept_words(out)})")
    return err
