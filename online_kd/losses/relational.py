"""Relational KD: the student matches relations between the samples of a batch, not their features.

SP (Tung & Mori, ICCV 2019) and RKD (Park et al., CVPR 2019) as RepDistiller
(``distiller_zoo/SP.py``, ``RKD.py``) implements them. Both compare B×B (or B×B×B) structures, so
teacher and student features may have any widths; neither owns trainable parts nor state.
With replicas, both relate the whole batch (``self.gather``): every replica computes the whole-batch loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import EdgeLoss, Needs, Params
from .registry import register_loss


def fp32(x: torch.Tensor):
    """Autocast off: Gram matrices and distances by expansion lose too much in fp16/bf16."""
    return torch.autocast(x.device.type, enabled=False)


class _TapParams(Params):
    tap: str = "stage3"
    source_tap: str | None = None  # the teacher's tap when its last stage has another name; None: ``tap``


class _Relational(EdgeLoss):
    source_kinds = frozenset({"peer"})  # relations of features: only networks have taps
    relates_samples = True  # B×B relations of the batch

    @property
    def source_tap(self) -> str:
        return self.params.source_tap or self.params.tap

    def needs(self) -> Needs:
        return Needs(source=(self.source_tap,), target=(self.params.tap,))

    def build(self, source_shapes, target_shapes) -> None:
        for side, shapes, tap in (("source", source_shapes, self.source_tap), ("target", target_shapes, self.params.tap)):
            if tap not in shapes:
                raise ValueError(f"{side} has no tap '{tap}' (taps: {', '.join(shapes)})")
            if len(shapes[tap]) == 0:
                raise ValueError(f"{side} tap '{tap}' is a scalar per sample: nothing to relate")


def similarity(f: torch.Tensor) -> torch.Tensor:
    """SP's B×B similarity: G = F·Fᵀ on the flattened features, each row of G L2-normalised."""
    f = f.float().reshape(f.shape[0], -1)
    return F.normalize(f @ f.t(), dim=1)


class SPParams(_TapParams):
    tap: str = "stage3"


@register_loss("sp")
class SimilarityPreserving(_Relational):
    """SP: ‖G_t − G_s‖²_F / B², G = row-normalised Gram matrix of the batch's flattened features.

    RepDistiller reads the last stage's post-ReLU map (``stage3`` on CIFAR ResNets); its β=3000
    goes in the edge's ``weight``. The paper's sum over several layer pairs is one edge per tap.
    """

    Params = SPParams

    def forward(self, source, target, batch):
        s, t = self.gather(target[self.params.tap], source[self.source_tap])
        with fp32(s):
            g_s, g_t = similarity(s), similarity(t)
        b = g_s.shape[0]
        return (g_t - g_s).pow(2).sum() / (b * b)


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """RKD's Euclidean distances: (‖a‖² + ‖b‖² − 2a·b) clamped at ``eps``, square root, diagonal 0."""
    sq = e.pow(2).sum(1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def normalised_distances(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by the mean of their positive entries (RKD's ψ_D; no boolean indexing: no host sync)."""
    d = pairwise_distances(e)
    return d / (d.sum() / (d > 0).sum())


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """cos∠(e_j − e_i, e_k − e_i) for all (i, j, k), flattened (RKD's ψ_A; degenerate triplets give 0)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


class RKDParams(_TapParams):
    tap: str = "pool"
    w_d: float = Field(25.0, ge=0)  # distance term; the paper's metric-learning runs use 1
    w_a: float = Field(50.0, ge=0)  # angle term; the paper's metric-learning runs use 2


@register_loss("rkd")
class RelationalKD(_Relational):
    """RKD: w_d·smoothL1(ψ_D(s), ψ_D(t)) + w_a·smoothL1(ψ_A(s), ψ_A(t)), both mean-reduced, on ``pool``.

    RepDistiller's weights (25, 50; script ``-b 1`` is the edge ``weight``). As in its code, ψ_D is
    normalised by the mean of the off-diagonal distances and the angle term averages over all B³
    triplets, degenerate ones (cos = 0 on both sides) included. A batch of one sample has no pairs: 0.
    """

    Params = RKDParams

    def forward(self, source, target, batch):
        s, t = self.gather(target[self.params.tap], source[self.source_tap])
        s, t = s.float().reshape(s.shape[0], -1), t.float().reshape(t.shape[0], -1)
        if s.shape[0] < 2:
            return s.sum() * 0.0
        p = self.params
        total = s.new_zeros(())
        with fp32(s):
            if p.w_d:
                total = total + p.w_d * F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))
            if p.w_a:
                total = total + p.w_a * F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return total
