"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017) as RepDistiller implements it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class ATParams(Params):
    taps: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3"], min_length=1)
    p: float = Field(2.0, gt=0)


def attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    """L2-normalised spatial map of the channel mean of |f|^p, flattened: [B, H·W]."""
    return F.normalize(f.float().pow(p).mean(1).view(f.shape[0], -1))


@register_loss("at")
class AttentionTransfer(EdgeLoss):
    """Σ over taps of mean((a_t − a_s)²), a = normalise(mean_c f^p); the larger map is average-pooled.

    RepDistiller's form (β=1000 goes in the edge's ``weight``), not the paper's β/2·‖·‖ with p-norm.
    """

    Params = ATParams

    def needs(self) -> Needs:
        return Needs(source=tuple(self.params.taps), target=tuple(self.params.taps))

    def build(self, source_shapes, target_shapes) -> None:
        for tap in self.params.taps:
            s, t = source_shapes[tap], target_shapes[tap]
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"tap '{tap}' must be a feature map [C, H, W] on both sides (got {tuple(s)}, {tuple(t)})")

    def forward(self, source, target, batch):
        total = 0.0
        for tap in self.params.taps:
            s, t = target[tap], source[tap]
            hs, ht = s.shape[2], t.shape[2]
            if hs > ht:
                s = F.adaptive_avg_pool2d(s, (ht, ht))
            elif ht > hs:
                t = F.adaptive_avg_pool2d(t, (hs, hs))
            total = total + (attention_map(s, self.params.p) - attention_map(t, self.params.p)).pow(2).mean()
        return total
