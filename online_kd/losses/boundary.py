"""BSS — KD with boundary-supporting samples (Heo et al., AAAI 2019), as the official CIFAR-10 code
(bhheo/BSS_distillation ``train_BSS_distillation.py``, ``attacks/attack_BSS.py``) computes it.

The edge's value is ``w_kd(e)·KD + w_bss(e)·BSS``:

* KD = −Σ softmax(z_t/T)·log_softmax(z_s/T) / B, a soft cross-entropy (no T²), on the clean batch;
* BSS = the same soft cross-entropy on adversarial samples, ÷ their number. Base samples are those the
  teacher (and, by default, the student) classifies correctly; of more than ``attack_size``, those with
  the largest Σ_{c≠y}(p_t − p_s)² (T=1). Each gets a target class drawn among the teacher's non-top-1
  classes with probability ∝ the teacher's softmax, and is moved towards it by a targeted attack on the
  teacher (:func:`bss_attack`). The student sees the adversarial batch in a forward of its own, with
  gradient, in its current mode (train: its BN uses and updates that batch's statistics), as the reference;
* the weights decay with the epoch: w_kd = max(3(1 − e/E), 0) + 1 and w_bss = max(2(1 − 4e/(3E)), 0) in
  the reference (e counted from 1, E the stage's epochs), i.e. :class:`~.base.Ramp` (4 → 1 over the
  stage, 2 → 0 over its first 3/4). Once w_bss is 0 no attack runs.

The teacher runs in eval mode for the attack and its adversarial forward (as the reference), whatever
its mode in the stage. The target-class draw is a hash of (seed, epoch, sample index), so it needs no
RNG state and does not depend on shards. The edge's ``weight`` multiplies the whole value (1 as the
reference); the peer's CE stays at weight 1.

Differences from the reference, on purpose: a zero input gradient (the reference divides by 0 → NaN)
moves the sample by 0; ``attack_size`` applies to each replica's shard on the ray engine.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..data.hashing import mix64, sample_uint32
from .base import Clock, EdgeContext, EdgeLoss, Params, Ramp
from .registry import register_loss


class BSSParams(Params):
    temperature: float = Field(3.0, gt=0)
    kd_weight: Ramp = Ramp(start=4.0, end=1.0, over=1.0)    # reference ``ratio``
    bss_weight: Ramp = Ramp(start=2.0, end=0.0, over=0.75)  # reference ``attack_ratio``
    epoch_base: Literal[0, 1] = 1   # the reference counts epochs from 1: its first epoch already decays
    base: Literal["both", "teacher"] = "both"  # correct for teacher and student (current code) or teacher only (first commit)
    attack_size: int = Field(64, ge=1)
    steps: int = Field(10, ge=1)
    step_size: float = Field(0.3, gt=0)
    clamp: tuple[float, float] | None = (-2.5, 2.5)  # bounds of the normalised input; None: unbounded

    @field_validator("clamp")
    @classmethod
    def _bounds(cls, clamp):
        if clamp is not None and clamp[0] >= clamp[1]:
            raise ValueError(f"must be [low, high] with low < high (got {list(clamp)})")
        return clamp


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """−Σ softmax(t/T)·log_softmax(s/T), summed over classes and samples, ÷ the number of samples (no T²)."""
    q = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return -(q * torch.log_softmax(student_logits.float() / temperature, dim=-1)).sum() / student_logits.shape[0]


def select_base_samples(teacher_logits: Tensor, student_logits: Tensor, y: Tensor, size: int,
                        rule: str = "both") -> Tensor:
    """Indices of the base samples: correct for the teacher (and the student, ``rule='both'``); of more than
    ``size``, the ``size`` with the largest Σ_{c≠y}(softmax(z_t) − softmax(z_s))², largest first."""
    ok = teacher_logits.argmax(1) == y
    if rule == "both":
        ok &= student_logits.argmax(1) == y
    idx = ok.nonzero().flatten()
    if idx.numel() > size:
        diff = (torch.softmax(teacher_logits[idx].float(), 1) - torch.softmax(student_logits[idx].float(), 1)) ** 2
        score = diff.sum(1) - diff.gather(1, y[idx].unsqueeze(1)).squeeze(1)
        idx = idx[score.sort(descending=True).indices[:size]]
    return idx


def sample_target_classes(teacher_logits: Tensor, u: Tensor) -> Tensor:
    """Per sample, a class among the teacher's non-top-1 ones with probability ∝ its softmax, by inverse CDF of
    the uniform ``u`` ∈ [0, 1): the first class (by descending score) whose running sum reaches u·(their total);
    the second-best class if rounding leaves none (as the reference)."""
    score, cls = torch.softmax(teacher_logits.float(), 1).sort(dim=1, descending=True)
    score, cls = score[:, 1:], cls[:, 1:]
    r = (score.sum(1) * u.to(score)).unsqueeze(1)
    hit = score.cumsum(1) >= r
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.zeros_like(hit[:, 0], dtype=torch.long))
    return cls.gather(1, first.unsqueeze(1)).squeeze(1)


def bss_attack(model: nn.Module, x: Tensor, target_class: Tensor, steps: int = 10, step_size: float = 0.3,
               clamp: tuple[float, float] | None = (-2.5, 2.5)) -> Tensor:
    """The reference's targeted attack on ``model`` (used as it is: set its mode before).

    gt = the model's initial argmax. Each step: g = ∇ₓ Σ (z_target − z_gt); every sample still predicted as gt
    moves by step_size·(z_gt − z_target + 1e-4)·g/‖g‖₂ (per-sample norm), the others stay; the result is
    clamped. Stops early once no sample is still predicted as gt. No gradient reaches the model's parameters.
    """
    x0 = x.detach()
    adv = x0.clone()
    gt = None
    tgt = target_class.view(-1, 1)
    for _ in range(steps):
        xv = adv.detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(xv).float()
            if gt is None:
                gt = out.argmax(1).view(-1, 1)
            s_gt, s_t = out.gather(1, gt), out.gather(1, tgt)
            grad, = torch.autograd.grad((s_t - s_gt).sum(), xv)
        active = (out.detach().argmax(1, keepdim=True) == gt).float()
        if not bool(active.any()):
            break
        shape = (-1,) + (1,) * (x.dim() - 1)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
        pert = (s_gt.detach() - s_t.detach()).view(shape)
        step = (step_size * active).view(shape) * (pert + 1e-4) * grad / norm
        adv = x0 + ((adv + step) - x0)  # the reference's total perturbation re-applied to the original
        if clamp is not None:
            adv = adv.clamp(clamp[0], clamp[1])
    return adv.detach()


class _EvalMode:
    """Puts a network in eval mode for a block and restores each module's own mode after."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __enter__(self):
        self.modes = [m.training for m in self.net.modules()]
        self.net.eval()

    def __exit__(self, *exc):
        for m, flag in zip(self.net.modules(), self.modes):
            m.training = flag


