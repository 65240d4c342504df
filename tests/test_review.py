"""ReviewKD: HCL and ABF against their formulas by hand, gradient ownership, checkpointed ABF weights, quick YAML."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from online_kd.data import Batch, BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES
from online_kd.losses.review import ABF, hcl_level
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick" / "reviewkd.yaml"


def make(**params):
    cls = LOSSES["reviewkd"]
    return cls(cls.Params.model_validate(params))


def fixed(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mse(a, b):
    return ((a - b) ** 2).sum().item() / a.numel()


def pool(f, size):
    """Average over (h/size)×(w/size) blocks: adaptive pooling when size divides the map."""
    n, c, h, w = f.shape
    return f.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


@pytest.mark.parametrize("h, weights", [
    (8, {4: 0.5, 2: 0.25, 1: 0.125}),  # the official code's weights, norm 1.875
    (4, {2: 0.5, 1: 0.25}),             # norm 1.75 (not 0.25, 0.125: the weight halves per level USED)
    (2, {1: 0.5}),
    (1, {}),
])
def test_hcl_level_by_hand(h, weights):
    fs, ft = fixed(0, 2, 3, h, h), fixed(1, 2, 3, h, h)
    want = mse(fs, ft) + sum(w * mse(pool(fs, l), pool(ft, l)) for l, w in weights.items())
    want /= 1 + sum(weights.values())
    assert hcl_level(fs, ft).item() == pytest.approx(want, rel=1e-5)
    if h == 8:
        assert 1 + sum(weights.values()) == 1.875
    if h == 4:
        assert 1 + sum(weights.values()) == 1.75


def bn_eval(x, bn):
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(shape) \
        + bn.bias.view(shape)


def randomise_bn(module, seed):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))


@torch.no_grad()
def test_abf_fusion_by_hand():
    torch.manual_seed(0)
    abf = ABF(in_channels=6, mid_channels=4, out_channels=5, fuse=True).eval()
    randomise_bn(abf, 1)
    x, res = fixed(2, 2, 6, 4, 4), fixed(3, 2, 4, 2, 2)
    out, fused = abf(x, res, (8, 8))
    assert out.shape == (2, 5, 8, 8) and fused.shape == (2, 4, 8, 8)
    # conv1×1 + BN; nearest upsample of the residual (each pixel repeated 2×2); two sigmoid maps
    xm = bn_eval(torch.einsum("oi,nihw->nohw", abf.conv1[0].weight[:, :, 0, 0], x), abf.conv1[1])
    y = res.repeat_interleave(2, 2).repeat_interleave(2, 3)
    att = abf.att_conv[0]
    z = torch.sigmoid(torch.einsum("oi,nihw->nohw", att.weight[:, :, 0, 0], torch.cat([xm, y], 1))
                      + att.bias.view(1, -1, 1, 1))
    mixed = xm * z[:, :1] + y * z[:, 1:]
    up = mixed.repeat_interleave(2, 2).repeat_interleave(2, 3)  # resized (nearest) to the teacher's 8×8
    assert torch.allclose(fused, up, atol=1e-5)
    assert torch.allclose(out, bn_eval(F.conv2d(up, abf.conv2[0].weight, padding=1), abf.conv2[1]), atol=1e-5)
    # the fusion really uses the residual
    out2, _ = abf(x, res + 1.0, (8, 8))
    assert not torch.allclose(out, out2)


def test_build_shapes_init_and_deepest_level_without_fusion():
    loss = make()
    student = {"stage1": torch.Size((8, 8, 8)), "stage2": torch.Size((16, 4, 4)), "stage3": torch.Size((32, 2, 2)),
               "pool": torch.Size((32,))}
    teacher = {"stage1_pre": torch.Size((16, 8, 8)), "stage2_pre": torch.Size((32, 4, 4)),
               "stage3_pre": torch.Size((64, 2, 2)), "pool": torch.Size((64,))}
    loss.build(teacher, student)
    assert len(loss.abfs) == 4
    for abf, (cin, cout) in zip(loss.abfs, [(8, 16), (16, 32), (32, 64), (32, 64)]):
        assert abf.conv1[0].weight.shape == (32, cin, 1, 1)  # mid = min(512, 32)
        assert abf.conv2[0].weight.shape == (cout, 32, 3, 3)
        for conv in (abf.conv1[0], abf.conv2[0]):  # kaiming_uniform(a=1): bound sqrt(3 / fan_in)
            fan_in = conv.weight[0].numel()
            assert conv.weight.abs().max().item() <= math.sqrt(3 / fan_in) + 1e-7
    assert [abf.att_conv is None for abf in loss.abfs] == [False, False, False, True]
    wide = make(mid_channels=12)
    wide.build({**teacher, "pool": torch.Size((64,))}, {**student, "pool": torch.Size((1024,))})
    assert wide.abfs[0].conv1[0].weight.shape[0] == 12
    big = make()
    big.build(teacher, {**student, "pool": torch.Size((1024,))})
    assert big.abfs[0].conv1[0].weight.shape[0] == 512


def test_build_rejects_bad_taps():
    with pytest.raises(ValidationError):
        make(source_taps=["stage1_pre"], target_taps=["stage1", "stage2"])
    with pytest.raises(ValueError, match="feature map"):
        make(source_taps=["x"], target_taps=["y"]).build({"x": torch.Size((4, 2))}, {"y": torch.Size((4, 2, 2))})


def test_loss_is_hcl_of_fused_levels_deepest_first():
    torch.manual_seed(0)
    loss = make()
    s = {"stage1": fixed(0, 2, 8, 8, 8), "stage2": fixed(1, 2, 16, 4, 4), "stage3": fixed(2, 2, 32, 2, 2),
         "pool": fixed(3, 2, 32)}
    t = {"stage1_pre": fixed(4, 2, 16, 8, 8), "stage2_pre": fixed(5, 2, 32, 4, 4),
         "stage3_pre": fixed(6, 2, 64, 2, 2), "pool": fixed(7, 2, 64)}
    loss.build({k: v.shape[1:] for k, v in t.items()}, {k: v.shape[1:] for k, v in s.items()})
    loss.eval()
    got = loss(t, s, Batch(x=torch.zeros(2, 1), y=torch.zeros(2, dtype=torch.long), index=torch.arange(2)))
    with torch.no_grad():
        a = loss.abfs
        o4, r4 = a[3](s["pool"].view(2, 32, 1, 1), None, (1, 1))  # pool: deepest, no fusion
        o3, r3 = a[2](s["stage3"], r4, (2, 2))
        o2, r2 = a[1](s["stage2"], r3, (4, 4))
        o1, _ = a[0](s["stage1"], r2, (8, 8))
        want = (hcl_level(o1, t["stage1_pre"]) + hcl_level(o2, t["stage2_pre"]) + hcl_level(o3, t["stage3_pre"])
                + mse(o4, t["pool"].view(2, 64, 1, 1)))
    assert got.item() == pytest.approx(float(want), rel=1e-5)


def quick(**overrides):
    return load_topology(QUICK, {"tracking.enabled": False, **overrides})


def test_gradients_reach_student_and_abf_not_teacher():
    topo = quick(**{"train.epochs": 1})
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[1])
    assert not rt.peers["teacher"].net.training  # the engine keeps the frozen teacher in eval mode
    batch = next(iter(BatchStream(data.train, 32, 0, transform=data.train_transform).epoch(0)))
    outs = rt.forward(batch.x, ["teacher", "student"])
    first, terms0 = rt.peer_losses("student", outs, batch, 0)
    assert not any(k.startswith("edge/") for k in terms0)  # linear warm-up: weight 0 in the first epoch
    total, terms = rt.peer_losses("student", outs, batch, 2)
    assert "edge/reviewkd_from_teacher" in terms and terms["edge/reviewkd_from_teacher"] > 0
    total.backward()
    assert all(p.grad is None for p in rt.peers["teacher"].net.parameters())
    assert all(p.grad is not None for p in rt.peers["student"].net.parameters())
    abf = next(iter(rt.peers["student"].edges.values()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in abf.parameters())
    opt_params = {id(p) for g in rt.peers["student"].optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in abf.parameters())  # optimised by the student's optimizer


def run(topo, out, **kw):
    return LocalEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True, **kw)).run()


def edge_state(out_dir):
    path = ckpt.latest_checkpoint(Path(out_dir) / "checkpoints")
    return ckpt.load(path / ckpt.peer_file("student"))["edges"]


def test_abf_weights_round_trip_through_checkpoint(tmp_path):
    # 1 teacher + 3 student epochs of 3 steps; the split run stops after the student's 2nd epoch
    # (weights 0, 2.5: the ABF modules have trained before the checkpoint) and resumes for the 3rd
    topo = quick(**{"stages[0].epochs": 1, "stages[1].epochs": 3, "train.max_steps_per_epoch": 3,
                    "train.eval_every": 100})
    run(topo, tmp_path / "whole")
    first = run(topo, tmp_path / "split", stop_after_epochs=3)
    assert first["finished"] is False
    assert run(topo, tmp_path / "split", resume=True)["finished"]
    whole, split = edge_state(tmp_path / "whole"), edge_state(tmp_path / "split")
    assert whole.keys() == split.keys() and len(whole) == 1
    (key, w), = whole.items()
    assert any(k.endswith("running_mean") for k in w)  # ABF BN statistics are checkpointed too
    for name, value in w.items():
        assert torch.equal(value, split[key][name]), name
    fresh = Runtime(topo, build_data(topo.config.data, 0).info).peers["student"].edges[key].state_dict()
    assert not torch.equal(fresh["abfs.0.conv1.0.weight"], w["abfs.0.conv1.0.weight"])  # it did train


def test_quick_topology_one_epoch(tmp_path):
    summary = run(quick(**{"train.epochs": 1}), tmp_path / "q")
    assert summary["finished"] and summary["peers"]["student"]["top1_last"] > 0


def test_cifar100_topology_settings():
    topo = load_topology(ROOT / "topologies" / "cifar100" / "reviewkd.yaml")
    (e,) = topo.edges
    assert e.loss == "reviewkd" and e.weight == 5.0 and e.schedule.name == "linear_warmup" and e.schedule.epochs == 20
    assert [e.weight_at(k) for k in (0, 10, 20, 100)] == [0.0, 2.5, 5.0, 5.0]
    c = topo.config
    assert c.data.batch_size == 128 and c.train.epochs == 240
    opt = c.peers["student"].optimizer
    assert (opt.lr, opt.momentum, opt.nesterov, opt.weight_decay) == (0.1, 0.9, True, 5.0e-4)
    assert c.peers["student"].schedule.milestones == [150, 180, 210]
