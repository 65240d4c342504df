"""The run-time state of a worker's peers and the synchronous step: forward, derived nodes, losses, update.

Both engines drive the same :class:`Runtime` from one epoch loop (engine/loop.py); the local engine
holds every peer, a ray worker only its own and receives the other peers' taps before computing losses.
"""
from __future__ import annotations

import contextlib
import copy
import json
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DivergenceError, TopologyError
from ..losses.base import Clock
from ..models import TappedModel
from ..topology.graph import Stage, Topology
from ..topology.plan import ExchangePlan, active_edges, peers_in_use
from . import checkpoint as ckpt
from .accel import accelerate
from ..data.expand import build_expansion
from ..build import (build_combiner, build_loss, build_model_for, build_optimizer, build_scheduler, build_virtual,
                     step_warmup_factor)
from .gather import ReplicaGather

Outputs = dict[str, dict[str, Tensor]]


def peer_seed(seed: int, name: str) -> int:
    """A peer's own seed, derived from the run's seed and its name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _unique_groups(groups: list[dict]) -> list[dict]:
    """Drop parameters already in an earlier group (two edges into one peer both list its net)."""
    seen, out = set(), []
    for g in groups:
        params = [p for p in g["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append({**g, "params": params})
    return out


class Peer(nn.Module):
    """A peer at run time: its network, the edge modules it owns, its optimizer and schedule."""

    def __init__(self, name: str, topology: Topology, info, device: torch.device):
        super().__init__()
        cfg = topology.config.peers[name]
        self.peer_name, self.cfg = name, cfg
        with torch.random.fork_rng(devices=[]):
            # each peer's initial weights depend on (seed, name) only, not on which process builds it
            torch.manual_seed(peer_seed(topology.config.train.seed, name))
            self.net = build_model_for(cfg, info)
        if cfg.init:
            try:
                ckpt.load_init_into(self.net, cfg.init)
            except ValueError as err:
                raise TopologyError(f"peers.{name}.init", str(err)) from None
        self.tapped = TappedModel(self.net)
        self.edges = nn.ModuleDict()  # edge.key → EdgeLoss, parameters owned by this peer
        self.to(device)
        accelerate(self.net, self.tapped, topology.config.train)  # train.channels_last, train.compile
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
        self.phase_optimizers: dict[int, torch.optim.Optimizer] = {}
        self.ds = None  # a DeepSpeed engine when the peer's replicas use ZeRO (ray engine)
        self.trained_epochs = 0
        self.epoch_steps = 0  # optimizer steps in the current epoch (a per-step warm-up reads it)
        self.best: dict | None = None  # under a stage's hand_over: best: {'stage', 'top1', 'model'} of its best epoch

    def warm_up(self, steps_per_epoch: int | None) -> None:
        """Set this step's lr under ``schedule.warmup_per: step``: the epoch's lr × (k+1)/(W·S)."""
        if self.cfg.schedule.warmup_per != "step" or self.optimizer is None:
            return
        if not steps_per_epoch:
            raise RuntimeError("a per-step warm-up needs the engine to set Runtime.steps_per_epoch")
        f = step_warmup_factor(self.cfg.schedule, self.trained_epochs * steps_per_epoch + self.epoch_steps,
                               steps_per_epoch)
        if f is not None:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr * f

    def setup_training(self, total_epochs: int, precision: str, device: torch.device) -> None:
        """Optimizer over the net and edge modules (a loss may ask for its own lr), schedule, scaler."""
        groups = [{"params": list(self.net.parameters())}]
        phased: dict[int, list[dict]] = {}
        for loss in self.edges.values():
            if loss.phase == 0:
                groups += loss.param_groups()
            else:
                phased.setdefault(loss.phase, []).extend(loss.phase_param_groups(self.net))
        groups = [g for g in groups if g["params"]]
        self.optimizer = build_optimizer(self.cfg.optimizer, groups)
        # later phases (AFD's adversarial step) update with their own optimizer and constant lr
        self.phase_optimizers = {ph: build_optimizer(self.cfg.optimizer, _unique_groups(gs)) for ph, gs in phased.items()}
        self.scheduler = build_scheduler(self.cfg.schedule, self.optimizer, total_epochs)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def state(self) -> dict:
        return {
            "model": self.net.state_dict(),
            "edges": {k: m.state_dict() for k, m in self.edges.items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer and self.ds is None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "phase_optimizers": {str(k): o.state_dict() for k, o in self.phase_optimizers.items()},
            "trained_epochs": self.trained_epochs,
            "best": self.best,
        }

    def load_state(self, state: Mapping) -> None:
        self.net.load_state_dict(state["model"])
        for k, sd in state["edges"].items():
            self.edges[k].load_state_dict(sd)
        if self.optimizer and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for k, sd in state.get("phase_optimizers", {}).items():
            self.phase_optimizers[int(k)].load_state_dict(sd)
        self.trained_epochs = state["trained_epochs"]
        self.best = state.get("best")


@dataclass
class StepResult:
    """Detached loss terms of one step, per trained peer: {'loss', 'task', 'edge/…'} and correct counts."""

    terms: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    correct: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0


class Runtime:
    """Live peers, ensembles, virtual teachers and edge losses for one topology.

    ``owned`` restricts which peers this process builds (a ray worker's placement); the
    local engine owns them all.
    """

    def __init__(self, topology: Topology, info, device: torch.device | str = "cpu", owned: Iterable[str] | None = None,
                 train_targets: Tensor | None = None, plan: ExchangePlan | None = None):
        self.topology, self.info = topology, info
        self.device = torch.device(device)
        c = topology.config
        self.owned = list(owned) if owned is not None else list(c.peers)
        self.expansion = build_expansion(c.data.expand)  # data.expand: rows per sample, anchor rows, joint labels
        self.peers: dict[str, Peer] = {p: Peer(p, topology, info, self.device) for p in self.owned}
        self.losses: dict[int, nn.Module] = {}
        for e in topology.edges:
            if e.target in self.peers:
                loss = build_loss(e)
                self.peers[e.target].edges[e.key] = loss
                self.losses[e.index] = loss
        self._build_edge_modules(plan)
        self.clock = Clock()  # the one clock every loss reads (EdgeContext.clock); advanced in finish_step
        self.gather = ReplicaGather()  # EdgeContext.gather: the identity until a ray worker joins its replica group
        self._attach_edges(train_targets)
        total = {p: sum(s.epochs for s in topology.stages if p in s.train) for p in self.peers}
        for name, peer in self.peers.items():
            if total[name]:
                peer.setup_training(total[name], c.train.precision, self.device)
        self.combiners = nn.ModuleDict({n: build_combiner(e) for n, e in c.ensembles.items()}).to(self.device)
        self.virtual = nn.ModuleDict({n: build_virtual(v, info.num_classes) for n, v in c.virtual.items()}).to(self.device)
        self.precision = c.train.precision
        self.stage: Stage | None = None
        self.phases = [0]
        self.global_step = 0
        self._views: dict[int, object] = {}
        self._view_data = None
        self.steps_per_epoch: int | None = None  # set by the engine per stage (a per-step warm-up needs it)
        self.step_log = None  # an open file: one JSON line per step and trained peer (equivalence tests)
        self.grad_sync: Callable[[list[Peer], int], None] | None = None  # replicas average gradients here
        self.step_samples = 0
        self.queries: dict[str, int] = {p: 0 for p, peer in self.peers.items() if peer.cfg.blackbox}
        self.recorded: dict[str, Tensor] = {}  # black-box peer → its answers recorded with the stage's data set

    def _build_edge_modules(self, plan: ExchangePlan | None) -> None:
        """Let each owned edge loss see its taps' shapes (the plan's dry forward, run here unless given) and
        create its modules."""
        if plan is None:
            from ..topology.plan import build_plan

            with torch.random.fork_rng(devices=[]):  # whoever runs the dry forward, training draws alike
                plan = build_plan(self.topology, self.info)
        self.plan = plan
        logit_shape = torch.Size((self.info.num_classes,))
        for e in self.topology.edges:
            if e.index not in self.losses:
                continue
            src = plan.shapes[e.source] if self.topology.kind(e.source) == "peer" else {"logits": logit_shape}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(peer_seed(self.topology.config.train.seed, e.key))
                self.losses[e.index].build({k: torch.Size(v) for k, v in src.items()},
                                           {k: torch.Size(v) for k, v in plan.shapes[e.target].items()})
            self.losses[e.index].to(self.device)

    def _attach_edges(self, train_targets: Tensor | None) -> None:
        """Hand each owned loss its context; a loss that reads the source network needs it in this process."""
        from ..losses import EdgeContext

        for e in self.topology.edges:
            loss = self.losses.get(e.index)
            if loss is None:
                continue
            source = self.peers[e.source].net if e.source in self.peers else None
            if loss.needs_source_model and source is None:
                raise TopologyError(e.origin, f"loss '{e.loss}' reads the source network itself: put '{e.source}' "
                                              f"and '{e.target}' in one worker (engine.colocate)")
            try:
                loss.attach(EdgeContext(source_model=source, train_targets=train_targets,
                                        num_train=None if train_targets is None else len(train_targets),
                                        num_classes=self.info.num_classes, target_model=self.peers[e.target].net,
                                        clock=self.clock, gather=self.gather, seed=self.topology.config.train.seed,
                                        expansion=self.expansion))
            except ValueError as err:
                raise TopologyError(e.origin, f"{e.source}→{e.target} ({e.loss}): {err}") from None

    # ------------------------------------------------------------------ stage
    def enter_stage(self, stage: Stage) -> None:
        """Train mode for the stage's peers, eval mode for the rest; hooks for the taps it reads."""
        self.stage = stage
        self.clock.stage_epochs = stage.epochs
        self.recorded = {}
        self.active = active_edges(self.topology, stage)
        self.in_use = peers_in_use(self.topology, stage)
        taps = self.plan.stage_taps[next(i for i, s in enumerate(self.topology.stages) if s is stage)]
        self.phases = sorted({0} | {self.losses[e.index].phase for e in self.active if e.index in self.losses})
        for name, peer in self.peers.items():
            peer.tapped.set_taps(sorted(taps[name] - {"logits"}))
            trained = name in stage.train
            peer.net.train(trained)
            peer.edges.train(trained)
            peer.net.requires_grad_(trained)
            if not trained and peer.cfg.bn_mode == "train":
                for m in peer.net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.train()
            if name in stage.freeze_bn:  # running statistics stay those of the data the peer was built on
                for m in peer.net.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def note_eval(self, top1: Mapping[str, float]) -> None:
        """Under the stage's ``hand_over: best``: copy each owned trained peer's weights when its test top-1 (%)
        is its best in this stage so far (ties: the later epoch, as Tf-KD's ``is_best = acc >= best``)."""
        if self.stage is None or self.stage.hand_over != "best":
            return
        for name in self.stage.train:
            peer = self.peers.get(name)
            if peer is None or name not in top1:
                continue
            b = peer.best
            if b is None or b["stage"] != self.stage.name or top1[name] >= b["top1"]:
                peer.best = {"stage": self.stage.name, "top1": float(top1[name]),
                             "model": {k: v.detach().clone() for k, v in peer.net.state_dict().items()}}

    def end_stage(self) -> None:
        """After a stage's last epoch under ``hand_over: best``: its trained peers take their best-epoch weights."""
        if self.stage is None or self.stage.hand_over != "best":
            return
        for name in self.stage.train:
            peer = self.peers.get(name)
            if peer is not None and peer.best is not None and peer.best["stage"] == self.stage.name:
                peer.net.load_state_dict(peer.best["model"])

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ views
    def set_views(self, dataset, transform) -> None:
        """Per-view copies of the training augmentation, for peers with ``view: k`` (KDCL's distorted views).

        View k's draws are seeded by (seed, k, epoch, sample index): every worker count sees the same views.
        """
        from ..data.hashing import generator_seed

        self._view_data, self._views = dataset, {}
        for peer in self.peers.values():
            v = peer.cfg.view
            if v and transform is not None and v not in self._views:
                t = copy.copy(transform)
                t.seed = generator_seed(transform.seed, "view", v)
                self._views[v] = t

    @property
    def uses_views(self) -> bool:
        return bool(self._views)

    def inputs(self, batch, epoch: int) -> dict[str, Tensor]:
        """Each owned peer's input: the batch itself, or its own view of the same samples."""
        xs, cache = {}, {}
        for name, peer in self.peers.items():
            v = peer.cfg.view
            if v in self._views:
                if v not in cache:
                    cache[v] = self._views[v].load(self._view_data, batch.index.cpu(), epoch)[0].to(self.device)
                xs[name] = cache[v]
            else:
                xs[name] = batch.x
        return xs

    def model_inputs(self, batch, epoch: int) -> Tensor | dict[str, Tensor]:
        """What the peers' forward takes: the batch (or each peer's view of it) expanded by ``data.expand``."""
        if not self.uses_views:
            return self.expansion(batch.x)
        xs, expanded = {}, {}  # peers sharing one input share its expansion
        for name, x in self.inputs(batch, epoch).items():
            if id(x) not in expanded:
                expanded[id(x)] = self.expansion(x)
            xs[name] = expanded[id(x)]
        return xs

    # ------------------------------------------------------------------ step pieces
    def forward(self, x: Tensor | Mapping[str, Tensor], names: Iterable[str]) -> Outputs:
        """Taps of the named owned peers (one input for all, or one per peer); untrained ones without grad."""
        outs: Outputs = {}
        with self.autocast():
            for name in names:
                peer = self.peers[name]
                xi = x[name] if isinstance(x, Mapping) else x
                if name in self.stage.train:
                    outs[name] = peer.tapped(xi)
                else:
                    with torch.no_grad():
                        outs[name] = peer.tapped(xi)
                if peer.cfg.blackbox and name not in self.stage.train:  # only its answers leave it, each one counted
                    outs[name] = {"probs": outs[name]["probs"]}
                    self.queries[name] += int(xi.shape[0])
        return outs

    # ------------------------------------------------------------------ black-box peers
    @torch.no_grad()
    def query(self, name: str, x: Tensor) -> Tensor:
        """A peer's answer to inputs ``x``: softmax probabilities (T=1) in eval mode, counted for a black box."""
        net = self.peers[name].net
        modes = [m.training for m in net.modules()]
        net.eval()
        try:
            with self.autocast():
                probs = torch.softmax(net(x.to(self.device)).float(), dim=-1)
        finally:
            for m, flag in zip(net.modules(), modes):
                m.training = flag
        if name in self.queries:
            self.queries[name] += int(x.shape[0])
        return probs

    def use_recorded(self, answers: Mapping[str, Tensor] | None) -> None:
        """Answers recorded with this stage's data set (``ProducedSet.answers``, by sample index): a black-box
        peer that has them answers from the record instead of being queried again."""
        self.recorded = {p: a.to(self.device) for p, a in (answers or {}).items()
                         if p in self.peers and self.peers[p].cfg.blackbox}

    def recorded_outputs(self, index: Tensor) -> Outputs:
        """The recorded black-box answers of these samples of the stage's data set, as their ``probs`` tap."""
        return {p: {"probs": a[index.to(a.device)]} for p, a in self.recorded.items() if p in self.in_use}

    def derived(self, outs: Outputs, y: Tensor) -> Outputs:
        """Ensemble and virtual-teacher outputs from (detached) peer logits and labels (one per expanded row)."""
        derived: Outputs = {}
        y = self.expansion.row_labels(y)
        with torch.no_grad():
            for name, comb in self.combiners.items():
                members = [outs[m]["logits"].detach().float() for m in self.topology.config.ensembles[name].members
                           if m in outs]
                if len(members) == comb.num_members:
                    derived[name] = {"logits": comb(members, y)}
            for name, v in self.virtual.items():
                derived[name] = v(y)
        return derived

    def peer_losses(self, name: str, outs: Outputs, batch, epoch_in_stage: int,
                    phase: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
        """The trained peer's total loss: task CE × its scale + Σ weighted incoming edges (of this phase).

        Phase 0 is the main update and carries the CE; a later phase holds only its own edges."""
        peer = self.peers[name]
        target = outs[name]
        terms: dict[str, Tensor] = {}
        task_scale = peer.cfg.task_weight if self.stage.task_weight is None else self.stage.task_weight
        total = None
        with self.autocast():
            for e in self.active:
                if e.target != name:
                    continue
                loss = self.losses[e.index]
                w = e.weight_at(epoch_in_stage)
                if w == 0 or loss.phase != phase:
                    continue
                task_scale *= loss.task_scale
                source = {k: v.detach() for k, v in outs[e.source].items()}
                value = loss(source, target, batch).float()
                terms[f"edge/{e.loss}_from_{e.source}"] = value.detach()
                total = w * value if total is None else total + w * value
            if phase != 0:
                total = total if total is not None else target["logits"].sum() * 0.0
                return total, terms
            if task_scale == 0:  # e.g. a hint stage: no CE graph, so the classifier gets no gradient at all
                with torch.no_grad():
                    task = F.cross_entropy(self.expansion.anchor(target["logits"]).float(), batch.y)
                terms["task"] = task
                total = total if total is not None else target["logits"].sum() * 0.0
                terms["loss"] = total.detach()
                return total, terms
            task = F.cross_entropy(self.expansion.anchor(target["logits"]).float(), batch.y)  # untransformed rows
        terms["task"] = task.detach()
        total = task_scale * task if total is None else total + task_scale * task
        terms["loss"] = total.detach()
        return total, terms

    def update(self, totals: Mapping[str, Tensor], phase: int = 0) -> None:
        """Backward and step. The peers share no graph, so one backward over their sum serves them all;
        a DeepSpeed peer runs its own engine's backward and step; a later phase steps its own optimizer."""
        peers = [self.peers[n] for n in totals]
        if phase != 0:
            opts = [p.phase_optimizers[phase] for p in peers if phase in p.phase_optimizers]
            for o in opts:
                o.zero_grad(set_to_none=True)
            torch.stack([totals[p.peer_name] for p in peers]).sum().backward()
            if self.grad_sync is not None:
                self.grad_sync(peers, self.step_samples)
            for o in opts:
                o.step()
            return
        plain = [p for p in peers if p.ds is None]
        for p in peers:
            if p.ds is not None:
                p.warm_up(self.steps_per_epoch)  # the engine steps the optimizer the schedule drives
                p.epoch_steps += 1
                p.ds.backward(totals[p.peer_name])
                p.ds.step()
        if not plain:
            return
        for p in plain:
            p.optimizer.zero_grad(set_to_none=True)
            p.warm_up(self.steps_per_epoch)
            p.epoch_steps += 1
        scaled = [p.scaler.scale(totals[p.peer_name]) for p in plain]
        torch.stack(scaled).sum().backward() if len(scaled) > 1 else scaled[0].backward()
        if self.grad_sync is not None:
            self.grad_sync(plain, self.step_samples)
        for p in plain:
            p.scaler.step(p.optimizer)
            p.scaler.update()

    def check_finite(self, totals: Mapping[str, Tensor], terms: Mapping[str, Mapping[str, Tensor]],
                     epoch: int) -> None:
        """Raise DivergenceError naming the peer and term when a loss is NaN/inf (one sync per step)."""
        if bool(torch.isfinite(torch.stack([t.detach() for t in totals.values()])).all()):
            return
        for peer, ts in terms.items():
            for term, v in ts.items():
                if term != "loss" and not bool(torch.isfinite(v)):
                    raise DivergenceError(epoch, self.global_step, peer, term, float(v))
        peer = next(p for p, t in totals.items() if not bool(torch.isfinite(t)))
        raise DivergenceError(epoch, self.global_step, peer, "loss", float(totals[peer]))

    def train_step(self, batch, epoch: int, epoch_in_stage: int,
                   exchange: Callable[[Outputs, int], Outputs] | None = None) -> StepResult:
        """One synchronous step of the owned peers: inputs, forward, the taps other workers send
        (``exchange(outs, rows)``; none when this process holds every peer it needs), derived nodes,
        losses and update, once per phase."""
        batch = batch.to(self.device, non_blocking=True)
        self.step_samples = int(batch.y.shape[0])  # this shard's size, for weighting replicas' gradients
        xs = self.model_inputs(batch, epoch)
        result = None
        for phase in self.phases:  # a later phase sees the weights the earlier one just updated
            outs = self.forward(xs, [p for p in self.peers if p in self.in_use and p not in self.recorded])
            outs.update(self.recorded_outputs(batch.index))
            if exchange is not None:
                outs.update(exchange(outs, self.expansion.rows(self.step_samples)))
            outs.update(self.derived(outs, batch.y))
            result = self.finish_step(outs, batch, epoch, epoch_in_stage, phase=phase, result=result)
        return result

    def finish_step(self, outs: Outputs, batch, epoch: int, epoch_in_stage: int, phase: int = 0,
                    result: StepResult | None = None) -> StepResult:
        """Losses, divergence check and update of one phase for the owned trained peers, given every needed output.

        The global step advances after the last phase."""
        result = result or StepResult(count=int(batch.y.shape[0]))
        self.clock.epoch, self.clock.epoch_in_stage, self.clock.step = epoch, epoch_in_stage, self.global_step
        totals = {}
        terms_now = {}
        for name in self.stage.train:
            if name not in self.peers:
                continue
            totals[name], terms_now[name] = self.peer_losses(name, outs, batch, epoch_in_stage, phase)
            result.terms.setdefault(name, {}).update(terms_now[name])
            if phase == 0:
                result.correct[name] = (self.expansion.anchor(outs[name]["logits"]).detach().argmax(1) == batch.y).sum()
        if totals and phase != 0:
            self.check_finite(totals, terms_now, epoch)
            self.update(totals, phase)
        elif totals:
            self.check_finite(totals, result.terms, epoch)
            if self.step_log is not None:
                for name, t in totals.items():
                    self.step_log.write(json.dumps({"step": self.global_step, "peer": name, "loss": float(t.detach())}) + "\n")
                self.step_log.flush()
            self.update(totals)
        if phase == self.phases[-1]:
            self.global_step += 1
        return result

    def end_epoch(self) -> None:
        """Advance the learning-rate schedule of every peer trained this epoch."""
        for name in self.stage.train:
            if name in self.peers:
                peer = self.peers[name]
                peer.scheduler.step()
                peer.trained_epochs += 1
                peer.epoch_steps = 0

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def logits_over(self, stream, names: Iterable[str], epoch: int = 0) -> tuple[dict[str, Tensor], Tensor]:
        """Eval-mode logits of the named peers over a whole (unshuffled) split, and its labels."""
        names = list(names)
        modes = {n: [m.training for m in self.peers[n].net.modules()] for n in names}  # per module: frozen BN
        for n in names:
            self.peers[n].net.eval()
        chunks: dict[str, list[Tensor]] = {n: [] for n in names}
        labels = []
        try:
            with self.autocast():
                for b in stream.epoch(epoch):
                    x = b.x.to(self.device)
                    for n in names:
                        chunks[n].append(self.peers[n].net(x).float())
                    labels.append(b.y.to(self.device))
        finally:
            for n, flags in modes.items():
                for m, flag in zip(self.peers[n].net.modules(), flags):
                    m.training = flag
        return {n: torch.cat(c) for n, c in chunks.items()}, torch.cat(labels)

    def ensemble_logits(self, logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each ensemble's label-free prediction from members' eval logits."""
        out = {}
        for name, comb in self.combiners.items():
            members = self.topology.config.ensembles[name].members
            if all(m in logits for m in members):
                out[name] = comb.evaluate([logits[m] for m in members])
        return out


    def refit_ensembles(self, holdout_stream, gather=None, contribute: bool = True) -> None:
        """Refit combiners that learn their weights on the held-out split (KDCL-Linear).

        ``gather(logits, labels)`` collects the members' held-out logits from every worker (None: this
        process holds them all); ``contribute``: this worker's peers send theirs (replica 0)."""
        due = [n for n, c in self.combiners.items()
               if c.refit_every and self.global_step % c.refit_every == 0 and self.global_step > 0]
        if not due or holdout_stream is None:
            return
        ensembles = self.topology.config.ensembles
        members = sorted({m for n in due for m in ensembles[n].members})
        mine = [m for m in members if m in self.peers] if contribute else []
        logits, y = self.logits_over(holdout_stream, mine) if mine else ({}, None)
        if gather is not None:
            logits, y = gather(logits, y)
        for n in due:
            self.combiners[n].refit([logits[m].to(self.device) for m in ensembles[n].members], y.to(self.device))

def topk_correct(logits: Tensor, y: Tensor, ks=(1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = top.eq(y.view(-1, 1))
    return {k: int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks}
