"""The local engine: every peer in one process, stages in order, one checkpoint per epoch."""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import TopologyError
from ..topology.graph import Topology
from . import checkpoint as ckpt
from .report import Reporter
from .step import Runtime, resolve_device, topk_correct


@dataclass
class RunOptions:
    """How to run a topology, beyond the YAML: where, whether to resume, tracking."""

    out_dir: Path
    resume: bool = False
    stop_after_epochs: int | None = None
    tracking_uri: str | None = None
    tracking: bool = True
    quiet: bool = False
    extra_tags: dict[str, str] = field(default_factory=dict)
    record_steps: bool = False  # write each step's per-peer loss to <out>/steps/ (engine equivalence checks)
    profile: bool = False       # ray engine: time compute, waiting and exchange per step into <out>/profile/
    parent_run_id: str | None = None  # MLflow run (a sweep or seed group) to nest this run's parent run under
    extra_params: dict[str, Any] = field(default_factory=dict)  # more MLflow params (a trial's overridden paths)
    on_epoch: Callable[[int, dict], None] | None = None  # called with (epoch number from 1, node metrics) after each epoch (Tune)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def stage_at(topology: Topology, epoch: int) -> tuple[int, int]:
    """(stage index, epoch within that stage) of a global epoch."""
    start = 0
    for i, s in enumerate(topology.stages):
        if epoch < start + s.epochs:
            return i, epoch - start
        start += s.epochs
    raise IndexError(epoch)


def check_inits(topology: Topology) -> None:
    """Every ``init`` checkpoint exists before anything starts."""
    for name, p in topology.config.peers.items():
        if p.init and not Path(p.init).expanduser().is_file():
            raise TopologyError(f"peers.{name}.init", f"no such checkpoint file '{p.init}'")


def produce_before(stage_idx: int, rt: Runtime, data, produced: dict, out_dir: Path, reporter: Reporter) -> None:
    """Make (or reload from the run directory) every produced set due before training stage ``stage_idx``."""
    from ..stages import ProduceContext, ProducedSet
    from ..topology.validate import build_stage_kind

    topo = rt.topology
    for p in topo.producers:
        if p.before > stage_idx or p.name in produced:
            continue
        path = Path(out_dir) / "produced" / f"{p.name}.pt"
        if path.is_file():
            produced[p.name] = ProducedSet.load(path)
            reporter.console.print(f"stage '{p.name}': reloaded {len(produced[p.name])} samples from {path}")
            continue
        kind = build_stage_kind(topo, p)
        ctx = ProduceContext(runtime=rt, data=data, topology=topo, out_dir=Path(out_dir), seed=topo.config.train.seed,
                             produced=produced, progress=reporter.task,
                             log=lambda message: reporter.console.print(message, markup=False))
        with torch.random.fork_rng(devices=[]):
            made = kind.run(ctx)
        made.save(path)
        produced[p.name] = made


def stage_train_stream(stage, data, produced: dict, default):
    """The training batches of a stage: its produced set when it names one, else the topology's."""
    from ..data import BatchStream

    if stage.data is None:
        return default
    made = produced[stage.data]
    return BatchStream(made.dataset(), default.batch_size, default.seed,
                       transform=data.train_transform if made.augment else None, shuffle=True)


