"""KDCL ensemble combiners: how members' logits make one teacher's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..finite import FiniteModel
from .registry import register_combiner


class CombinerParams(FiniteModel):
    model_config = ConfigDict(extra="forbid")


class Combiner(nn.Module):
    """Combines detached member logits. ``uses_labels`` combiners are evaluated as the members' mean."""

    Params = CombinerParams
    uses_labels = False
    name: str

    def __init__(self, params: BaseModel, num_members: int):
        super().__init__()
        self.params = params
        self.num_members = num_members

    @property
    def refit_every(self) -> int | None:
        """Steps between refits on the held-out split (None: never)."""
        return None

    def refit(self, members: list[Tensor], y: Tensor) -> None:
        """Refit the combination on held-out members' logits."""

    def forward(self, members: list[Tensor], y: Tensor) -> Tensor:
        raise NotImplementedError

    def evaluate(self, members: list[Tensor]) -> Tensor:
        """The ensemble's prediction without labels (for test accuracy)."""
        if self.uses_labels:
            return torch.stack(members).mean(0)
        return self.forward(members, None)


@register_combiner("mean")
class Mean(Combiner):
    """The mean of members' logits."""

    def forward(self, members, y):
        return torch.stack(members).mean(0)


@register_combiner("naive")
class Naive(Combiner):
    """KDCL-Naive: the logits of the member with the lowest batch cross-entropy."""

    uses_labels = True

    def forward(self, members, y):
        ces = torch.stack([F.cross_entropy(z.float(), y) for z in members])
        return members[int(torch.argmin(ces))]


@register_combiner("min_logit")
class MinLogit(Combiner):
    """KDCL-MinLogit: subtract each member's true-class logit, take the elementwise minimum."""

    uses_labels = True

    def forward(self, members, y):
        shifted = [z - z.gather(1, y.view(-1, 1)) for z in members]
        return torch.stack(shifted).min(0).values


class WeightedParams(CombinerParams):
    refit_every: int = Field(100, ge=1)


class Weighted(Combiner):
    """Σ wᵢ zᵢ with weights on the simplex, refit on the held-out split every ``refit_every`` steps.

    The weights start uniform and are checkpointed as a buffer.
    """

    Params = WeightedParams

    def __init__(self, params, num_members):
        super().__init__(params, num_members)
        self.register_buffer("weights", torch.full((num_members,), 1.0 / num_members))

    @property
    def refit_every(self):
        return self.params.refit_every

    def forward(self, members, y):
        return torch.einsum("m,mnc->nc", self.weights.to(members[0].dtype), torch.stack(members))


class LinearParams(WeightedParams):
    refit_iters: int = Field(100, ge=1)


@register_combiner("linear")
class Linear(Weighted):
    """KDCL-Linear: the simplex weights minimising CE of Σ wᵢ zᵢ on the held-out split (L-BFGS, softmax-parametrised)."""

    Params = LinearParams

    def refit(self, members, y):
        z = torch.stack([m.detach().float() for m in members])  # M×N×C
        theta = torch.log(self.weights.clamp_min(1e-8)).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=0.5, max_iter=self.params.refit_iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(torch.einsum("m,mnc->nc", torch.softmax(theta, 0), z), y)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weights.copy_(torch.softmax(theta.detach(), 0))


class GeneralParams(WeightedParams):
    ridge: float = Field(1e-6, ge=0)


@register_combiner("general")
class General(Weighted):
    """KDCL-General: weights minimising the ensemble's generalisation error estimated on held-out data.

    With eᵢ = softmax(zᵢ) − onehot(y) on the held-out split and C_ij = mean ⟨eᵢ, eⱼ⟩, the squared error
    of Σ wᵢ pᵢ under Σ wᵢ = 1 is minimised by w = C⁻¹1 / 1ᵀC⁻¹1 (Perrone & Cooper's generalised ensemble
    method; ``ridge`` is added to C's diagonal). No official code exists: negative weights are clipped
    to 0 and the rest renormalised, so the teacher stays a mixture; members' logits are combined as
    in ``linear``.
    """

    Params = GeneralParams

    def refit(self, members, y):
        probs = torch.stack([torch.softmax(m.detach().double(), -1) for m in members])  # M×N×C
        err = probs - F.one_hot(y, probs.shape[-1]).double()
        c = torch.einsum("inc,jnc->ij", err, err) / err.shape[1]
        c = c + self.params.ridge * torch.eye(len(members), dtype=c.dtype)
        w = torch.linalg.solve(c, torch.ones(len(members), dtype=c.dtype))
        w = (w / w.sum()).clamp_min(0)
        self.weights.copy_((w / w.sum()).to(self.weights.dtype))
