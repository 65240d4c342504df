"""The edge contract: what a loss needs, the trainable parts it owns, and its value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class Params(BaseModel):
    """Base of each loss's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Needs:
    """Taps a loss reads from the source node and from the target peer."""

    source: tuple[str, ...] = ("logits",)
    target: tuple[str, ...] = ("logits",)


@dataclass
class EdgeContext:
    """What a loss may need beyond its taps, handed over once before training."""

    source_model: nn.Module | None  # the source peer's network, when this process holds it
    train_targets: Tensor | None    # labels of the training split, by sample index (e.g. CRD's negatives)
    num_train: int | None
    num_classes: int


class EdgeLoss(nn.Module):
    """A distillation loss on one edge.

    Its modules (connectors, discriminators, …) belong to the target peer: they are
    optimised and checkpointed with it. The source side arrives detached.
    """

    name: ClassVar[str]
    Params: ClassVar[type[BaseModel]] = Params
    allows_self: ClassVar[bool] = False
    needs_source_model: ClassVar[bool] = False  # reads the source network itself (e.g. its BN statistics)
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
        """Take what the loss needs from the run (source model, training labels) before the first step."""

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
