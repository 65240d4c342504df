"""The pieces of data-free synthesis objectives, as plain functions on tensors, and their registry.

An *objective* says how a synthetic batch's statistics at the INPUT of every ``BatchNorm2d`` of a
frozen teacher are pulled towards that layer's running statistics (the teacher's memory of its
training data). Everything else (cross-entropy on target labels, image priors, the ADI competition
term) is shared and lives in :mod:`online_kd.stages.synthesize`. A new objective is one class here:

* ``deepinversion`` (Yin et al., CVPR 2020, ``NVlabs/DeepInversion``):
  r = ‖σ²_run − σ²_batch‖₂ + ‖μ_run − μ_batch‖₂ per layer (L2 norms, not squared);
* ``bnstats`` ("The Knowledge Within", Haroush et al., CVPR 2020, no code released): per layer
  Σ_c KL(N(μ̂, σ̂²) ‖ N(μ̃, σ̃²)), μ̂/σ̂² the running statistics, μ̃/σ̃² the synthetic batch's, i.e.
  log(σ̃/σ̂) − ½·(1 − (σ̂² + (μ̂ − μ̃)²)/σ̃²): the KL *from* the running Gaussian *to* the batch's,
  as the paper writes it (the batch variance is in the denominator).

Batch statistics are per channel over (N, H, W) with the biased variance, as the reference hook
and BatchNorm itself compute them.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import registrar


# ---------------------------------------------------------------------- the pieces
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` [N, C, H, W] over (N, H, W)."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def deepinversion_bn_loss(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
    """DeepInversion's feature term of one BN layer: ‖running_var − var‖₂ + ‖running_mean − mean‖₂."""
    return torch.linalg.vector_norm(running_var - var) + torch.linalg.vector_norm(running_mean - mean)


def gaussian_kl_bn_loss(mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor,
                        eps: float = 1e-5) -> Tensor:
    """The Knowledge Within's BNS term of one BN layer: Σ_c KL(N(μ̂, σ̂²) ‖ N(μ̃, σ̃²)).

    μ̂, σ̂² = running statistics (+eps), μ̃, σ̃² = the batch's (+eps):
    log(σ̃/σ̂) − ½·(1 − (σ̂² + (μ̂ − μ̃)²)/σ̃²), summed over channels.
    """
    v_run, v_batch = running_var + eps, var + eps
    return (0.5 * torch.log(v_batch / v_run) - 0.5 * (1 - (v_run + (running_mean - mean) ** 2) / v_batch)).sum()


def total_variation(x: Tensor) -> tuple[Tensor, Tensor]:
    """(TV-L1, TV-L2) of a batch over its 4 neighbour differences (horizontal, vertical, two diagonals).

    TV-L2 = Σ of the Frobenius norms of the 4 difference tensors; TV-L1 = Σ of their mean absolute
    values (the reference's ``(|d|/255).mean()·255``)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:],
             x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:],
             x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    l1 = sum(d.abs().mean() for d in diffs)
    l2 = sum(torch.linalg.vector_norm(d) for d in diffs)
    return l1, l2


def image_l2(x: Tensor, per_image: bool = False) -> Tensor:
    """‖x‖₂ of the whole batch (CIFAR script) or the mean of per-image norms (ImageNet script)."""
    if per_image:
        return torch.linalg.vector_norm(x.reshape(len(x), -1), dim=1).mean()
    return torch.linalg.vector_norm(x)


def competition_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's term 1 − clamp(JS, 0, 1): small where student and teacher disagree.

    P = softmax(z_s/T), Q = softmax(z_t/T), M = (P+Q)/2, all three clamped to [0.01, 0.99] (M from
    the unclamped P, Q), JS = ½·KL(M‖P) + ½·KL(M‖Q), each KL summed over classes, mean over the batch."""
    p = F.softmax(student_logits / temperature, dim=1)
    q = F.softmax(teacher_logits / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    js = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - js.clamp(0.0, 1.0)


# ---------------------------------------------------------------------- hooks on BN inputs
BNTerm = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class BNInputHooks:
    """Forward hooks on every ``BatchNorm2d`` of a net: each forward leaves one term per layer.

    ``term(mean, var, running_mean, running_var)`` gets the statistics of the layer's input batch
    and the layer's running statistics. Use as a context manager (the hooks are removed on exit).
    """

    def __init__(self, net: nn.Module, term: BNTerm):
        self.term = term
        self.layers = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        self.terms: list[Tensor | None] = [None] * len(self.layers)
        self._handles = [m.register_forward_hook(partial(self._hook, i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int, module: nn.BatchNorm2d, inputs: tuple, output: Tensor) -> None:
        x = inputs[0]
        mean, var = channel_stats(x)
        self.terms[i] = self.term(mean, var, module.running_mean.detach().to(x.dtype),
                                  module.running_var.detach().to(x.dtype))

    def total(self, first_multiplier: float = 1.0) -> Tensor:
        """Σ over layers of the last forward's terms, the first BN layer's × ``first_multiplier``."""
        if any(t is None for t in self.terms):
            raise RuntimeError("a BatchNorm2d layer did not run in the last forward")
        return sum(t * (first_multiplier if i == 0 else 1.0) for i, t in enumerate(self.terms))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "BNInputHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- the registry
OBJECTIVES: dict[str, type["SynthesisObjective"]] = {}


_register = registrar(OBJECTIVES, "synthesis objective")


def register_objective(name: str):
    """Class decorator: the objective used by ``objective: <name>`` of a synthesize stage."""
    return _register(name)


class SynthesisObjective:
    """The BN-statistics term of an objective; ``default_ce`` weighs CE(teacher(x), target) by default."""

    name: ClassVar[str]
    default_ce: ClassVar[float] = 1.0

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def bn_term(self, mean: Tensor, var: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
        raise NotImplementedError


@register_objective("deepinversion")
class DeepInversion(SynthesisObjective):
    """DeepInversion: L2 distances of mean and variance, plus the cross-entropy on target labels."""

    default_ce = 1.0

    def bn_term(self, mean, var, running_mean, running_var):
        return deepinversion_bn_loss(mean, var, running_mean, running_var)


@register_objective("bnstats")
class BNStatistics(SynthesisObjective):
    """The Knowledge Within's BN-Statistics scheme: the Gaussian KL alone (no label term by default)."""

    default_ce = 0.0

    def bn_term(self, mean, var, running_mean, running_var):
        return gaussian_kl_bn_loss(mean, var, running_mean, running_var, self.eps)
