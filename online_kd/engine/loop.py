"""The one epoch loop both engines drive: stage entry, steps, sums, evaluation, ensemble refits,
checkpoint contents and resume.

A worker holds some peers (the local engine: all of them) and a :class:`Collective` through which
it shares what the other workers need: taps every step, replicas' gradients, epoch sums, eval and
held-out logits. The base :class:`Collective` is one worker holding every peer: nothing to share.
An engine subclasses :class:`EpochLoop` for where results go (hooks ``started``, ``epoch_started``,
``on_step``, ``epoch_done``, ``save``, ``restored``); the loop itself lives here only.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from ..topology.graph import Stage, Topology
from . import checkpoint as ckpt
from . import zero
from .options import seed_everything, stage_at
from .runtime import Outputs, Runtime, StepResult, topk_correct


class Collective:
    """What a worker shares with the others; this one holds every peer, so every hook is a no-op.

    ``replica``/``replicas``: this worker's shard of each batch. ``primary``: it reports its peers
    (replica 0: peer checkpoints, train metrics, eval logits). ``leader``: it scores and writes the
    engine state (rank 0).
    """

    replica, replicas = 0, 1
    primary = leader = True

    def attach(self, rt: Runtime) -> None:
        """Set up what needs the worker's runtime (routes, gradient sync, ZeRO engines)."""

    def enter_stage(self, stage: Stage) -> None:
        """The routes of a stage's taps between workers."""

    def exchange(self, outs: Outputs, rows: int) -> Outputs:
        """Taps of the peers other workers hold, received for this step (``rows`` per tap)."""
        return {}

    def reduce_sums(self, vec: Tensor) -> Tensor:
        """A peer's epoch sums added over its replicas."""
        return vec

    def end_epoch(self, rt: Runtime) -> None:
        """Make replicas agree at the end of an epoch (BatchNorm statistics)."""

    def gather(self, logits: dict[str, Tensor], labels: Tensor | None) -> tuple[dict[str, Tensor], Tensor | None]:
        """Every worker's logits (peer → logits over a split) and the split's labels, on every worker."""
        return logits, labels

    def share_weights(self, rt: Runtime, names: list[str]) -> None:
        """Replicas take replica 0's weights of the peers ``names`` (a stage's ``hand_over: best``)."""


@dataclass
class EpochRecord:
    """What one epoch produced: per-node train metrics and evaluation (top-1/top-5 %), and its duration."""

    epoch: int
    stage: Stage
    train: dict[str, dict[str, float]]
    evals: dict[str, dict[str, float]]
    seconds: float


