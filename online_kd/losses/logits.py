"""Logit losses: Hinton KD, DML's mutual KL, Tf-KD's regulariser and label smoothing."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from .base import EdgeLoss, Params, kl_div, kl_from_log_probs
from .registry import register_loss


class KDParams(Params):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    reduction: Literal["batchmean", "mean"] = "batchmean"


@register_loss("kd")
class KD(EdgeLoss):
    """Hinton KD: the target's loss is (1-α)·CE + α·T²·KL(p_source^T ‖ p_target^T).

    The edge contributes α·T²·KL and scales the target's CE by 1-α. ``reduction: mean``
    divides the KL by B·C instead of B, as TAKD's and Tf-KD's ``nn.KLDivLoss()`` do.
    """

    Params = KDParams

    @property
    def task_scale(self) -> float:
        return 1.0 - self.params.alpha

    def forward(self, source, target, batch):
        p = self.params
        return p.alpha * kl_div(target["logits"], source["logits"], p.temperature, p.reduction)


class KLParams(Params):
    temperature: float = Field(1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = "batchmean"


@register_loss("kl")
class MutualKL(EdgeLoss):
    """DML: T²·KL(p_source^T ‖ p_target^T), batchmean; a peer sums it over its incoming edges."""

    Params = KLParams

    def forward(self, source, target, batch):
        return kl_div(target["logits"], source["logits"], self.params.temperature, self.params.reduction)


class TfKDParams(Params):
    alpha: float = Field(0.95, ge=0, le=1)
    multiplier: float = Field(1.0, gt=0)
    reduction: Literal["batchmean", "mean"] = "mean"


@register_loss("tfkd")
class TfKD(EdgeLoss):
    """Tf-KD regulariser (reference ``loss_kd_regularization``): (1-α)·CE + α·m·KL(q ‖ softmax(z)).

    The student is not temperature-scaled and there is no T² (the virtual teacher holds the
    temperature); the KL is an elementwise mean (÷B·C) times ``multiplier``, as in the code.
    """

    Params = TfKDParams

    @property
    def task_scale(self) -> float:
        return 1.0 - self.params.alpha

    def forward(self, source, target, batch):
        p = self.params
        logp = torch.log_softmax(target["logits"].float(), dim=-1)
        logq = torch.log_softmax(source["logits"].float(), dim=-1)
        return p.alpha * p.multiplier * kl_from_log_probs(logp, logq, p.reduction)


class LabelSmoothingParams(Params):
    epsilon: float = Field(0.1, ge=0, lt=1)
    style: Literal["uniform", "tfkd"] = "uniform"


@register_loss("label_smoothing")
class LabelSmoothing(EdgeLoss):
    """Label smoothing: the cross-entropy −Σ_c q_c·log p_c against a smoothed target q, mean over the batch.

    ``style: uniform`` spreads ε over all C classes (q = (1−ε)·onehot + ε/C, PyTorch's
    ``cross_entropy(label_smoothing=ε)``); ``style: tfkd`` puts 1−ε on the label and ε/(C−1) on each
    other class (Tf-KD's ``loss_label_smoothing``). It replaces the peer's CE (task scale 0) and reads
    only the target's logits and the labels: write it as a self-edge (``from: a, to: a``).
    """

    Params = LabelSmoothingParams
    allows_self = True
    source_kinds = frozenset({"peer"})

    def __init__(self, params: LabelSmoothingParams):
        super().__init__(params)
        self._expansion = None

    def attach(self, ctx) -> None:
        self._expansion = ctx.expansion

    @property
    def task_scale(self) -> float:
        return 0.0

    def target_distribution(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The smoothed target q, ``[B, C]``."""
        eps = self.params.epsilon
        if self.params.style == "uniform":
            off, on = eps / num_classes, 1.0 - eps + eps / num_classes
        else:
            off, on = eps / (num_classes - 1), 1.0 - eps
        q = torch.full((y.shape[0], num_classes), off, device=y.device)
        return q.scatter_(1, y.view(-1, 1), on)

    def forward(self, source, target, batch):
        logits = target["logits"]
        if self._expansion is not None:
            logits = self._expansion.anchor(logits)
        logp = torch.log_softmax(logits.float(), dim=-1)
        q = self.target_distribution(batch.y, logp.shape[-1])
        return -(q * logp).sum() / logp.shape[0]
