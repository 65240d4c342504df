"""AFD: the LSGAN losses by hand, who gets which gradient, the separate update, state on resume."""
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import Batch, BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


def afd(**params):
    cls = LOSSES["afd"]
    loss = cls(cls.Params.model_validate(params))
    loss.build({"stage3": torch.Size((4, 4, 4))}, {"stage3": torch.Size((6, 8, 8))})
    return loss


def test_lsgan_losses_by_hand():
    torch.manual_seed(0)
    loss = afd(tap="stage3")
    gs, gt = torch.randn(5, 4, 4, 4), torch.randn(5, 6, 8, 8)
    got = loss({"stage3": gs}, {"stage3": gt}, None)
    d = loss.discriminator
    fake = torch.nn.functional.adaptive_avg_pool2d(loss.transfer(gt), (4, 4))  # T: 1×1 conv, pooled to the source size
    lg = sum((1 - d(fake)[i]) ** 2 for i in range(5)) / 5
    ld = sum((1 - d(gs)[i]) ** 2 for i in range(5)) / 5 + sum(d(fake)[i] ** 2 for i in range(5)) / 5
    assert got.item() == pytest.approx((lg + ld).item(), rel=1e-5)
    assert LOSSES["afd"].phase == 1


def test_each_part_reaches_only_its_own_parameters():
    torch.manual_seed(0)
    loss = afd(tap="stage3")
    gs = torch.randn(5, 4, 4, 4)
    gt = torch.randn(5, 6, 8, 8, requires_grad=True)
    loss({"stage3": gs}, {"stage3": gt}, None).backward()
    d_grads = [p.grad.clone() for p in loss.discriminator.parameters()]
    # the discriminator's gradient is that of L_D alone (L_G does not move it)
    loss.zero_grad()
    fake = torch.nn.functional.adaptive_avg_pool2d(loss.transfer(gt), (4, 4)).detach()
    d = loss.discriminator
    ((1 - d(gs)).pow(2).mean() + d(fake).pow(2).mean()).backward()
    for a, b in zip(d_grads, (p.grad for p in d.parameters())):
        assert torch.allclose(a, b, atol=1e-6)
    assert gt.grad is not None and gt.grad.abs().sum() > 0  # the target's map learns (L_G)


def quick(**overrides):
    raw = yaml.safe_load((ROOT / "topologies/quick/afd.yaml").read_text())
    return load_topology(raw, {"train.epochs": 2, "tracking.enabled": False, **overrides})


def test_adversarial_step_is_separate_and_uses_its_own_optimizer():
    topo = quick()
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[0])
    assert rt.phases == [0, 1]
    peer = rt.peers["b"]
    lrs = sorted(g["lr"] for g in peer.phase_optimizers[1].param_groups)
    assert lrs == [2.0e-4, 2.0e-4]  # the net and the discriminator (same channels: no transfer layer)
    d_params = {id(p) for p in peer.edges["afd:a->b"].discriminator.parameters()}
    assert not any(id(p) in d_params for g in peer.optimizer.param_groups for p in g["params"])
    before = [p.clone() for p in peer.edges["afd:a->b"].discriminator.parameters()]
    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    res = rt.train_step(batch, 0, 0)
    assert "edge/afd_from_a" in res.terms["b"] and "edge/kl_from_a" in res.terms["b"]
    after = list(peer.edges["afd:a->b"].discriminator.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(before, after))  # the discriminator trained
    assert rt.global_step == 1  # two updates, one step


def test_discriminators_and_their_optimizer_resume_bit_for_bit(tmp_path):
    topo = quick()
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=1)).run()
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_b.pt")
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_b.pt")
    for k, v in a["edges"]["afd:a->b"].items():
        assert torch.equal(v, b["edges"]["afd:a->b"][k]), k
    assert a["phase_optimizers"]["1"]["state"].keys() == b["phase_optimizers"]["1"]["state"].keys()
