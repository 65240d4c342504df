"""Losses that read only a teacher's probabilities: what crosses the edge of a black-box peer.

A black-box teacher (``peers.X.blackbox: true``) lets out its softmax answers and nothing else
(no logits, no features), so its edges read the ``probs`` tap. Active Mixup (Wang et al., CVPR
2020; dwang181/active-mixup ``active_train.py``) trains the student with the soft cross-entropy
below on the teacher's recorded answers, with no cross-entropy on ground-truth labels (set the
training stage's ``task_weight: 0``).
"""
from __future__ import annotations

import torch
from pydantic import Field

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class SoftCEParams(Params):
    temperature: float = Field(1.0, gt=0)


@register_loss("soft_ce")
class SoftCE(EdgeLoss):
    """Soft cross-entropy mean_b(−Σ_c p_c · log softmax(z_s / T)_c), from the source's probabilities p.

    At T ≠ 1 the source's answer is sharpened or softened as softmax(z_t / T) = p^(1/T) / Σ p^(1/T),
    which needs only p. No T² factor: the reference trains at T = 1 without one.
    """

    Params = SoftCEParams
    source_kinds = frozenset({"peer"})

    def needs(self) -> Needs:
        return Needs(source=("probs",), target=("logits",))

    def build(self, source_shapes, target_shapes) -> None:
        s, t = source_shapes.get("probs"), target_shapes.get("logits")
        if s is not None and t is not None and s != t:
            raise ValueError(f"source probabilities {tuple(s)} and target logits {tuple(t)} differ")

    def forward(self, source, target, batch):
        t = self.params.temperature
        p = source["probs"].float()
        if t != 1.0:
            p = p.pow(1.0 / t)
            p = p / p.sum(dim=-1, keepdim=True)
        logq = torch.log_softmax(target["logits"].float() / t, dim=-1)
        return -(p * logq).sum(dim=-1).mean()
