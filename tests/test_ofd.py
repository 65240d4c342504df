"""OFD: the margin and the partial L2 by hand, BN lookup per family, who gets gradients, margins on resume."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES, EdgeContext
from online_kd.models import build_model
from online_kd.models.taps import bn_before
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
EDGE = "ofd:teacher->student"


def margin_by_hand(gamma, beta):
    """E[x | x<0], x ~ N(β, γ²): β − |γ|·φ(β/|γ|)/Φ(−β/|γ|), or −3|γ| when Φ(−β/|γ|) ≤ 0.001."""
    s, m = abs(gamma), beta
    cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    if cdf > 0.001:
        pdf = math.exp(-(m / s) ** 2 / 2) / math.sqrt(2 * math.pi)
        return m - s * pdf / cdf
    return -3 * s


def ofd(**params):
    cls = LOSSES["ofd"]
    return cls(cls.Params.model_validate(params))


def teacher_convnet(seed=0):
    """A convnet whose stage BNs carry chosen γ, β (one channel in the −3s regime, one with γ<0)."""
    torch.manual_seed(seed)
    net = build_model("convnet", 1, 10, widths=(3, 4), strides=(1, 2))
    g = torch.Generator().manual_seed(seed)
    for bn in (net.stages[0].bn, net.stages[1].bn):
        bn.weight.data = torch.rand(bn.num_features, generator=g) * 2 - 0.5
        bn.bias.data = torch.randn(bn.num_features, generator=g)
    net.stages[0].bn.weight.data[0], net.stages[0].bn.bias.data[0] = 0.2, 1.0  # Φ(−5) < 0.001 → −3s
    net.stages[0].bn.weight.data[1] = -0.7  # s = |γ|
    return net


def attached(net, s_shapes, t_shapes, **params):
    loss = ofd(taps=["stage1_pre", "stage2_pre"], **params)
    loss.build(t_shapes, s_shapes)
    loss.attach(EdgeContext(source_model=net, train_targets=None, num_train=None, num_classes=10))
    return loss


SRC = {"stage1_pre": torch.Size((3, 8, 8)), "stage2_pre": torch.Size((4, 4, 4))}   # teacher
TGT = {"stage1_pre": torch.Size((2, 8, 8)), "stage2_pre": torch.Size((5, 4, 4))}   # student


def test_margins_by_hand_from_the_teachers_bn():
    net = teacher_convnet()
    loss = attached(net, TGT, SRC)
    loss.compute_margins()
    for i, bn in enumerate((net.stages[0].bn, net.stages[1].bn)):
        want = [margin_by_hand(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert getattr(loss, f"margin{i}").tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert loss.margin0[0].item() == pytest.approx(-0.6)  # the −3s branch
    assert all(v < 0 for m in loss.margins() for v in m.tolist())  # the mean of a negative part
    names = dict(loss.named_buffers())
    assert {"margin0", "margin1", "margins_ready"} <= set(names) and not any("margin" in n for n, _ in loss.named_parameters())
    assert set(loss.state_dict()) >= {"margin0", "margin1", "margins_ready"}


def partial_l2_by_hand(s, t, margin, weight):
    total = 0.0
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            for h in range(s.shape[2]):
                for w in range(s.shape[3]):
                    sv, tv = s[b, c, h, w].item(), max(t[b, c, h, w].item(), margin[c].item())
                    if sv > tv or tv > 0:
                        total += (sv - tv) ** 2 * weight
    return total


def test_partial_l2_by_hand_on_fixed_tensors():
    net = teacher_convnet()
    loss = attached(net, TGT, SRC, divisor=7.0).eval()
    g = torch.Generator().manual_seed(1)
    B = 3
    s = {k: torch.randn(B, *v, generator=g) for k, v in TGT.items()}
    t = {k: torch.randn(B, *v, generator=g) * 2 for k, v in SRC.items()}
    t["stage1_pre"][0, 0, 0, 0] = -5.0  # below the margin: lifted to it
    got = loss(t, s, None)
    with torch.no_grad():
        margins = [margin_by_hand(gm, bt) for gm, bt in zip(net.stages[0].bn.weight.tolist(), net.stages[0].bn.bias.tolist())], \
                  [margin_by_hand(gm, bt) for gm, bt in zip(net.stages[1].bn.weight.tolist(), net.stages[1].bn.bias.tolist())]
        conn = [loss.connectors[0](s["stage1_pre"]), loss.connectors[1](s["stage2_pre"])]
        # layer weights 1/2^(L−i−1): 1/2 for stage1, 1 for stage2; then ÷B ÷divisor
        want = (partial_l2_by_hand(conn[0], t["stage1_pre"], torch.tensor(margins[0]), 0.5)
                + partial_l2_by_hand(conn[1], t["stage2_pre"], torch.tensor(margins[1]), 1.0)) / B / 7.0
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert bool(loss.margins_ready)  # taken at the first call


def test_connector_is_conv1x1_without_bias_and_bn_to_teacher_channels():
    torch.manual_seed(0)
    loss = ofd(taps=["stage3_pre"])
    loss.build({"stage3_pre": torch.Size((256, 8, 8))}, {"stage3_pre": torch.Size((64, 8, 8))})
    conv, bn = loss.connectors[0]
    assert conv.kernel_size == (1, 1) and conv.bias is None and (conv.in_channels, conv.out_channels) == (64, 256)
    assert isinstance(bn, torch.nn.BatchNorm2d) and bn.num_features == 256
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)  # He normal, fan-out
    with pytest.raises(ValueError, match="spatial"):
        ofd(taps=["stage3_pre"]).build({"stage3_pre": torch.Size((256, 8, 8))}, {"stage3_pre": torch.Size((64, 4, 4))})
    with pytest.raises(ValueError):
        LOSSES["ofd"].Params.model_validate({"taps": ["stage1_pre"], "source_taps": ["stage1_pre", "stage2_pre"]})


def test_bn_before_each_family():
    r = build_model("resnet14", 3, 10)  # 2 blocks per stage: the last block's bn2
    assert [bn_before(r, f"stage{k}_pre") for k in (1, 2, 3)] == [r.layer1[1].bn2, r.layer2[1].bn2, r.layer3[1].bn2]
    w = build_model("wrn_16_1", 3, 10)  # the next BN, whose output the tap is
    assert [bn_before(w, f"stage{k}_pre") for k in (1, 2, 3)] == [w.block2.layer[0].bn1, w.block3.layer[0].bn1, w.bn1]
    c = build_model("convnet", 1, 10)
    assert bn_before(c, "stage2_pre") is c.stages[1].bn
    # the tap is exactly that BN's output for WRN and convnet; for the ResNet, bn2's output plus the shortcut
    from online_kd.models import TappedModel
    x = torch.randn(2, 3, 8, 8)
    w.eval()
    seen = {}
    h = w.bn1.register_forward_hook(lambda m, a, o: seen.setdefault("bn", o))
    assert torch.equal(TappedModel(w, ["stage3_pre"])(x)["stage3_pre"], seen["bn"])
    h.remove()
    with pytest.raises(ValueError, match="does not declare"):
        bn_before(build_model("vgg8", 3, 10), "stage1_pre")
    with pytest.raises(ValueError, match="no BatchNorm before tap 'stage1'"):
        bn_before(r, "stage1")
    loss = ofd(taps=["stage1_pre"])
    loss.build({"stage1_pre": torch.Size((16, 8, 8))}, {"stage1_pre": torch.Size((8, 8, 8))})
    with pytest.raises(ValueError, match="does not declare"):
        loss.attach(EdgeContext(source_model=build_model("mlp", 1, 10), train_targets=None, num_train=None, num_classes=10))


def quick(**overrides):
    raw = yaml.safe_load((ROOT / "topologies/quick/ofd.yaml").read_text())
    return load_topology(raw, {"train.epochs": 1, "tracking.enabled": False, **overrides})


def test_gradients_reach_the_student_and_connectors_only_and_margins_are_the_teachers():
    topo = quick()
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    teacher = rt.peers["teacher"].net
    with torch.no_grad():  # a teacher BN unlike the initial γ=1, β=0
        for bn in (teacher.stages[0].bn, teacher.stages[1].bn):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
    rt.enter_stage(topo.stages[1])
    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    outs = rt.forward(batch.x, ["teacher", "student"])
    total, terms = rt.peer_losses("student", outs, batch, 0)
    total.backward()
    assert terms["edge/ofd_from_teacher"] > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.peers["student"].net.parameters())
    loss = rt.peers["student"].edges[EDGE]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.connectors.parameters())
    in_opt = {id(p) for g in rt.peers["student"].optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in loss.connectors.parameters())
    assert not any(id(p) in in_opt for p in teacher.parameters())
    for i, bn in enumerate((teacher.stages[0].bn, teacher.stages[1].bn)):
        want = [margin_by_hand(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())]
        assert loss.margins()[i].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_margins_and_connectors_resume_bit_for_bit(tmp_path):
    """Teacher 1 epoch, student 2: stop inside the student stage, after the margins were taken."""
    raw = yaml.safe_load((ROOT / "topologies/quick/ofd.yaml").read_text())
    raw["stages"][0]["epochs"], raw["stages"][1]["epochs"] = 1, 2
    topo = load_topology(raw, {"tracking.enabled": False, "train.max_steps_per_epoch": 6})
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=2)).run()
    mid = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    assert bool(mid["edges"][EDGE]["margins_ready"])
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_student.pt")
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    assert a["edges"][EDGE].keys() == b["edges"][EDGE].keys()
    for k, v in a["edges"][EDGE].items():
        assert torch.equal(v, b["edges"][EDGE][k]), k
    # the margins are the trained teacher's (after stage 1), not its initial γ=1, β=0
    t = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_teacher.pt")["model"]
    for i in (0, 1):
        want = [margin_by_hand(g, bb) for g, bb in zip(t[f"stages.{i}.bn.weight"].tolist(), t[f"stages.{i}.bn.bias"].tolist())]
        assert a["edges"][EDGE][f"margin{i}"].tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert a["edges"][EDGE][f"margin{i}"].tolist() != pytest.approx([-math.sqrt(2 / math.pi)] * len(want))


def test_quick_topology_runs_one_epoch(tmp_path):
    topo = quick()
    summary = LocalEngine(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"] and summary["epochs"] == 2  # teacher stage, then student stage
    import json
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    edge = [r["nodes"]["student"]["edge/ofd_from_teacher"] for r in rows if r.get("stage") == "student"]
    assert edge and all(math.isfinite(v) and v > 0 for v in edge)


@pytest.mark.parametrize("path", ["topologies/cifar100/ofd.yaml", "topologies/quick/ofd.yaml"])
def test_topologies_validate_and_plan(path):
    from online_kd.topology.plan import build_plan

    topo = load_topology(ROOT / path)
    plan = build_plan(topo)
    assert plan is not None
