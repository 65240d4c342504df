"""HSAKD — hierarchical self-supervised augmented KD (Yang et al., IJCAI 2021), as ``winycg/HSAKD`` computes it.

Every batch is expanded to its four rotations (``data.expand: rotation4``: rows x0r0..x0r3, x1r0, …,
joint label 4·class + k), and the peers are ``<model>_aux`` nets whose auxiliary heads (tap ``aux``,
``[rows, K, 4·C]``) classify the joint labels. The task CE of a peer is on the unrotated rows only
(the runtime's anchor rows). Two losses:

* ``hsakd_ce`` — a self-edge (``from: t, to: t``): Σ_i CE(aux_i, joint labels) over all rows, mean per
  head. With the task CE it is the reference's teacher loss (``train_teacher_cifar.py``); with the
  ``hsakd`` edges it is the online variant's per-peer self term (``train_online_kd_cifar.py``).
* ``hsakd`` — from a teacher (or an online partner) to a student:
  aux_weight·Σ_i T²·KL(q_t,i^T ‖ q_s,i^T) + logit_weight·T²·KL(p_t^T ‖ p_s^T), each KL summed over the
  classes and divided by the number of rows (batchmean over all 4B rows, ``DistillKL``). Head i's
  KL is over its 4·C joint classes (one softmax over all of them, not one per rotation); the logit KL
  is over all rows, rotated ones included (``logit_rows: all``; ``anchor`` keeps the unrotated rows
  only). T = 3, weights 1. The reference's offline student stage has no joint-label CE on the
  student's heads: they learn from the teacher's heads only.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from .base import EdgeContext, EdgeLoss, Needs, Params, kl_div
from .registry import register_loss


def _check_heads(shape, logits, who: str) -> int:
    """The joint-class count of an ``aux`` tap's per-row shape ``(K, M·C)``; ValueError if it is not one."""
    if shape is None:
        raise ValueError(f"{who} has no 'aux' tap: use a '<model>_aux' network (HSAKD auxiliary heads)")
    if len(shape) != 2:
        raise ValueError(f"{who}'s 'aux' tap has per-row shape {tuple(shape)}, not (heads, joint classes)")
    if logits is not None and shape[1] % logits[0]:
        raise ValueError(f"{who}'s aux heads give {shape[1]} outputs, not a multiple of its {logits[0]} classes")
    return int(shape[1])


def _check_expansion(ctx: EdgeContext, joint: int | None) -> None:
    """The run's expansion makes joint labels that the heads' outputs fit."""
    ex = ctx.expansion
    if ex is None or ex.factor == 1:
        raise ValueError("HSAKD reads the views of data.expand (e.g. rotation4), and it is none")
    if joint is not None and joint != ex.factor * ctx.num_classes:
        raise ValueError(f"the aux heads give {joint} outputs, but '{ex.name}' makes {ex.factor}·{ctx.num_classes} = "
                         f"{ex.factor * ctx.num_classes} joint classes (model_args.aux_factor: {ex.factor})")


class HSAKDCEParams(Params):
    pass


@register_loss("hsakd_ce")
class HSAKDJointCE(EdgeLoss):
    """Σ over the target's aux heads of CE(head, joint labels), each a mean over all expanded rows.

    A self-edge: its source must be its target (the self-supervised augmented task of one network).
    """

    Params = HSAKDCEParams
    allows_self = True
    needs_expansion = True
    source_kinds = frozenset({"peer"})

    def __init__(self, params: HSAKDCEParams):
        super().__init__(params)
        self._joint: int | None = None
        self._expansion = None

    def needs(self) -> Needs:
        return Needs(source=(), target=("aux",))

    def build(self, source_shapes, target_shapes) -> None:
        self._joint = _check_heads(target_shapes.get("aux"), target_shapes.get("logits"), "the target")

    def attach(self, ctx: EdgeContext) -> None:
        if ctx.source_model is not ctx.target_model:
            raise ValueError("'hsakd_ce' trains a network's own aux heads: write it as a self-edge (from = to)")
        _check_expansion(ctx, self._joint)
        self._expansion = ctx.expansion

    def forward(self, source, target, batch):
        aux = target["aux"].float()
        labels = self._expansion.joint_labels(batch.y)
        return sum(F.cross_entropy(aux[:, i], labels) for i in range(aux.shape[1]))


class HSAKDParams(Params):
    temperature: float = Field(3.0, gt=0)
    aux_weight: float = Field(1.0, ge=0)    # weight of Σ_i KL over the aux heads' joint classes
    logit_weight: float = Field(1.0, ge=0)  # weight of the final-logit KL
    # rows of the final-logit KL: all (the reference, rotated rows included) or anchor (unrotated only)
    logit_rows: Literal["all", "anchor"] = "all"


@register_loss("hsakd")
class HSAKD(EdgeLoss):
    """aux_weight·Σ_i T²·KL(q_source,i ‖ q_target,i) + logit_weight·T²·KL(p_source ‖ p_target), batchmean (rows).

    Head i of the target learns from head i of the source: both nets need the same number of heads.
    """

    Params = HSAKDParams
    needs_expansion = True
    source_kinds = frozenset({"peer"})

    def __init__(self, params: HSAKDParams):
        super().__init__(params)
        self._joint: int | None = None
        self._expansion = None

    def needs(self) -> Needs:
        return Needs(source=("logits", "aux"), target=("logits", "aux"))

    def build(self, source_shapes, target_shapes) -> None:
        super().build(source_shapes, target_shapes)
        s = source_shapes.get("aux")
        t = target_shapes.get("aux")
        _check_heads(s, source_shapes.get("logits"), "the source")
        self._joint = _check_heads(t, target_shapes.get("logits"), "the target")
        if tuple(s) != tuple(t):
            raise ValueError(f"source aux heads {tuple(s)} and target aux heads {tuple(t)} differ: HSAKD pairs "
                             "head i with head i (same number of heads and joint classes)")

    def attach(self, ctx: EdgeContext) -> None:
        _check_expansion(ctx, self._joint)
        self._expansion = ctx.expansion

    def forward(self, source, target, batch):
        p = self.params
        aux_s, aux_t = target["aux"], source["aux"]
        heads = sum(kl_div(aux_s[:, i], aux_t[:, i], p.temperature) for i in range(aux_s.shape[1]))
        z_s, z_t = target["logits"], source["logits"]
        if p.logit_rows == "anchor":
            z_s, z_t = self._expansion.anchor(z_s), self._expansion.anchor(z_t)
        return p.aux_weight * heads + p.logit_weight * kl_div(z_s, z_t, p.temperature)
