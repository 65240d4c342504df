"""The label_smoothing loss against PyTorch's label-smoothed CE and Tf-KD's formula, written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from online_kd.data import Batch
from online_kd.losses import LOSSES

B, C = 4, 5
Z = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.0],
                  [0.1, 0.2, 0.3, -0.4, 3.0],
                  [-2.0, 1.5, 0.0, 0.7, -0.3],
                  [1.0, 1.0, 1.0, 1.0, 1.0]])
Y = torch.tensor([0, 4, 1, 2])


def make(**params):
    cls = LOSSES["label_smoothing"]
    return cls(cls.Params.model_validate(params))


def by_hand(z, y, on, off):
    """−Σ_c q_c log softmax(z)_c, averaged over rows, with q = on at the label and off elsewhere."""
    total = 0.0
    for row, label in zip(z.tolist(), y.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        total -= sum((on if c == label else off) * (v - lse) for c, v in enumerate(row))
    return total / len(z)


def value(loss, z):
    return loss({"logits": z.detach()}, {"logits": z}, Batch(x=torch.zeros(B, 1), y=Y, index=torch.arange(B)))


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_uniform_style_is_torch_label_smoothing(eps):
    got = value(make(epsilon=eps, style="uniform"), Z)
    assert got.item() == pytest.approx(F.cross_entropy(Z, Y, label_smoothing=eps).item(), rel=1e-6)
    assert got.item() == pytest.approx(by_hand(Z, Y, 1 - eps + eps / C, eps / C), rel=1e-6)


def test_tfkd_style_is_the_official_loss_label_smoothing():
    eps = 0.1
    got = value(make(epsilon=eps, style="tfkd"), Z)
    assert got.item() == pytest.approx(by_hand(Z, Y, 1 - eps, eps / (C - 1)), rel=1e-6)
    # the two styles differ: ε/C vs ε/(C−1) on the wrong classes
    assert abs(got.item() - value(make(epsilon=eps), Z).item()) > 1e-3


def test_replaces_the_task_loss_and_reads_no_source():
    loss = make(epsilon=0.1, style="tfkd")
    assert loss.task_scale == 0.0
    z = Z.clone().requires_grad_(True)
    source = torch.zeros(B, C, requires_grad=True)
    out = loss({"logits": source}, {"logits": z}, Batch(x=torch.zeros(B, 1), y=Y, index=torch.arange(B)))
    gz, gs = torch.autograd.grad(out, [z, source], allow_unused=True)
    assert gs is None and gz.abs().sum() > 0
    # d/dz of CE(q, softmax z) is (softmax z − q) / B
    q = torch.full((B, C), 0.1 / (C - 1))
    q[torch.arange(B), Y] = 0.9
    assert torch.allclose(gz, (torch.softmax(Z, 1) - q) / B, atol=1e-6)


def test_epsilon_zero_is_plain_cross_entropy():
    assert value(make(epsilon=0.0, style="tfkd"), Z).item() == pytest.approx(F.cross_entropy(Z, Y).item(), rel=1e-6)
