"""Data-free distillation: a ``synthesize`` stage inverts a frozen teacher into a synthetic data set.

Images start as Gaussian noise (in the normalised input space) and are optimised with Adam, one
batch at a time, against the teacher in eval mode:

    loss = ce·CE(teacher(x̃), target) + r_feature·Σ_l w_l·BN_l(x̃) + tv_l2·TV₂(x̃) + tv_l1·TV₁(x̃)
           + l2·‖x̃‖₂ + competition·(1 − clamp(JS(student(x̃), teacher(x̃)), 0, 1))

x̃ = x rolled by a random jitter (±``jitter`` px) and, with ``flip``, mirrored with p = ½; BN_l is
the objective's term between the statistics of the batch at the input of the l-th ``BatchNorm2d``
and that layer's running statistics (w_1 = ``first_bn_multiplier``, the others 1); see
:mod:`online_kd.stages.objectives`. ``deepinversion`` follows ``NVlabs/DeepInversion``
``cifar10/deepinversion_cifar10.py`` (the ImageNet script's extras: TV-L1, first-BN multiplier,
per-image L2, flip, clipping, cosine lr with warm-up, Adam betas, are parameters); ``bnstats`` is
the BN-Statistics scheme of "The Knowledge Within" (its Gaussian KL, no label term by default).

Defaults are the CIFAR-10 command the reference README gives as "parameters from the paper":
batch 256, 2000 iterations, Adam lr 0.05 (the script's argparse default is 0.1), r_feature 10 (argparse
default 1e2), TV-L2 2.5e-5, L2 0, jitter 2, no flip, labels cycling 0..C−1, constant lr, teacher in eval.

Differences from the reference, on purpose:

* ``keep: best`` returns, per batch, the images *at* the iteration with the lowest total loss (the
  loss is evaluated before that iteration's step). Both official scripts mean to do this but return
  the last iterate: the CIFAR script keeps ``inputs.data`` (a view that later steps overwrite), the
  ImageNet script never lowers ``best_cost``. ``keep: last`` reproduces what they actually return.
* Labels cycle over the whole set (image i gets class i mod C), not restarting at 0 in every batch:
  the same as the reference for one batch, balanced over many.
* Every random draw (initial noise, random labels, jitter, flip) comes from a generator seeded by
  (run seed, stage name, batch index): the set is a pure function of the seed, the recipe and the
  teacher's (and competing student's) weights, whatever ran before. Synthesis runs in fp32.
* Gradients go to the images only (``torch.autograd.grad``): teacher and student keep their weights,
  their ``.grad`` and their train/eval modes.

The set's labels are the target labels when the objective has a label term (``ce`` > 0), else the
teacher's top-1 answer on the kept images. The recipe (every parameter, the seed, the data set's
shape and normalisation, SHA-256 of the teacher's and the competing student's weights) is saved with
the set; ``cache: <dir>`` also keeps it as ``<dir>/<sha256 of the recipe>.pt`` and any later run with
the same recipe reuses it instead of synthesising again.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..data.hashing import generator_seed
from ..errors import TopologyError, suggest
from .base import ProduceContext, ProducedSet, StageKind, StageParams
from .objectives import OBJECTIVES, BNInputHooks, competition_loss, image_l2, total_variation
from .registry import register_stage_kind

Beta = Annotated[float, Field(ge=0, lt=1)]
RECIPE_VERSION = 1  # bump when the algorithm changes what a recipe produces (invalidates caches)


class SynthesizeParams(StageParams):
    teacher: str                                    # the peer to invert (frozen, or trained in an earlier stage)
    objective: str = "deepinversion"                # a registered objective: deepinversion | bnstats
    size: int = Field(ge=1)                         # images in the set
    batch_size: int = Field(256, ge=1)              # images optimised together (BN statistics are per batch)
    iters: int = Field(2000, ge=1)                  # Adam steps per batch
    lr: float = Field(0.05, gt=0)                   # paper command 0.05; script default 0.1; ImageNet 0.2
    betas: tuple[Beta, Beta] = (0.9, 0.999)         # Adam's; ImageNet settings 0/1: (0.5, 0.9)
    schedule: Literal["constant", "cosine"] = "constant"  # ImageNet: cosine after a 100-step linear warm-up
    warmup: int = Field(0, ge=0)                    # steps of linear lr warm-up (lr·(t+1)/warmup)
    ce: float | None = Field(None, ge=0)            # weight of CE(teacher(x), target); None: the objective's
    r_feature: float = Field(10.0, ge=0)            # BN term weight: paper command 10, CIFAR script default 1e2
    first_bn_multiplier: float = Field(1.0, ge=0)   # ImageNet: 10
    tv_l2: float = Field(2.5e-5, ge=0)
    tv_l1: float = Field(0.0, ge=0)
    l2: float = Field(0.0, ge=0)
    l2_per_image: bool = False                      # False: ‖x‖₂ of the batch (CIFAR); True: mean per image
    jitter: int = Field(2, ge=0)                    # random roll by ±jitter px in both directions
    flip: bool = False                              # random horizontal flip of the whole batch (ImageNet)
    clip: bool = False                              # clamp to the valid pixel range after each step (ImageNet)
    competition: float = Field(0.0, ge=0)           # Adaptive DeepInversion weight (0 = off); needs student
    student: str | None = None                      # the peer that competes (eval mode, not updated)
    temperature: float = Field(3.0, gt=0)           # of the competition term's softmaxes
    labels: Literal["cycle", "random"] = "cycle"
    keep: Literal["best", "last"] = "best"
    init: Literal["gaussian"] = "gaussian"          # x ~ N(0, 1) in the normalised space
    eps: float = Field(1e-5, gt=0)                  # added to both variances by the bnstats objective
    augment: bool = True                            # train on it with the topology's augmentation
    cache: str | None = None                        # a directory of sets keyed by recipe, shared across runs


def synthesis_lr(step: int, iters: int, lr: float, schedule: str, warmup: int) -> float:
    """The learning rate of 0-based ``step``: linear warm-up, then constant or cosine to 0 (the reference's
    ``lr_cosine_policy``: ½·(1 + cos(π·(t − warmup)/(iters − warmup)))·lr)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, iters - warmup))) * lr
    return lr


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 of a network's state (parameter and buffer names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recipe_key(recipe: dict) -> str:
    """SHA-256 of a recipe's canonical JSON: the name of its cached set."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _has_bn2d(net: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


@register_stage_kind("synthesize")
class Synthesize(StageKind):
    """Optimise a synthetic data set against a frozen teacher (DeepInversion / BN-statistics objective)."""

    Params = SynthesizeParams

    def reads(self) -> dict[str, str]:
        p = self.params
        return {"teacher": p.teacher, **({"student": p.student} if p.student else {})}

    # ------------------------------------------------------------------ validation
    def check(self, topology, origin: str) -> None:
        p, c = self.params, topology.config
        if p.objective not in OBJECTIVES:
            raise TopologyError(f"{origin}.objective", suggest(p.objective, OBJECTIVES, "synthesis objective"))
        if p.competition > 0 and p.student is None:
            raise TopologyError(f"{origin}.student", f"the competition term (competition: {p.competition}) needs "
                                                     "the student it competes with: name a peer")
        if p.student is not None and p.student == p.teacher:
            raise TopologyError(f"{origin}.student", "the competing student cannot be the teacher itself")
        before = next(x.before for x in topology.producers if x.origin == origin)
        if not c.peers[p.teacher].init and not any(p.teacher in s.train for s in topology.stages[:before]):
            raise TopologyError(f"{origin}.teacher", f"'{p.teacher}' has no 'init' checkpoint and is trained in no "
                                                     "stage before this one: there is nothing to invert")
        net = self._built(topology, p.teacher)
        if net is not None and not _has_bn2d(net):
            raise TopologyError(f"{origin}.teacher", f"'{p.teacher}' ({c.peers[p.teacher].model}) has no "
                                                     "BatchNorm2d layer: both objectives match BN statistics")

    @staticmethod
    def _built(topology, peer: str) -> nn.Module | None:
        """The peer's network (untrained) to inspect its layers; None when it cannot be built here (the plan
        reports why)."""
        from ..data import dataset_info
        from ..build import build_model_for

        try:
            with torch.random.fork_rng(devices=[]):
                return build_model_for(topology.config.peers[peer], dataset_info(topology.config.data))
        except Exception:
            return None

    # ------------------------------------------------------------------ the set
    def recipe(self, ctx: ProduceContext) -> dict:
        """Everything the set is a function of: parameters, seed, data shape, the weights it inverts."""
        p, rt = self.params, ctx.runtime
        info = rt.info
        objective = OBJECTIVES[p.objective]
        competes = p.competition > 0
        train = ctx.data.train if ctx.data is not None else None
        norm = {k: [float(v) for v in getattr(train, k).reshape(-1)] for k in ("mean", "std")
                if train is not None and hasattr(train, k)}
        return {
            "kind": self.name, "version": RECIPE_VERSION, "stage": self.stage_name, "seed": int(ctx.seed),
            **p.model_dump(mode="json", exclude={"cache"}),
            "ce": objective.default_ce if p.ce is None else p.ce,
            "teacher_sha256": weights_sha256(rt.peers[p.teacher].net),
            "student_sha256": weights_sha256(rt.peers[p.student].net) if competes else None,
            "data": {"dataset": info.name, "shape": [info.in_channels, *info.image_size],
                     "num_classes": info.num_classes, **norm},
        }

    def run(self, ctx: ProduceContext) -> ProducedSet:
        p = self.params
        recipe = self.recipe(ctx)
        key = recipe_key(recipe)
        cached = Path(p.cache).expanduser() / f"{key}.pt" if p.cache else None
        if cached is not None and cached.is_file():
            made = ProducedSet.load(cached)
            if made.recipe.get("key") == key:
                ctx.log(f"stage '{self.stage_name}': reused {len(made)} synthetic images from the cache {cached}")
                return made
        made = self._synthesize(ctx, recipe)
        made.recipe["key"] = key
        if cached is not None:
            made.save(cached)
            ctx.log(f"stage '{self.stage_name}': stored {len(made)} synthetic images in the cache {cached}")
        return made

    def _synthesize(self, ctx: ProduceContext, recipe: dict) -> ProducedSet:
        p, rt = self.params, ctx.runtime
        nets = [rt.peers[p.teacher].net] + ([rt.peers[p.student].net] if p.competition > 0 else [])
        modes = [[m.training for m in net.modules()] for net in nets]
        for net in nets:
            net.eval()
        bounds = self._bounds(ctx) if p.clip else None
        n_batches = (p.size + p.batch_size - 1) // p.batch_size
        xs, ys, stats = [], [], {"loss_kept": [], "teacher_agreement": []}
        try:
            for b in range(n_batches):
                n = min(p.batch_size, p.size - b * p.batch_size)
                x, y, loss, agree = self._batch(ctx, recipe, b, n, n_batches, bounds)
                xs.append(x)
                ys.append(y)
                stats["loss_kept"].append(round(loss, 6))
                stats["teacher_agreement"].append(round(agree, 6))
        finally:
            for net, flags in zip(nets, modes):
                for m, flag in zip(net.modules(), flags):
                    m.training = flag
        return ProducedSet(x=torch.cat(xs), y=torch.cat(ys), recipe={**recipe, "stats": stats}, augment=p.augment)

    def _bounds(self, ctx: ProduceContext) -> tuple[Tensor, Tensor]:
        """The normalised values of raw pixels 0 and 1, per channel ([1, C, 1, 1] each)."""
        train = ctx.data.train
        if not (hasattr(train, "mean") and hasattr(train, "std")):
            raise ValueError(f"stage '{self.stage_name}': clip needs the data set's normalisation (mean, std)")
        mean, std = (getattr(train, k).reshape(1, -1, 1, 1).to(ctx.runtime.device) for k in ("mean", "std"))
        return (0 - mean) / std, (1 - mean) / std

    def _targets(self, b: int, n: int, num_classes: int, g: torch.Generator) -> Tensor:
        if self.params.labels == "random":
            return torch.randint(num_classes, (n,), generator=g)
        return (b * self.params.batch_size + torch.arange(n)) % num_classes

    def _batch(self, ctx: ProduceContext, recipe: dict, b: int, n: int, n_batches: int,
               bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, float, float]:
        """One batch: (kept images on CPU, their labels, the kept loss, teacher top-1 agreement with targets)."""
        p, rt = self.params, ctx.runtime
        device, info = rt.device, rt.info
        teacher = rt.peers[p.teacher].tapped
        student = rt.peers[p.student].tapped if p.competition > 0 else None
        objective = OBJECTIVES[p.objective](eps=p.eps)
        ce_weight = recipe["ce"]

        g = torch.Generator().manual_seed(generator_seed("online_kd/synthesize", ctx.seed, self.stage_name, b))
        x = torch.randn((n, info.in_channels, *info.image_size), generator=g).to(device).requires_grad_()
        targets = self._targets(b, n, info.num_classes, g).to(device)
        opt = torch.optim.Adam([x], lr=p.lr, betas=tuple(p.betas), eps=1e-8)
        best_loss, best = math.inf, None
        with BNInputHooks(rt.peers[p.teacher].net, objective.bn_term) as hooks, \
                ctx.progress(f"synthesize {self.stage_name} batch {b + 1}/{n_batches}", p.iters) as bar:
            for step in range(p.iters):
                for group in opt.param_groups:
                    group["lr"] = synthesis_lr(step, p.iters, p.lr, p.schedule, p.warmup)
                xj = x
                if p.jitter:
                    dy, dx = torch.randint(-p.jitter, p.jitter + 1, (2,), generator=g).tolist()
                    xj = torch.roll(xj, shifts=(dy, dx), dims=(2, 3))
                if p.flip and torch.rand((), generator=g).item() > 0.5:
                    xj = torch.flip(xj, dims=(3,))
                z_t = teacher(xj)["logits"].float()
                loss = p.r_feature * hooks.total(p.first_bn_multiplier)
                if ce_weight:
                    loss = loss + ce_weight * F.cross_entropy(z_t, targets)
                tv1, tv2 = total_variation(xj)
                loss = loss + p.tv_l2 * tv2 + p.tv_l1 * tv1
                if p.l2:
                    loss = loss + p.l2 * image_l2(xj, p.l2_per_image)
                if student is not None:
                    z_s = student(xj)["logits"].float()
                    loss = loss + p.competition * competition_loss(z_s, z_t, p.temperature)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(f"stage '{self.stage_name}': synthesis loss is {value} at batch "
                                             f"{b + 1}, iteration {step + 1} (lower lr or r_feature)")
                if p.keep == "best" and value < best_loss:
                    best_loss, best = value, x.detach().clone()
                (x.grad,) = torch.autograd.grad(loss, [x])
                opt.step()
                if bounds is not None:
                    with torch.no_grad():
                        x.copy_(torch.maximum(torch.minimum(x, bounds[1]), bounds[0]))
                bar.advance()
        kept = best if p.keep == "best" else x.detach()
        with torch.no_grad():
            pred = teacher(kept)["logits"].argmax(dim=1)
        agree = float((pred == targets).float().mean())
        y = targets if ce_weight else pred
        return kept.cpu(), y.cpu(), best_loss if p.keep == "best" else value, agree
