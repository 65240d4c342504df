"""Logit losses: Hinton KD, DML's mutual KL, and Tf-KD's regulariser."""
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
