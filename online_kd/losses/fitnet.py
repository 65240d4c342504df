"""FitNets hints (Romero et al., ICLR 2015) in RepDistiller's form (HobbitLong/RepDistiller @b84f547).

A regressor owned by the edge (so by the student: optimised and checkpointed with it) maps the
student's ``guided`` tap onto the teacher's ``hint`` tap; the loss is the mean squared error
between the two (RepDistiller's ``HintLoss`` = ``nn.MSELoss()``, mean over B·C·H·W; its script
uses ``-b 100`` as the edge weight). The regressor is RepDistiller's ``ConvReg``: a conv that also
resizes (student twice the size: 3×3 stride 2; half the size: 4×4 stride-2 transposed conv;
otherwise a valid conv of kernel 1+ΔH × 1+ΔW, i.e. 1×1 for equal sizes), then BatchNorm, then ReLU.

Stages. The paper trains in two stages: (1) hint training of the student's layers up to the guided
layer together with the regressor, (2) KD of the whole student. RepDistiller instead runs one stage
of CE + 100·hint. A topology writes the paper's two stages with the stage fields: stage 1 lists only
this edge and sets ``task_weight: 0``; stage 2 lists a ``kd`` edge. The engine trains the whole
student in stage 1, which is the same thing: the hint loss depends only on layers up to the guided
tap, so autograd gives the deeper layers and the classifier no gradient (zero, with CE × 0).

Differences from the paper, as parameters: ``relu`` (RepDistiller's ConvReg ends in a ReLU; the
paper's regressor is a plain conv) and ``reduction`` (``mean`` = RepDistiller's MSE; ``half_sum`` =
the paper's ½‖u_h − r(v_g)‖² per sample, averaged over the batch).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class FitNetParams(Params):
    hint: str = "stage2"    # the teacher's (source's) tap: RepDistiller --hint_layer 2 = f2, post-ReLU
    guided: str = "stage2"  # the student's (target's) tap the regressor reads
    relu: bool = True       # ReLU after the regressor's BN (RepDistiller ConvReg use_relu=True)
    reduction: Literal["mean", "half_sum"] = "mean"


def conv_regressor(s_shape: torch.Size, t_shape: torch.Size, relu: bool = True) -> nn.Sequential:
    """RepDistiller's ConvReg from a student map [C_s, H_s, W_s] to a teacher map [C_t, H_t, W_t]."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
    if s_h == 2 * t_h and s_w == 2 * t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif 2 * s_h == t_h and 2 * s_w == t_w:
        conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h and s_w >= t_w:
        conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise ValueError(f"cannot regress a {s_h}×{s_w} student map onto a {t_h}×{t_w} teacher map "
                         "(the student map must be at least as large, or exactly half the size)")
    layers = [conv, nn.BatchNorm2d(t_c)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@register_loss("fitnet")
class FitNet(EdgeLoss):
    """mean((r(f_s) − f_t)²): r = conv(+resize) → BN → ReLU on the student's guided tap, f_t the teacher's hint."""

    Params = FitNetParams

    def needs(self) -> Needs:
        return Needs(source=(self.params.hint,), target=(self.params.guided,))

    def build(self, source_shapes, target_shapes) -> None:
        t, s = source_shapes[self.params.hint], target_shapes[self.params.guided]
        if len(s) != 3 or len(t) != 3:
            raise ValueError(f"fitnet needs feature maps [C, H, W]: guided '{self.params.guided}' is {tuple(s)}, "
                             f"hint '{self.params.hint}' is {tuple(t)}")
        self.regressor = conv_regressor(s, t, self.params.relu)

    def forward(self, source, target, batch):
        f_s = self.regressor(target[self.params.guided])
        f_t = source[self.params.hint]
        sq = (f_s.float() - f_t.float()).pow(2)
        if self.params.reduction == "half_sum":
            return 0.5 * sq.sum() / sq.shape[0]
        return sq.mean()