class LocalEngine:
    """Runs a topology in this process: the design's synchronous step, evaluation, checkpoints."""

    def __init__(self, topology: Topology, options: RunOptions):
        self.topology, self.opt = topology, options

    def run(self) -> dict[str, Any]:
        from ..data import BatchStream, build_data

        topo, c = self.topology, self.topology.config
        check_inits(topo)
        if c.train.threads:
            torch.set_num_threads(c.train.threads)
        seed_everything(c.train.seed)
        data = build_data(c.data, c.train.seed)
        device = resolve_device(c.train.device)
        rt = Runtime(topo, data.info, device, train_targets=data.train.targets)
        rt.set_views(data.train, data.train_transform)
        bs = c.data.batch_size
        base_train = train = BatchStream(data.train, bs, c.train.seed, transform=data.train_transform, shuffle=True,
                                         sampler=data.train_sampler)
        test = BatchStream(data.test, c.data.test_batch_size or bs, c.train.seed, shuffle=False)
        holdout = BatchStream(data.holdout, c.data.test_batch_size or bs, c.train.seed, shuffle=False) \
            if data.holdout is not None else None

        if self.opt.record_steps:
            (self.opt.out_dir / "steps").mkdir(parents=True, exist_ok=True)
            rt.step_log = open(self.opt.out_dir / "steps" / "local.jsonl", "a")
        ckpt_root = self.opt.out_dir / "checkpoints"
        state = self._resume(rt, ckpt_root) if self.opt.resume else None
        reporter = Reporter(topo, self.opt, history=state["history"] if state else [],
                            tracker_state=state.get("tracker") if state else None)
        start_epoch = state["epoch"] if state else 0
        total = topo.total_epochs
        steps_per_epoch = min(len(train), c.train.max_steps_per_epoch or len(train))
        reporter.start(data.info, steps_per_epoch, start_epoch)
        done_here = 0
        produced: dict = {}
        try:
            for epoch in range(start_epoch, total):
                stage_idx, in_stage = stage_at(topo, epoch)
                stage = topo.stages[stage_idx]
                if rt.stage is not stage:
                    produce_before(stage_idx, rt, data, produced, self.opt.out_dir, reporter)
                    rt.enter_stage(stage)
                    train = stage_train_stream(stage, data, produced, base_train)
                    rt.use_recorded(getattr(train.dataset, "answers", None))  # a black box is not asked twice
                    steps_per_epoch = min(len(train), c.train.max_steps_per_epoch or len(train))
                    reporter.steps_per_epoch = steps_per_epoch
                sums: dict[str, dict[str, torch.Tensor]] = {}
                correct: dict[str, torch.Tensor] = {}
                seen = 0
                t0 = time.perf_counter()
                reporter.epoch_started(epoch, stage)
                for i, batch in enumerate(train.epoch(epoch)):
                    if i >= steps_per_epoch:
                        break
                    res = rt.train_step(batch, epoch, in_stage)
                    rt.refit_ensembles(holdout)
                    n = res.count
                    seen += n
                    for peer, terms in res.terms.items():
                        acc = sums.setdefault(peer, {})
                        for k, v in terms.items():
                            acc[k] = acc.get(k, 0.0) + v * n
                        correct[peer] = correct.get(peer, 0) + res.correct[peer]
                    reporter.step_done({p: t["loss"] for p, t in res.terms.items() if "loss" in t})
                rt.end_epoch()
                train_metrics = {
                    p: {**{k: float(v) / seen for k, v in ts.items()}, "train_top1": 100.0 * float(correct[p]) / seen,
                        "lr": rt.peers[p].optimizer.param_groups[0]["lr"]}
                    for p, ts in sums.items()
                }
                last = epoch == total - 1
                evals = self.evaluate(rt, test, epoch) if (epoch + 1) % c.train.eval_every == 0 or last else {}
                reporter.epoch_done(epoch, stage, train_metrics, evals, time.perf_counter() - t0)
                ckpt.write_checkpoint(ckpt_root, epoch, self._checkpoint_files(rt, epoch + 1, reporter))
                done_here += 1
                if self.opt.stop_after_epochs and done_here >= self.opt.stop_after_epochs and not last:
                    reporter.stopped(epoch + 1)
                    return reporter.summary(finished=False)
        except BaseException as err:
            reporter.failed(err)
            raise
        return reporter.finish()

    def evaluate(self, rt: Runtime, test, epoch: int) -> dict[str, dict[str, float]]:
        """Top-1/top-5 (%) on the test split for every peer that has been trained or initialised, and ensembles."""
        names = [p for p in rt.peers if rt.peers[p].trained_epochs > 0 or rt.peers[p].cfg.init]
        logits, y = rt.logits_over(test, names)
        logits.update(rt.ensemble_logits(logits))
        out = {}
        for node, z in logits.items():
            hits = topk_correct(z, y)
            out[node] = {"top1": 100.0 * hits[1] / len(y), "top5": 100.0 * hits[5] / len(y)}
        return out

    def _checkpoint_files(self, rt: Runtime, next_epoch: int, reporter: Reporter) -> dict[str, Any]:
        files = {ckpt.peer_file(n): p.state() for n, p in rt.peers.items()}
        files[ckpt.ENGINE_FILE] = {
            "epoch": next_epoch,
            "global_step": rt.global_step,
            "combiners": {n: m.state_dict() for n, m in rt.combiners.items()},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "history": reporter.history,
            "tracker": reporter.tracker_state(),
            "topology": rt.topology.to_yaml(),
        }
        return files

    def _resume(self, rt: Runtime, root: Path) -> dict[str, Any] | None:
        path = ckpt.latest_checkpoint(root)
        if path is None:
            raise TopologyError("--resume", f"no checkpoint under {root} to resume from")
        state = ckpt.load(path / ckpt.ENGINE_FILE)
        for name, peer in rt.peers.items():
            peer.load_state(ckpt.load(path / ckpt.peer_file(name), map_location=rt.device))
        for name, sd in state["combiners"].items():
            rt.combiners[name].load_state_dict(sd)
        rt.global_step = state["global_step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        return state