@register_loss("bss")
class BSS(EdgeLoss):
    """w_kd(e)·soft-CE(z_s, z_t) + w_bss(e)·soft-CE on boundary-supporting samples (see the module docstring)."""

    Params = BSSParams
    needs_source_model = True
    source_kinds = frozenset({"peer"})

    def __init__(self, params: BSSParams):
        super().__init__(params)
        self._nets: tuple[nn.Module, nn.Module] | tuple = ()  # (teacher, student): held outside the module tree
        self.clock = Clock()
        self.seed = 0

    def attach(self, ctx: EdgeContext) -> None:
        if ctx.source_model is None or ctx.target_model is None:
            raise ValueError("BSS attacks the source network and runs the target on the attacks: it needs both models")
        self._nets = (ctx.source_model, ctx.target_model)
        self.clock, self.seed = ctx.clock, ctx.seed

    def weights(self) -> tuple[float, float]:
        """(w_kd, w_bss) at the clock's epoch."""
        p = self.params
        return p.kd_weight.at(self.clock, p.epoch_base), p.bss_weight.at(self.clock, p.epoch_base)

    def uniforms(self, index: Tensor) -> Tensor:
        """One uniform in [0, 1) per sample: a hash of (seed, epoch, sample index)."""
        key = mix64("online_kd/bss/target-class", self.seed, self.clock.epoch)
        return sample_uint32(key, index.cpu()).double() / 2.0 ** 32

    def forward(self, source, target, batch):
        p = self.params
        w_kd, w_bss = self.weights()
        zt, zs = source["logits"].float(), target["logits"]
        value = w_kd * soft_cross_entropy(zs, zt, p.temperature)
        if w_bss <= 0:
            return value
        idx = select_base_samples(zt, zs.detach().float(), batch.y, p.attack_size, p.base)
        if idx.numel() == 0:
            return value
        teacher, student = self._nets
        cls = sample_target_classes(zt[idx], self.uniforms(batch.index[idx.cpu()]).to(zt.device))
        with _EvalMode(teacher):
            adv = bss_attack(teacher, batch.x[idx], cls, p.steps, p.step_size, p.clamp)
            with torch.no_grad():
                zt_adv = teacher(adv).float()
        zs_adv = student(adv)
        return value + w_bss * soft_cross_entropy(zs_adv, zt_adv, p.temperature)
