"""The edge contract: what a loss needs, the trainable parts it owns, and its value."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..finite import FiniteModel


def local_gather(*tensors: Tensor) -> Tensor | tuple[Tensor, ...]:
    """EdgeContext.gather in one process: the identity, as it already holds the whole batch."""
    return tensors[0] if len(tensors) == 1 else tensors


class Params(FiniteModel):
    """Base of each loss's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Needs:
    """Taps a loss reads from the source node and from the target peer."""

    source: tuple[str, ...] = ("logits",)
    target: tuple[str, ...] = ("logits",)


@dataclass
class Clock:
    """Where training stands, for losses whose value changes with it (e.g. BSS's decaying weights).

    The runtime owns one clock and hands the same object to every loss (``EdgeContext.clock``): it
    sets ``stage_epochs`` when a stage starts and the rest before each step's losses, in both engines.
    Epochs are 0-indexed.
    """

    epoch: int = 0           # global epoch
    epoch_in_stage: int = 0  # epoch within the current stage
    stage_epochs: int = 1    # the current stage's length
    step: int = 0            # global step


class Ramp(FiniteModel):
    """A loss term's weight going linearly from ``start`` to ``end`` over the first ``over`` fraction of
    the stage, then staying at ``end``: w = start + (end − start)·min(e / (over·E), 1), with e the epoch
    in the stage (plus ``epoch_base``: 1 counts epochs from 1, as scripts that loop ``range(1, E+1)``)
    and E the stage's epochs. Usable by any loss that holds the run's :class:`Clock`.
    """

    model_config = ConfigDict(extra="forbid")

    start: float
    end: float = 0.0
    over: float = Field(1.0, gt=0)

    def at(self, clock: "Clock", epoch_base: int = 0) -> float:
        span = self.over * max(clock.stage_epochs, 1)
        t = min(max((clock.epoch_in_stage + epoch_base) / span, 0.0), 1.0)
        return self.start + (self.end - self.start) * t


@dataclass
class EdgeContext:
    """What a loss may need beyond its taps, handed over once before training."""

    source_model: nn.Module | None  # the source peer's network, when this process holds it
    train_targets: Tensor | None    # labels of the training split, by sample index (e.g. CRD's negatives)
    num_train: int | None
    num_classes: int
    target_model: nn.Module | None = None  # the target peer's network (always in this process)
    clock: Clock = field(default_factory=Clock)  # the run's live clock (see Clock)
    seed: int = 0                   # train.seed: for a loss's own draws, hashed with the clock and sample indices
    expansion: Any = None           # data.expand (online_kd.data.expand): joint labels, anchor rows; None: identity
    # gather(*tensors): per-sample tensors for the whole batch when the target peer has replicas (its own
    # slice keeps its gradient); the identity in one process. See online_kd.engine.gather.
    gather: Callable[..., Any] = local_gather


class EdgeLoss(nn.Module):
    """A distillation loss on one edge.

    Its modules (connectors, discriminators, …) belong to the target peer: they are
    optimised and checkpointed with it. The source side arrives detached.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    allows_self: ClassVar[bool] = False
    needs_source_model: ClassVar[bool] = False  # reads the source network itself (e.g. its BN statistics)
    batch_fields: ClassVar[frozenset[str]] = frozenset()  # extra Batch fields it reads ('pair': data.sampler)
    needs_expansion: ClassVar[bool] = False  # reads expanded views' joint labels (a data.expand other than none)
    # relates a batch's samples to each other (B×B matrices, banks by index): reads them through self.gather
    relates_samples: ClassVar[bool] = False
    gather = staticmethod(local_gather)  # the run's EdgeContext.gather once attached
    phase: ClassVar[int] = 0  # 0: the main update with CE; 1: a separate update after it (AFD's adversarial step)
    source_kinds: ClassVar[frozenset[str]] = frozenset({"peer", "ensemble", "virtual"})

    def __init__(self, params: BaseModel):
        super().__init__()
        self.params = params

    def needs(self) -> Needs:
        return Needs()

    def build(self, source_shapes: Mapping[str, torch.Size], target_shapes: Mapping[str, torch.Size]) -> None:
        """Check the taps' per-sample shapes and create trainable parts; ValueError if they do not fit."""
        s, t = source_shapes.get("logits"), target_shapes.get("logits")
        if s is not None and t is not None and s != t:
            raise ValueError(f"source logits {tuple(s)} and target logits {tuple(t)} differ")

    def attach(self, ctx: EdgeContext) -> None:
        """Take what the loss needs from the run (source model, training labels, the gather hook) before the
        first step; an override calls ``super().attach(ctx)``."""
        self.gather = ctx.gather

    def param_groups(self) -> list[dict]:
        """Optimizer groups of this edge's modules in the main (phase 0) update."""
        return [{"params": list(self.parameters())}]

    def phase_param_groups(self, net: nn.Module) -> list[dict]:
        """For a phase > 0 loss: the groups its own update optimises (e.g. the target net at a lower lr)."""
        return []

    @property
    def task_scale(self) -> float:
        """Factor on the target's task (CE) loss, e.g. 1-α for Hinton KD."""
        return 1.0

    def forward(self, source: Mapping[str, Tensor], target: Mapping[str, Tensor], batch: Any) -> Tensor:
        raise NotImplementedError


def kl_div(student_logits: Tensor, teacher_logits: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², reduced as 'batchmean' (÷B) or 'mean' (÷B·C)."""
    logp = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    logq = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return kl_from_log_probs(logp, logq, reduction) * temperature * temperature


def kl_from_log_probs(logp: Tensor, logq: Tensor, reduction: str = "batchmean") -> Tensor:
    """KL(q ‖ p) summed, then ÷B ('batchmean') or ÷B·C ('mean', i.e. ``nn.KLDivLoss()``'s default).

    The division is explicit because PyTorch plans to make ``reduction='mean'`` mean batchmean.
    """
    total = torch.nn.functional.kl_div(logp, logq, reduction="sum", log_target=True)
    return total / (logp.shape[0] if reduction == "batchmean" else logp.numel())
