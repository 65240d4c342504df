"""Self-knowledge distillation: CS-KD — class-wise self-KD (Yun et al., CVPR 2020), as the official code
(alinlab/cs-kd ``train.py`` ``KDLoss``, ``datasets.py`` ``PairBatchSampler``) computes it.

Each anchor comes with a partner of the same class (``data.sampler: class_paired`` puts it in
``batch.pair``). The network's prediction on the partner, made without gradient, teaches its
prediction on the anchor: T²·KL(softmax(f(x_pair)/T) ‖ softmax(f(x_anchor)/T)), summed and ÷B.
The anchor's CE is the peer's task loss; λ is the edge's ``weight`` (1 for CIFAR-100, 3 for the
fine-grained sets in the official README).

As the reference, the partner forward runs the network in its current mode: in a training stage
(train mode) the partner batch updates the BatchNorm running statistics too, after the anchor batch.
The paper's optional extra term (x against an augmented x') is not in the official code, nor here.
"""
from __future__ import annotations

import torch
from pydantic import Field

from .base import EdgeContext, EdgeLoss, Params, kl_div
from .registry import register_loss


class CSKDParams(Params):
    temperature: float = Field(4.0, gt=0)


@register_loss("cskd")
class CSKD(EdgeLoss):
    """T²·KL(p_source(x_pair)^T ‖ p_target(x_anchor)^T), batchmean; the source network forwards the partners
    under ``no_grad``.

    Written as a self-edge (``from: a, to: a``). An edge from another peer makes that peer's prediction
    on the partners the teacher (class-wise KD from it); on the ray engine both then share a worker.
    """

    Params = CSKDParams
    allows_self = True
    needs_source_model = True
    batch_fields = frozenset({"pair"})
    source_kinds = frozenset({"peer"})

    def __init__(self, params: CSKDParams):
        super().__init__(params)
        self._source: tuple[torch.nn.Module, ...] = ()  # held outside the module tree: not this edge's parameters

    def attach(self, ctx: EdgeContext) -> None:
        if ctx.source_model is None:
            raise ValueError("CS-KD runs the source network on the partners: it needs the source model")
        self._source = (ctx.source_model,)

    def forward(self, source, target, batch):
        if getattr(batch, "pair", None) is None:
            raise RuntimeError("loss 'cskd' needs each sample's class partner (batch.pair): "
                               "set data.sampler: class_paired")
        with torch.no_grad():
            partner = self._source[0](batch.pair.x)
        return kl_div(target["logits"], partner.detach(), self.params.temperature)
