"""Turn topology entries into live objects: models, losses, combiners, optimizers, schedules (used by the
plan's dry run, producing stages and the engines)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .losses import COMBINERS, LOSSES, VIRTUAL_TEACHERS

# The topology layer calls these with its own entries (topology.graph.Edge, topology.schema.PeerConfig, …);
# they only read them, so this module imports nothing of the topology and stays below it.


def build_model_for(peer: PeerConfig, info) -> nn.Module:
    """The peer's network, sized to the data set's channels and classes."""
    from .models import build_model

    return build_model(peer.model, in_channels=info.in_channels, num_classes=info.num_classes, **peer.model_args)


def build_loss(edge: Edge):
    """The edge's registered loss with its validated parameters."""
    cls = LOSSES[edge.loss]
    return cls(cls.Params.model_validate(edge.params))


def build_combiner(cfg: EnsembleConfig):
    cls = COMBINERS[cfg.combine]
    return cls(cls.Params.model_validate(cfg.extras()), len(cfg.members))


def build_virtual(cfg: VirtualConfig, num_classes: int):
    cls = VIRTUAL_TEACHERS[cfg.kind]
    return cls(cls.Params.model_validate(cfg.extras()), num_classes)


def build_optimizer(cfg: OptimizerConfig, param_groups) -> torch.optim.Optimizer:
    """SGD/Adam/AdamW over the peer's and its edge modules' parameters.

    ``param_groups`` may carry per-group options (e.g. a discriminator's lower lr).
    """
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(cfg: ScheduleConfig, epoch: int, total_epochs: int) -> float:
    """The learning-rate multiplier in a peer's ``epoch``-th training epoch (0-indexed)."""
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs and cfg.warmup_per == "epoch":
        return (epoch + 1) / cfg.warmup_epochs
    if cfg.name == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.name == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    if cfg.name == "cosine":
        span = max(1, total_epochs - cfg.warmup_epochs)
        t = min(1.0, max(0.0, (epoch - cfg.warmup_epochs) / span))
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def step_warmup_factor(cfg: ScheduleConfig, step: int, steps_per_epoch: int) -> float | None:
    """With ``warmup_per: step``: the factor (k+1)/(W·S) on the epoch's lr at the peer's ``step``-th step
    (0-indexed) of training, W = ``warmup_epochs``, S = steps per epoch; None once the warm-up is over."""
    span = cfg.warmup_epochs * steps_per_epoch
    if cfg.warmup_per != "step" or step >= span:
        return None
    return (step + 1) / span


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, total_epochs: int):
    """A per-epoch LambdaLR following :func:`lr_factor` (rebuilt from the YAML on resume)."""
    base = [g["lr"] for g in optimizer.param_groups]
    floor = [cfg.eta_min / b if b else 0.0 for b in base]
    lambdas = [
        (lambda e, f=f: f + (1 - f) * lr_factor(cfg, e, total_epochs)) if cfg.name == "cosine"
        else (lambda e: lr_factor(cfg, e, total_epochs))
        for f in floor
    ]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