def random_state(device: torch.device) -> dict[str, Any]:
    """This process's random state (torch, python, and the device's when it is a GPU), as checkpoints keep it
    so that a resumed run draws what the uninterrupted one would (dropout, random losses)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class _NoBar:
    def advance(self, n: int = 1) -> None:
        pass


class EpochLoop:
    """Builds a worker's runtime and data streams and trains its peers epoch by epoch through the stages.

    ``peers``: the peers this worker holds (None: all); ``step_log``: a name for ``<out>/steps/<name>.jsonl``,
    each step's per-peer loss (engine equivalence checks). ``run()`` returns True when the last epoch
    was trained, False when it stopped after ``stop_after`` epochs.
    """

    def __init__(self, topology: Topology, out_dir: Path, device: torch.device, collective: Collective | None = None,
                 peers=None, threads: int | None = None, stop_after: int | None = None, step_log: str | None = None,
                 plan=None):
        self.topology, self.out_dir, self.device = topology, Path(out_dir), device
        self.collective = collective or Collective()
        self.peers, self.threads, self.stop_after, self.step_log = peers, threads, stop_after, step_log
        self.plan = plan  # the topology's ExchangePlan when the dry forward already ran (else the Runtime runs it)
        self.rt: Runtime | None = None
        self.next_epoch = 0
        self.step_started = 0.0  # perf_counter() when the current step began (profiling hooks)

    # ------------------------------------------------------------------ hooks
    def started(self, state: dict | None, info, steps_per_epoch: int, start_epoch: int) -> None:
        """Before the first epoch, with the engine state resumed from (or None)."""

    def epoch_started(self, epoch: int, stage: Stage, steps_per_epoch: int) -> None:
        """An epoch begins."""

    def on_step(self, result: StepResult) -> None:
        """A step ended (its detached loss terms and correct counts)."""

    def epoch_done(self, record: EpochRecord) -> None:
        """An epoch's metrics, before its checkpoint is saved."""

    def engine_state(self) -> dict[str, Any]:
        """More entries of the checkpoint's engine file."""
        return {}

    def save(self, epoch: int, files: dict[str, Any]) -> None:
        """Keep the checkpoint of ``epoch`` (file name → object)."""

    @contextlib.contextmanager
    def restored(self) -> Iterator[Path | None]:
        """The checkpoint directory to resume from, or None to start afresh."""
        yield None

    def open_step_log(self):
        """Where each step's per-peer losses go (an object with ``write``/``flush``): ``<out>/steps/<name>.jsonl``."""
        (self.out_dir / "steps").mkdir(parents=True, exist_ok=True)
        return open(self.out_dir / "steps" / f"{self.step_log}.jsonl", "a")

    def saved_rng(self, directory: Path, state: dict[str, Any]) -> dict[str, Any] | None:
        """The random state a checkpoint holds for this worker (``torch``, ``python``), or None."""
        return state.get("rng")

    def log(self, message: str) -> None:
        print(message, file=sys.stderr)

    def task(self, description: str, total: int):
        """Progress of work outside the epochs (a producing stage)."""
        return contextlib.nullcontext(_NoBar())

    # ------------------------------------------------------------------ the loop
    def run(self) -> bool:
        from ..data import BatchStream, build_data

        topo, c, col = self.topology, self.topology.config, self.collective
        if self.threads:
            torch.set_num_threads(self.threads)
        seed_everything(c.train.seed)
        data = build_data(c.data, c.train.seed)
        rt = self.rt = Runtime(topo, data.info, self.device, owned=self.peers, train_targets=data.train.targets,
                                 plan=self.plan)
        rt.set_views(data.train, data.train_transform)
        col.attach(rt)
        bs, eval_bs = c.data.batch_size, c.data.test_batch_size or c.data.batch_size
        base_train = train = BatchStream(data.train, bs, c.train.seed, transform=data.train_transform, shuffle=True,
                                         num_shards=col.replicas, shard=col.replica, sampler=data.train_sampler,
                                         loader=data.loader.on(self.device))
        test = BatchStream(data.test, eval_bs, c.train.seed, shuffle=False, loader=data.loader.on(self.device))
        holdout = BatchStream(data.holdout, eval_bs, c.train.seed, shuffle=False) if data.holdout is not None else None
        if self.step_log:
            rt.step_log = self.open_step_log()

        state = self._resume()
        start_epoch = self.next_epoch = state["epoch"] if state else 0
        steps = min(len(train), c.train.max_steps_per_epoch or len(train))
        self.started(state, data.info, steps, start_epoch)
        produced: dict = {}
        total = topo.total_epochs
        for done, epoch in enumerate(range(start_epoch, total)):
            if self.stop_after and done >= self.stop_after:
                return False
            stage_idx, in_stage = stage_at(topo, epoch)
            stage = topo.stages[stage_idx]
            if rt.stage is not stage:
                self._produce_before(stage_idx, data, produced)
                rt.enter_stage(stage)
                col.enter_stage(stage)
                train = _stage_train_stream(stage, data, produced, base_train)
                rt.use_recorded(getattr(train.dataset, "answers", None))  # a black box is not asked twice
                steps = rt.steps_per_epoch = min(len(train), c.train.max_steps_per_epoch or len(train))
            sums: dict[str, dict[str, Tensor]] = {}
            correct: dict[str, Tensor] = {}
            seen = 0
            t0 = time.perf_counter()
            self.epoch_started(epoch, stage, steps)
            for i, batch in enumerate(train.epoch(epoch)):
                if i >= steps:
                    break
                self.step_started = time.perf_counter()
                res = rt.train_step(batch, epoch, in_stage, exchange=col.exchange)
                rt.refit_ensembles(holdout, gather=col.gather, contribute=col.primary)
                seen += res.count
                for peer, terms in res.terms.items():
                    acc = sums.setdefault(peer, {})
                    for k, v in terms.items():
                        acc[k] = acc.get(k, 0.0) + v * res.count
                    correct[peer] = correct.get(peer, 0) + res.correct[peer]
                self.on_step(res)
            rt.end_epoch()
            train_metrics = self._means(sums, correct, seen)
            col.end_epoch(rt)
            last = epoch == total - 1
            evals = self._evaluate(test) if (epoch + 1) % c.train.eval_every == 0 or last else {}
            if in_stage == stage.epochs - 1 and stage.hand_over == "best":
                rt.end_stage()  # the best epoch's weights go on (replica 0 noted them)
                col.share_weights(rt, [p for p in stage.train if p in rt.peers])
            self.epoch_done(EpochRecord(epoch, stage, train_metrics, evals, time.perf_counter() - t0))
            self.next_epoch = epoch + 1
            self.save(epoch, self.checkpoint_files())
        return True

    # ------------------------------------------------------------------ sums and scores
    def _means(self, sums, correct, seen) -> dict[str, dict[str, float]]:
        """Per-peer epoch means of the loss terms and train accuracy, over the peer's replicas."""
        out = {}
        for peer, terms in sums.items():
            keys = sorted(terms)  # the same order on every replica
            vec = torch.tensor([float(terms[k]) for k in keys] + [float(correct[peer]), float(seen)],
                               dtype=torch.float64)
            vec = self.collective.reduce_sums(vec)
            n = float(vec[-1])
            means = {k: float(vec[i]) / n for i, k in enumerate(keys)}
            out[peer] = {**{k: means[k] for k in terms}, "train_top1": 100.0 * float(vec[-2]) / n,
                         "lr": self.rt.peers[peer].optimizer.param_groups[0]["lr"]}
        return out

    def _evaluate(self, test) -> dict[str, dict[str, float]]:
        """Top-1/top-5 (%) on the test split of every peer trained or initialised so far, and of the ensembles."""
        rt, col = self.rt, self.collective
        names = [p for p, peer in rt.peers.items() if col.primary and (peer.trained_epochs > 0 or peer.cfg.init)]
        own, y = rt.logits_over(test, names) if names else ({}, None)
        if own and rt.stage is not None and rt.stage.hand_over == "best":  # each owner notes its peers' scores
            rt.note_eval({n: 100.0 * topk_correct(z, y)[1] / len(y) for n, z in own.items()})
        logits, y = col.gather(own, y)
        if not col.leader or y is None:
            return {}
        logits.update(rt.ensemble_logits({k: v.to(rt.device) for k, v in logits.items()}))
        out = {}
        for node, z in logits.items():
            hits = topk_correct(z.to(y.device), y)
            out[node] = {"top1": 100.0 * hits[1] / len(y), "top5": 100.0 * hits[5] / len(y)}
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_files(self) -> dict[str, Any]:
        """This worker's part of the checkpoint after the epoch just trained: peer files (primary), its
        ZeRO optimizer partitions, and the engine state (leader)."""
        rt, col = self.rt, self.collective
        files: dict[str, Any] = {}
        for name, peer in rt.peers.items():
            if col.primary:
                files[ckpt.peer_file(name)] = peer.state()
            if peer.ds is not None:  # each replica holds its own ZeRO partition of the optimizer
                files[zero.state_file(name, col.replica)] = zero.optimizer_state(peer)
        if col.leader:
            files[ckpt.ENGINE_FILE] = {"epoch": self.next_epoch, "global_step": rt.global_step,
                                       "combiners": {n: m.state_dict() for n, m in rt.combiners.items()},
                                       **self.engine_state()}
        return files

    def _resume(self) -> dict[str, Any] | None:
        """Load the peers, ensembles, step count (and random state, where saved) of the checkpoint
        :meth:`restored` names; its engine state, or None."""
        rt = self.rt
        with self.restored() as d:
            if d is None:
                return None
            d = Path(d)
            for name, peer in rt.peers.items():
                peer.load_state(ckpt.load(d / ckpt.peer_file(name), map_location=rt.device))
                if peer.ds is not None:
                    parts = [zero.load_optimizer_state(d / zero.state_file(name, r))
                             for r in range(self.collective.replicas)]
                    peer.ds.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
            state = ckpt.load(d / ckpt.ENGINE_FILE)
            rng = self.saved_rng(d, state)
        for name, sd in state["combiners"].items():
            rt.combiners[name].load_state_dict(sd)
        rt.global_step = state["global_step"]
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        return state

    # ------------------------------------------------------------------ produced data sets
    def _produce_before(self, stage_idx: int, data, produced: dict) -> None:
        """Make (or reload from the run directory) every produced set due before training stage ``stage_idx``."""
        from ..stages import ProduceContext, ProducedSet
        from ..topology.validate import build_stage_kind

        topo = self.topology
        for p in topo.producers:
            if p.before > stage_idx or p.name in produced:
                continue
            path = self.out_dir / "produced" / f"{p.name}.pt"
            if path.is_file():
                produced[p.name] = ProducedSet.load(path)
                self.log(f"stage '{p.name}': reloaded {len(produced[p.name])} samples from {path}")
                continue
            kind = build_stage_kind(topo, p)
            ctx = ProduceContext(runtime=self.rt, data=data, topology=topo, out_dir=self.out_dir,
                                 seed=topo.config.train.seed, produced=produced, progress=self.task, log=self.log)
            with torch.random.fork_rng(devices=[]):
                made = kind.run(ctx)
            made.save(path)
            produced[p.name] = made


def _stage_train_stream(stage, data, produced: dict, default):
    """The training batches of a stage: its produced set when it names one, else the topology's."""
    from ..data import BatchStream

    if stage.data is None:
        return default
    made = produced[stage.data]
    return BatchStream(made.dataset(), default.batch_size, default.seed,
                       transform=data.train_transform if made.augment else None, shuffle=True, loader=default.loader)
