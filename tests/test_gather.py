"""The whole-batch hook of batch-relational losses (EdgeContext.gather): identity in one process; a loss
that reads the other replica's shard through it computes the whole batch's loss, gradient on its own slice.
The real collective (2 replicas over gloo on the ray engine) is tested in test_ray_engine.py."""
from __future__ import annotations

import pytest
import torch

from online_kd.engine.gather import ReplicaGather, local_gather
from online_kd.losses import LOSSES, EdgeContext
from online_kd.losses.base import Clock
from online_kd.losses.infoflow import flatten_tap

PARAMS = {"sp": {"tap": "stage2"}, "rkd": {"tap": "pool"},
          "infoflow": {"pairs": [["stage2", "stage2"], ["pool", "pool"]]}}


def make(name):
    cls = LOSSES[name]
    return cls(cls.Params.model_validate(PARAMS[name]))


def features(seed, rows=6):
    g = torch.Generator().manual_seed(seed)
    return {"stage2": torch.randn(rows, 3, 4, 4, generator=g), "pool": torch.randn(rows, 5, generator=g)}


def test_identity_until_joined():
    a, b = torch.randn(3, 2), torch.arange(3)
    assert local_gather(a) is a and local_gather(a, b) == (a, b)
    g = ReplicaGather()
    assert g(a) is a and g(a, b) == (a, b)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_relational_losses_read_the_whole_batch_through_the_hook(name):
    """Replica 0 holds rows 0-5 of a 12-row batch; with the hook appending rows 6-11 its loss is the whole batch's."""
    assert LOSSES[name].relates_samples
    student, teacher = features(0, 12), features(1, 12)
    whole = make(name)(teacher, student, None)
    loss = make(name)
    if name == "infoflow":  # it gathers each pair's flattened (pooled) rows
        p = loss.params
        rest = {(side, k): flatten_tap(v[6:], p.pool.get(k)) for side, d in (("s", student), ("t", teacher))
                for k, v in d.items()}
        pairs = [(("s", a), ("t", b)) for a, b in p.pairs]
    else:
        tap = PARAMS[name]["tap"]
        rest, pairs = {"s": student[tap][6:], "t": teacher[tap][6:]}, [("s", "t")]
    hook = PairwiseShard(rest, pairs)
    loss.attach(EdgeContext(source_model=None, train_targets=None, num_train=None, num_classes=5, clock=Clock(),
                            gather=hook))
    mine = {k: v[:6].clone().requires_grad_() for k, v in student.items()}
    part = loss({k: v[:6] for k, v in teacher.items()}, mine, None)
    torch.testing.assert_close(part, whole)
    assert hook.calls == len(pairs)
    part.backward()  # the local slice keeps its gradient
    assert any(v.grad is not None and v.grad.abs().sum() > 0 for v in mine.values())


class PairwiseShard:
    """Replica 0's view without the collective: appends, call by call, the other shard's (target, source)
    rows of each tap pair the loss gathers, as ReplicaGather returns them (own rows first)."""

    def __init__(self, other: dict[str, torch.Tensor], pairs: list[tuple[str, str]]):
        self.other, self.pairs, self.calls = other, pairs, 0

    def __call__(self, target, source):
        target_key, source_key = self.pairs[self.calls]
        self.calls += 1
        return torch.cat([target, self.other[target_key]]), torch.cat([source, self.other[source_key]])
