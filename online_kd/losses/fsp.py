"""FSP — flow of solution procedure (Yim et al., CVPR 2017) as RepDistiller implements it
(HobbitLong/RepDistiller @b84f547, ``distiller_zoo/FSP.py`` and ``helper/pretrain.py``).

For consecutive taps (i, i+1) of one network, G_i = mean over spatial positions of the outer
product of the two maps' channel vectors, a C_i×C_{i+1} matrix per sample (the larger map is
average-pooled to the smaller one's size). L = Σ_i mean((G_i^s − G_i^t)²), the mean over
B·C_i·C_{i+1}. The student's and the teacher's taps must have equal channel counts (no connector):
ValueError otherwise (so WRN-40-2 → WRN-40-1 is not possible, as in RepDistiller).

RepDistiller reads f0..f3 (the stem and the three stages): ``taps: [stem, stage1, stage2, stage3]``
on our CIFAR ResNets. The default is stage1..3, which every zoo model has.

Two stages, as RepDistiller: FSP alone (``task_weight: 0``) for ``init_epochs`` = 30 at lr 0.05,
then plain CE (a stage with ``edges: []``; RepDistiller's main stage sets the FSP term to 0, so
its ``-b 50`` is unused). The FSP loss reaches only the layers up to the last tap; RepDistiller's
init optimiser holds only those (``get_feat_modules()``), ours the whole student, whose classifier
gets a zero gradient.

The paper sums the squared differences (‖G_s − G_t‖²₂ per sample, averaged over the batch):
``reduction: sum``; the default ``mean`` is RepDistiller's.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class FSPParams(Params):
    taps: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3"], min_length=2)
    reduction: Literal["mean", "sum"] = "mean"


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """[B, C_{i+1}, C_i] for each consecutive pair: mean over H·W of top_j · bottom_i (the larger pooled)."""
    out = []
    for bot, top in zip(maps[:-1], maps[1:]):
        bot, top = bot.float(), top.float()
        (bh, bw), (th, tw) = bot.shape[2:], top.shape[2:]
        if bh * bw > th * tw:
            bot = F.adaptive_avg_pool2d(bot, (th, tw))
        elif th * tw > bh * bw:
            top = F.adaptive_avg_pool2d(top, (bh, bw))
        out.append(torch.einsum("bihw,bjhw->bji", bot, top) / (bot.shape[2] * bot.shape[3]))
    return out


@register_loss("fsp")
class FSP(EdgeLoss):
    """Σ over consecutive tap pairs of mean((G_s − G_t)²), G = spatial mean of the maps' outer product."""

    Params = FSPParams

    def needs(self) -> Needs:
        return Needs(source=tuple(self.params.taps), target=tuple(self.params.taps))

    def build(self, source_shapes, target_shapes) -> None:
        for tap in self.params.taps:
            s, t = target_shapes[tap], source_shapes[tap]
            if len(s) != 3 or len(t) != 3:
                raise ValueError(f"tap '{tap}' must be a feature map [C, H, W] on both sides "
                                 f"(student {tuple(s)}, teacher {tuple(t)})")
            if s[0] != t[0]:
                raise ValueError(f"fsp needs equal channel counts: tap '{tap}' has {s[0]} channels in the student "
                                 f"and {t[0]} in the teacher")

    def forward(self, source, target, batch):
        g_s = fsp_matrices([target[k] for k in self.params.taps])
        g_t = fsp_matrices([source[k] for k in self.params.taps])
        total = 0.0
        for s, t in zip(g_s, g_t):
            sq = (s - t).pow(2)
            total = total + (sq.sum() / sq.shape[0] if self.params.reduction == "sum" else sq.mean())
        return total
