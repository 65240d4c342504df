"""OFD — A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019), as its official CIFAR-100
code (clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``) computes it.

The student's pre-ReLU stage features go through a connector (1×1 conv + BN, owned by the edge) to the
teacher's channels and are pulled towards the teacher's pre-ReLU features with the *partial L2*: where
the teacher is negative, only a student value above the margin is penalised, the margin being the
expected value of the negative part of the teacher's pre-ReLU distribution, read from the γ, β of the
teacher BN that precedes the ReLU.

Differences from the official script, on purpose:

* the official script keeps the teacher in **train mode** (batch statistics, running statistics
  updated) during distillation; our engine runs frozen peers in eval mode, so the teacher's features
  here use its running statistics (as mdistiller's re-implementation does);
* the margins are computed once, at the edge's first step (not when the run is built), so that a
  teacher trained in an earlier stage gives them from its trained BN; they are buffers, checkpointed
  with the target peer.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..models.taps import bn_before
from .base import EdgeContext, EdgeLoss, Needs, Params
from .registry import register_loss


class OFDParams(Params):
    taps: list[str] = Field(default_factory=lambda: ["stage1_pre", "stage2_pre", "stage3_pre"], min_length=1)
    source_taps: list[str] | None = None  # the teacher's taps where they differ from ``taps`` (same length)
    divisor: float = Field(1000.0, gt=0)  # official: Σ loss / B / 1000

    @model_validator(mode="after")
    def _same_length(self):
        if self.source_taps is not None and len(self.source_taps) != len(self.taps):
            raise ValueError(f"source_taps has {len(self.source_taps)} taps, taps has {len(self.taps)}: one per layer")
        return self


def margin_from_bn(weight: Tensor, bias: Tensor) -> Tensor:
    """Per channel: E[x | x < 0] for x ~ N(β, γ²), i.e. m − s·φ(m/s)/Φ(−m/s) with s=|γ|, m=β, or −3s
    where Φ(−m/s) ≤ 0.001 (official ``get_margin_from_BN``). A channel with γ=0 (constant β) gets the
    formula's limit: β if β < 0, else 0."""
    out = []
    for g, b in zip(weight.detach().double().cpu().tolist(), bias.detach().double().cpu().tolist()):
        s, m = abs(g), b
        if s == 0.0:
            out.append(min(m, 0.0))
            continue
        cdf = 0.5 * math.erfc(m / s / math.sqrt(2.0))  # Φ(−m/s)
        if cdf > 0.001:
            out.append(m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf)
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32)


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Σ (s − t')² · 1[(s > t') or (t' > 0)], t' = max(t, margin) (margin per channel), over all elements."""
    t = torch.max(teacher, margin.view(1, -1, *([1] * (teacher.dim() - 2))))
    mask = (student > t) | (t > 0)
    return ((student - t).pow(2) * mask).sum()


def connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """Conv1×1 (no bias, weights ~ N(0, 2/(k²·C_out)), the official He init) + BN(γ=1, β=0)."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t_channels))
    bn = nn.BatchNorm2d(t_channels)
    return nn.Sequential(conv, bn)


@register_loss("ofd")
class OFD(EdgeLoss):
    """Σ_i partial_L2(connector_i(s_i), t_i, margin_i) / 2^(L−i−1) / B / divisor over the pre-ReLU taps.

    The last tap weighs 1, the one before 1/2, then 1/4… (official). ``divisor`` = 1000 is the official
    script's scaling of the summed loss (CE + this; the edge ``weight`` stays 1). Teacher and student taps
    need equal spatial sizes; channels are matched by the connector, always present (as in the official code).
    """

    Params = OFDParams
    needs_source_model = True

    def __init__(self, params: OFDParams):
        super().__init__(params)
        self.source_taps = list(params.source_taps or params.taps)
        self.connectors = nn.ModuleList()
        self._source: tuple[nn.Module, ...] = ()  # the teacher network, held outside the module tree
        self.register_buffer("margins_ready", torch.zeros((), dtype=torch.bool))

    def needs(self) -> Needs:
        return Needs(source=tuple(self.source_taps), target=tuple(self.params.taps))

    def build(self, source_shapes, target_shapes) -> None:
        self.connectors = nn.ModuleList()
        for i, (st, tt) in enumerate(zip(self.source_taps, self.params.taps)):
            t, s = source_shapes[st], target_shapes[tt]
            if len(t) != 3 or len(s) != 3:
                raise ValueError(f"taps '{st}' (source) and '{tt}' (target) must be feature maps [C, H, W] "
                                 f"(got {tuple(t)}, {tuple(s)})")
            if t[1:] != s[1:]:
                raise ValueError(f"tap '{st}' of the source is {t[1]}×{t[2]} but '{tt}' of the target is "
                                 f"{s[1]}×{s[2]}: OFD needs equal spatial sizes")
            self.connectors.append(connector(s[0], t[0]))
            self.register_buffer(f"margin{i}", torch.zeros(t[0]))

    def attach(self, ctx: EdgeContext) -> None:
        """Keep the source network (its BN gives the margins at the first step); check its BNs now."""
        model = ctx.source_model
        if model is None:
            raise ValueError("OFD reads the margins from the source network's BatchNorms: it needs the source model")
        for i, tap in enumerate(self.source_taps):
            bn = bn_before(model, tap)
            want = getattr(self, f"margin{i}").numel()
            if bn.num_features != want:
                raise ValueError(f"the BatchNorm before tap '{tap}' has {bn.num_features} channels, the tap {want}")
        self._source = (model,)

    @torch.no_grad()
    def compute_margins(self) -> None:
        """Margins from the source's BN γ, β now; done once, at the first step (official: at construction)."""
        if not self._source:
            raise RuntimeError("OFD margins need the source network: attach() was not called with it")
        for i, tap in enumerate(self.source_taps):
            bn = bn_before(self._source[0], tap)
            buf = getattr(self, f"margin{i}")
            buf.copy_(margin_from_bn(bn.weight, bn.bias).to(buf.device))
        self.margins_ready.fill_(True)

    def margins(self) -> list[Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.connectors))]

    def forward(self, source, target, batch):
        if not bool(self.margins_ready):
            self.compute_margins()
        n = len(self.connectors)
        total = 0.0
        for i, (st, tt) in enumerate(zip(self.source_taps, self.params.taps)):
            s = self.connectors[i](target[tt]).float()
            total = total + partial_l2(s, source[st].float(), self.margins()[i]) / 2 ** (n - i - 1)
        return total / target[self.params.taps[0]].shape[0] / self.params.divisor
