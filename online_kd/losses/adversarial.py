"""AFD: feature-map-level online adversarial KD (Chung et al., ICML 2020).

No public implementation exists; the loss follows the paper's description (LSGAN squared losses,
a discriminator per target, an optional transfer layer aligning shapes, a separate adversarial
update at a lower learning rate). The discriminator's architecture is ours: the paper's is not
public. Pair it with ``kl`` edges for the logit part and the ``ring`` pattern for >2 peers.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn

from ..finite import FiniteModel
from .base import EdgeLoss, Needs, Params
from .registry import register_loss


class DiscriminatorSpec(FiniteModel):
    model_config = ConfigDict(extra="forbid")
    hidden: int = Field(64, ge=1)
    lr: float = Field(2.0e-5, gt=0)


class AFDParams(Params):
    tap: str = "stage3"
    discriminator: DiscriminatorSpec = DiscriminatorSpec()
    adversarial_lr: float | None = Field(None, gt=0)  # the target net's lr in the adversarial step (default: discriminator.lr)


class Discriminator(nn.Module):
    """conv3×3 → LeakyReLU → conv3×3/2 → LeakyReLU → global pool → linear: one score per sample."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.body(x).squeeze(1)


@register_loss("afd")
class AFD(EdgeLoss):
    """LSGAN adversarial loss on a feature map, in its own update after the main (logit) step.

    The target's discriminator D learns L_D = (1 − D(G_source))² + D(T(G_target))² (the source's
    map is real, the target's own is fake); the target learns L_G = (1 − D(T(G_target)))². T is a
    1×1 conv (+ pooling) mapping the target's map onto the source's shape. The edge's value is
    L_G + L_D; each part reaches only its own parameters.
    """

    Params = AFDParams
    phase = 1

    def needs(self) -> Needs:
        return Needs(source=(self.params.tap,), target=(self.params.tap,))

    def build(self, source_shapes, target_shapes) -> None:
        tap = self.params.tap
        s, t = source_shapes[tap], target_shapes[tap]
        if len(s) != 3 or len(t) != 3:
            raise ValueError(f"tap '{tap}' must be a feature map [C, H, W] on both sides (got {tuple(s)}, {tuple(t)})")
        self.source_hw = tuple(s[1:])
        self.transfer = nn.Conv2d(t[0], s[0], 1, bias=False) if t[0] != s[0] else nn.Identity()
        self.discriminator = Discriminator(s[0], self.params.discriminator.hidden)

    def _transfer(self, g):
        f = self.transfer(g)
        return f if tuple(f.shape[2:]) == self.source_hw else F.adaptive_avg_pool2d(f, self.source_hw)

    def param_groups(self) -> list[dict]:
        return []  # nothing of this edge moves in the main step

    def phase_param_groups(self, net: nn.Module) -> list[dict]:
        lr = self.params.adversarial_lr or self.params.discriminator.lr
        return [{"params": list(net.parameters()), "lr": lr},
                {"params": list(self.transfer.parameters()), "lr": lr},
                {"params": list(self.discriminator.parameters()), "lr": self.params.discriminator.lr}]

    def forward(self, source, target, batch):
        tap = self.params.tap
        fake = self._transfer(target[tap].float())
        d = self.discriminator
        d.requires_grad_(False)  # L_G must not move the discriminator
        generator = (1 - d(fake)).pow(2).mean()
        d.requires_grad_(True)
        disc = (1 - d(source[tap].float())).pow(2).mean() + d(fake.detach()).pow(2).mean()
        return generator + disc
