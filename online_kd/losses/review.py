"""ReviewKD — Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021), as the official
CIFAR-100 code (dvlab-research/ReviewKD, ``model/reviewkd.py``) computes it: attention-based fusion
(ABF) of the student's features deepest-first, and the hierarchical context loss (HCL)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class ReviewKDParams(Params):
    # shallow → deep, one teacher tap per student tap; a flat tap ([D], e.g. ``pool``) is read as D×1×1
    target_taps: list[str] = Field(default_factory=lambda: ["stage1", "stage2", "stage3", "pool"], min_length=1)
    # the official teacher features: preact=True (pre-ReLU stage outputs) plus the pooled feature
    source_taps: list[str] = Field(default_factory=lambda: ["stage1_pre", "stage2_pre", "stage3_pre", "pool"],
                                   min_length=1)
    mid_channels: int | None = Field(None, ge=1)  # None: min(512, channels of the deepest student tap)
    levels: list[int] = Field(default_factory=lambda: [4, 2, 1])  # HCL pyramid: pooled sizes, tried in this order

    @model_validator(mode="after")
    def _pairs(self) -> "ReviewKDParams":
        if len(self.source_taps) != len(self.target_taps):
            raise ValueError(f"source_taps ({len(self.source_taps)}) and target_taps ({len(self.target_taps)}) "
                             "must pair up one to one")
        if any(level < 1 for level in self.levels):
            raise ValueError("levels must be positive sizes")
        return self


class ABF(nn.Module):
    """Attention-based fusion of one student level with the (fused) deeper level.

    conv1×1+BN to ``mid`` channels; unless deepest, the residual is resized (nearest) to this
    level's size and the two maps are mixed by two sigmoid attention maps (conv1×1 on their
    concatenation); the result is resized (nearest) to the teacher's size and returned as the
    next residual, and conv3×3+BN maps it to the teacher's channels for the loss.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: Sequence[int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF needs the deeper level's residual")
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_level(fs: Tensor, ft: Tensor, levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """One level of the hierarchical context loss.

    [MSE(fs, ft) + Σ w_l·MSE(pool_l fs, pool_l ft)] / (1 + Σ w_l) over the pooled sizes l < h
    (h = the map's height); w starts at 1/2 and halves for each size actually used, as the official
    ``hcl`` does (8×8: 4,2,1 with 1/2,1/4,1/8; 4×4: 2,1 with 1/2,1/4). MSE is the elementwise mean.
    """
    fs, ft = fs.float(), ft.float()
    h = fs.shape[2]
    loss = F.mse_loss(fs, ft)
    w, total = 1.0, 1.0
    for size in levels:
        if size >= h:
            continue
        w /= 2.0
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, (size, size)), F.adaptive_avg_pool2d(ft, (size, size)))
        total += w
    return loss / total


def _as_map(shape: Sequence[int], tap: str, side: str) -> tuple[int, int, int]:
    """Per-sample shape as C×H×W: a feature map as it is, a flat feature ([D], ``pool``) as D×1×1."""
    if len(shape) == 3:
        return tuple(shape)  # type: ignore[return-value]
    if len(shape) == 1:
        return (shape[0], 1, 1)
    raise ValueError(f"{side} tap '{tap}' must be a feature map [C, H, W] or a flat feature [D] (got {tuple(shape)})")


def _as_map_tensor(t: Tensor) -> Tensor:
    return t.view(t.shape[0], t.shape[1], 1, 1) if t.dim() == 2 else t


@register_loss("reviewkd")
class ReviewKD(EdgeLoss):
    """Σ over levels of HCL(ABF-fused student level, teacher level); the ABF modules belong to the student.

    Student (target) taps are fused deepest-first: ABF of the deepest tap has no residual, every
    shallower one fuses its own feature with the deeper fused map. mid channels = min(512, deepest
    student channels) as in the official ``ReviewKD``; conv weights kaiming_uniform(a=1).

    The official training multiplies by ``kd_loss_weight · min(1, epoch/20)`` (0 in the first
    epoch): put ``weight: 5.0`` and ``schedule: {name: linear_warmup, epochs: 20}`` on the edge.
    Teacher BN: the official CIFAR code never puts the teacher in eval mode (it only sets
    requires_grad=False), so its BN uses batch statistics and its running stats drift;
    mdistiller's re-implementation and this engine keep a frozen source peer in eval mode, which
    gives slightly different teacher features. The optional KL term (``--use-kl``, off by
    default) is a separate ``kd`` edge.
    """

    Params = ReviewKDParams

    def needs(self) -> Needs:
        return Needs(source=tuple(self.params.source_taps), target=tuple(self.params.target_taps))

    def build(self, source_shapes, target_shapes) -> None:
        p = self.params
        student = [_as_map(target_shapes[t], t, "target") for t in p.target_taps]
        teacher = [_as_map(source_shapes[t], t, "source") for t in p.source_taps]
        mid = p.mid_channels or min(512, student[-1][0])
        n = len(student)
        # abfs[i] serves tap i (shallow → deep); the deepest one (last) does not fuse
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < n - 1) for i, (s, t) in enumerate(zip(student, teacher)))
        self.out_sizes = [t[1:] for t in teacher]

    def forward(self, source, target, batch):
        p = self.params
        fs = [_as_map_tensor(target[t]) for t in p.target_taps]
        ft = [_as_map_tensor(source[t]) for t in p.source_taps]
        outs: list[Tensor] = [None] * len(fs)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(fs))):  # deepest first
            outs[i], residual = self.abfs[i](fs[i], residual, self.out_sizes[i])
        total = 0.0
        for out, t in zip(outs, ft):  # summed shallow → deep, as the official hcl
            total = total + hcl_level(out, t, p.levels)
        return total
