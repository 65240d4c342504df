"""Heterogeneous KD via information-flow modelling (Passalis, Tzelepi & Tefas, CVPR 2020).

Follows the official code, passalis/pkth @5766e63 (``nn/pkt_transfer.py``: ``prob_loss``,
``prob_transfer``; ``cifar10/exp2_proposed.py``). Per matched layer pair, each side's features
(flattened; spatial maps average-pooled first, as the reference does for its ResNet-18 teacher)
give a B×B kernel-similarity matrix, row-normalised into conditional probabilities
p(j|i); the loss is the Jeffreys divergence between the two sides' matrices.

The critical-period weighting of the reference — weights (1, w, w, w) on layers (fc, conv3, conv2,
conv1) with w = 100·0.7^epoch — is two edges between the same peers, because the engine schedules
weights per edge: ``infoflow`` for the last pair (constant weight 1) and ``infoflow_critical`` (the
same loss under a second name; the validator allows one edge per loss, source and target) for the
earlier pairs with ``weight: 100, schedule: {name: exponential, gamma: 0.7}`` (weight·γ^epoch_in_stage).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .base import EdgeLoss, Needs, Params
from .registry import register_loss

Pair = tuple[str, str]


class InfoFlowParams(Params):
    # [student_tap, source_tap]; the reference's layers (3,2,1,0) ↔ (3,2,1,0) are pool/stage3/stage2/stage1
    pairs: list[Pair] = Field(
        default_factory=lambda: [("stage1", "stage1"), ("stage2", "stage2"), ("stage3", "stage3"), ("pool", "pool")],
        min_length=1)
    # 'combined' (reference setting): cosine and Student-t kernels, one Jeffreys term each, summed
    kernel: Literal["combined", "cosine", "student_t"] = "combined"
    # per-pair constant factors (the reference's ``layer_weights``); None: all 1
    weights: list[float] | None = None
    # tap name → side of the average-pooled grid before flattening ([C,H,W] → [C·k·k]); a [C,H,W] tap
    # not listed is flattened whole. Default: the reference's ResNet-18 pooling (32×32→4×4, 16×16→4×4,
    # 8×8→2×2) on CIFAR ResNets' stage1/2/3; the grid never exceeds the map (no upsampling).
    pool: dict[str, int] = Field(default_factory=lambda: {"stage1": 4, "stage2": 4, "stage3": 2})
    eps: float = Field(1e-6, gt=0)  # in √(d²+eps) and in the cosine's norm + eps, as the reference
    log_eps: float = Field(0.0, ge=0)  # added inside the logs; 0 = reference (no eps)

    @model_validator(mode="after")
    def _check(self) -> "InfoFlowParams":
        if self.weights is not None and len(self.weights) != len(self.pairs):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.pairs)} pairs")
        if any(k < 1 for k in self.pool.values()):
            raise ValueError("pool sizes must be >= 1")
        return self


def pairwise_distances(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """√(max(‖a_i‖² + ‖a_j‖² − 2·a_i·a_j, 0) + eps): [B, B] (the reference's expansion, not cdist)."""
    sq = f.pow(2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * f @ f.t()
    return torch.sqrt(d2.clamp(min=0) + eps)


def cosine_similarities(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(cos(a_i, a_j) + 1) / 2 with a / (‖a‖ + eps) and NaNs set to 0, as the reference."""
    f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + eps)
    f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
    return (f @ f.t() + 1.0) / 2.0


def student_t_similarities(f: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 / (1 + d_ij) (the reference's Student-t kernel with degree 1)."""
    return 1.0 / (1.0 + pairwise_distances(f, eps))


def conditional_probabilities(s: torch.Tensor) -> torch.Tensor:
    """Row-normalised similarities: p(j|i) = s_ij / Σ_k s_ik (diagonal kept)."""
    return s / s.sum(1, keepdim=True)


def jeffreys(p: torch.Tensor, q: torch.Tensor, log_eps: float = 0.0) -> torch.Tensor:
    """mean over all B² entries of (p − q)(log p − log q)."""
    return ((p - q) * (torch.log(p + log_eps) - torch.log(q + log_eps))).mean()


KERNELS = {"cosine": (cosine_similarities,), "student_t": (student_t_similarities,),
           "combined": (cosine_similarities, student_t_similarities)}


def flow_divergence(source: torch.Tensor, target: torch.Tensor, kernel: str = "combined", eps: float = 1e-6,
                    log_eps: float = 0.0) -> torch.Tensor:
    """Σ over the kernel(s) of Jeffreys(P_source, P_target) on [B, D] features (the reference's ``prob_loss``)."""
    total = source.new_zeros(())
    for k in KERNELS[kernel]:
        total = total + jeffreys(conditional_probabilities(k(source, eps)),
                                 conditional_probabilities(k(target, eps)), log_eps)
    return total


def flatten_tap(x: torch.Tensor, grid: int | None) -> torch.Tensor:
    """[B, …] → [B, D] (half precision raised to float32); a [B, C, H, W] map is average-pooled to ≤ grid×grid first."""
    if x.element_size() < 4 or not x.is_floating_point():
        x = x.float()
    if x.dim() == 4 and grid is not None:
        x = F.adaptive_avg_pool2d(x, (min(grid, x.shape[2]), min(grid, x.shape[3])))
    return x.reshape(x.shape[0], -1)


@register_loss("infoflow")
class InfoFlow(EdgeLoss):
    """Σ_pairs weight_l · Σ_kernels mean_{i,j}[(p_ij − q_ij)(log p_ij − log q_ij)] over the source's and
    target's conditional-probability matrices (B×B, diagonal included), as ``prob_loss`` with
    ``{'student': 'combined', 'teacher': 'combined', 'loss': 'combined'}``.

    No trainable parts and no state: the two sides' feature sizes may differ (heterogeneous KD).
    The task (CE) term is switched off by the stage (``task_weight: 0``), as the reference trains
    the student on the transfer loss alone.
    """

    relates_samples = True  # B×B conditional probabilities of the whole batch (self.gather)

    Params = InfoFlowParams

    def needs(self) -> Needs:
        pairs = self.params.pairs
        return Needs(source=tuple(dict.fromkeys(s for _, s in pairs)), target=tuple(dict.fromkeys(t for t, _ in pairs)))

    def build(self, source_shapes, target_shapes) -> None:
        for t, s in self.params.pairs:
            for side, tap, shapes in (("target", t, target_shapes), ("source", s, source_shapes)):
                if tap not in shapes:
                    raise ValueError(f"{side} has no tap '{tap}' (taps: {', '.join(sorted(shapes))})")

    def forward(self, source, target, batch):
        p = self.params
        weights = p.weights or [1.0] * len(p.pairs)
        x = target[p.pairs[0][0]]
        total = x.new_zeros((), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # kernels and logs in fp32 under bf16/fp16 runs
            for (t, s), w in zip(p.pairs, weights):
                ft, fs = self.gather(flatten_tap(target[t], p.pool.get(t)), flatten_tap(source[s], p.pool.get(s)))
                total = total + w * flow_divergence(fs, ft, p.kernel, p.eps, p.log_eps)
        return total


@register_loss("infoflow_critical")
class InfoFlowCritical(InfoFlow):
    """``infoflow`` under a second name: the critical-period edge (earlier layers, decaying weight).

    The same loss; a second name only so that it can be a second edge between the same peers, with
    its own weight and schedule (default pairs: stage1..3).
    """

    class Params(InfoFlowParams):
        pairs: list[Pair] = Field(default_factory=lambda: [("stage1", "stage1"), ("stage2", "stage2"),
                                                           ("stage3", "stage3")], min_length=1)
