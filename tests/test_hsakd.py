"""HSAKD: the rotation expansion, auxiliary heads, the two losses against their formulas, the step's
anchor rows, gradient ownership, checkpoints, errors, the quick topologies and the ray engine path."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from online_kd.data import BatchStream, build_data
from online_kd.data.expand import EXPANSIONS, Rotation4, build_expansion
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import TopologyError
from online_kd.losses import LOSSES, EdgeContext
from online_kd.models import TappedModel, build_model
from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]


def quick(name, **overrides):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    return load_topology(raw, {"train.threads": 1, **overrides})


def first_batch(topo, size=8):
    data = build_data(topo.config.data, 0)
    return data, next(iter(BatchStream(data.train, size, 0, transform=data.train_transform).epoch(0)))


# ---------------------------------------------------------------------------------------------- expansion
def test_rotation4_interleaves_the_four_rotations_of_each_sample():
    x = torch.arange(3 * 2 * 4 * 4, dtype=torch.float32).view(3, 2, 4, 4)
    got = Rotation4()(x)
    assert got.shape == (12, 2, 4, 4)
    for i in range(3):
        for k in range(4):  # numpy's rot90 on the sample's (H, W) axes: k quarter turns counter-clockwise
            assert np.array_equal(got[4 * i + k].numpy(), np.rot90(x[i].numpy(), k, axes=(1, 2))), (i, k)
    corner = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert Rotation4()(corner)[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # 90°: the right column goes on top


def test_rotation4_labels_and_anchor_rows():
    ex, y = build_expansion("rotation4"), torch.tensor([3, 0, 7])
    assert ex.factor == 4 and ex.rows(3) == 12
    assert ex.joint_labels(y).tolist() == [12, 13, 14, 15, 0, 1, 2, 3, 28, 29, 30, 31]
    assert ex.row_labels(y).tolist() == [3, 3, 3, 3, 0, 0, 0, 0, 7, 7, 7, 7]
    x = torch.randn(3, 1, 5, 5)
    assert torch.equal(ex.anchor(ex(x)), x)  # the unrotated rows are the batch itself
    half = torch.cat([ex(x[:2]), ex(x[2:])])  # shards of the expansion = expansion of the shards
    assert torch.equal(half, ex(x))
    none = build_expansion("none")
    assert none(x) is x and none.anchor(x) is x and torch.equal(none.joint_labels(y), y) and none.rows(3) == 3
    assert set(EXPANSIONS) >= {"none", "rotation4"}


# ---------------------------------------------------------------------------------------------- aux heads
@pytest.mark.parametrize("name,channels,size,heads,width", [
    ("resnet20_aux", 3, 32, 3, 64), ("resnet8x4_aux", 3, 32, 3, 256), ("wrn_16_2_aux", 3, 32, 3, 128),
    ("wrn_40_1_aux", 3, 32, 3, 64), ("convnet_aux", 1, 8, 3, 64), ("convnet_small_aux", 1, 8, 2, 16),
])
def test_aux_heads_shapes(name, channels, size, heads, width):
    net = build_model(name, channels, 10)
    out = TappedModel(net, ["aux", "aux1", f"aux{heads}", "stage1", "pool"])(torch.randn(4, channels, size, size))
    assert out["logits"].shape == (4, 10) and out["pool"].shape == (4, width)
    assert out["aux"].shape == (4, heads, 40) and out["aux1"].shape == (4, 40)
    assert torch.equal(out["aux"][:, heads - 1], out[f"aux{heads}"])
    assert net.auxiliary_classifier.num_heads == heads


def test_aux_branches_copy_the_later_stages_as_the_reference():
    """Key names and shapes of winycg/HSAKD's Auxiliary_Classifier (so its checkpoints load)."""
    sd = {k: tuple(v.shape) for k, v in build_model("resnet56_aux", 3, 100).state_dict().items()}
    assert sd["auxiliary_classifier.block_extractor1.0.0.conv1.weight"] == (32, 16, 3, 3)  # layer2-like, stride 2
    assert sd["auxiliary_classifier.block_extractor1.0.0.downsample.0.weight"] == (32, 16, 1, 1)
    assert sd["auxiliary_classifier.block_extractor1.1.8.conv2.weight"] == (64, 64, 3, 3)  # + layer3-like, 9 blocks
    assert sd["auxiliary_classifier.block_extractor3.0.8.conv2.weight"] == (64, 64, 3, 3)  # extra group, stride 1
    assert "auxiliary_classifier.block_extractor3.0.0.downsample.0.weight" not in sd
    assert sd["auxiliary_classifier.fc3.weight"] == (400, 64) and sd["backbone.fc.weight"] == (100, 64)
    wrn = {k: tuple(v.shape) for k, v in build_model("wrn_40_2_aux", 3, 100).state_dict().items()}
    assert wrn["auxiliary_classifier.block_extractor2.0.layer.5.conv2.weight"] == (128, 128, 3, 3)
    assert wrn["auxiliary_classifier.block_extractor1.0.layer.0.convShortcut.weight"] == (64, 32, 1, 1)
    assert wrn["auxiliary_classifier.bn2.weight"] == (128,) and wrn["auxiliary_classifier.fc1.weight"] == (400, 128)
    count = sum(1 for k in sd if k.startswith("auxiliary_classifier."))
    assert count == 456  # the reference resnet56 Auxiliary_Classifier's state_dict has 456 entries


def test_aux_branches_run_only_when_a_tap_reads_them():
    net = build_model("convnet_aux", 1, 10)
    calls = []
    net.auxiliary_classifier.register_forward_hook(lambda *a: calls.append(1))
    tapped = TappedModel(net, ["stage2"])
    tapped(torch.randn(2, 1, 8, 8))
    net(torch.randn(2, 1, 8, 8))  # e.g. evaluation of the logits
    assert calls == []
    tapped.set_taps(["aux2"])
    tapped(torch.randn(2, 1, 8, 8))
    assert calls == [1]
    logits, aux = net.forward_aux(torch.randn(2, 1, 8, 8))  # whatever the taps
    assert aux.shape == (2, 3, 40) and logits.shape == (2, 10)


@pytest.mark.parametrize("detach", [False, True])
def test_aux_detach_decides_whether_aux_losses_reach_the_backbone(detach):
    torch.manual_seed(0)
    net = build_model("convnet_aux", 1, 10, aux_detach=detach)
    _, aux = net.forward_aux(torch.randn(8, 1, 8, 8))
    aux.sum().backward()  # a loss on the aux heads only
    backbone = [p.grad for p in net.backbone.parameters() if p.ndim > 1]
    heads = [p.grad for p in net.auxiliary_classifier.parameters() if p.ndim > 1]
    assert all(g is not None and g.abs().sum() > 0 for g in heads)
    stages = [p.grad for n, p in net.backbone.named_parameters() if n.startswith("stages.") and p.ndim > 1]
    if detach:
        assert all(g is None for g in stages)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in stages)
    assert net.backbone.fc.weight.grad is None  # the main classifier is not on the aux path
    assert len(backbone) == len(stages) + 1


# ---------------------------------------------------------------------------------------------- losses
def _ctx(num_classes, model=None):
    model = model if model is not None else nn.Linear(1, 1)
    return EdgeContext(source_model=model, train_targets=None, num_train=None, num_classes=num_classes,
                       target_model=model, expansion=Rotation4())


def _loss(name, ctx, source_shapes, target_shapes, **params):
    cls = LOSSES[name]
    loss = cls(cls.Params.model_validate(params))
    loss.build({k: torch.Size(v) for k, v in source_shapes.items()},
               {k: torch.Size(v) for k, v in target_shapes.items()})
    loss.attach(ctx)
    return loss


class _Batch:
    def __init__(self, y):
        self.y = y


def test_hsakd_ce_is_the_sum_over_heads_of_ce_on_joint_labels():
    torch.manual_seed(1)
    C, K, y = 3, 2, torch.tensor([2, 0])
    aux = torch.randn(8, K, 4 * C)
    loss = _loss("hsakd_ce", _ctx(C), {}, {"aux": (K, 4 * C), "logits": (C,)})
    labels = [8, 9, 10, 11, 0, 1, 2, 3]  # 4·class + k, rows interleaved per sample
    expected = 0.0
    for i in range(K):
        z = aux[:, i]
        expected += sum(torch.logsumexp(z[r], 0) - z[r, labels[r]] for r in range(8)) / 8
    got = loss({}, {"aux": aux, "logits": torch.randn(8, C)}, _Batch(y))
    assert got.item() == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("rows,aux_weight,logit_weight", [("all", 1.0, 1.0), ("anchor", 0.5, 2.0)])
def test_hsakd_is_kl_over_joint_classes_per_head_plus_kl_on_logits(rows, aux_weight, logit_weight):
    torch.manual_seed(2)
    C, K, T, R = 3, 3, 3.0, 8
    s_aux, t_aux = torch.randn(R, K, 4 * C), torch.randn(R, K, 4 * C)
    s_z, t_z = torch.randn(R, C), torch.randn(R, C)
    shapes = {"aux": (K, 4 * C), "logits": (C,)}
    loss = _loss("hsakd", _ctx(C), shapes, shapes, temperature=T, logit_rows=rows, aux_weight=aux_weight,
                 logit_weight=logit_weight)

    def kl(s, t):  # Σ_rows Σ_classes q (log q − log p) / rows · T², with p, q softmaxes at T over the whole row
        p, q = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
        return (q * (q.log() - p.log())).sum() / s.shape[0] * T * T

    heads = sum(kl(s_aux[:, i], t_aux[:, i]) for i in range(K))
    zs, zt = (s_z, t_z) if rows == "all" else (s_z[0::4], t_z[0::4])
    expected = aux_weight * heads + logit_weight * kl(zs, zt)
    got = loss({"aux": t_aux, "logits": t_z}, {"aux": s_aux, "logits": s_z}, _Batch(torch.zeros(2, dtype=torch.long)))
    assert got.item() == pytest.approx(float(expected), rel=1e-5)


def test_hsakd_refuses_heads_that_do_not_pair_or_fit_the_joint_labels():
    shapes = {"aux": (3, 12), "logits": (3,)}
    with pytest.raises(ValueError, match="pairs head i with head i"):
        _loss("hsakd", _ctx(3), {"aux": (2, 12), "logits": (3,)}, shapes)
    with pytest.raises(ValueError, match="aux_factor"):
        _loss("hsakd", _ctx(3), {"aux": (3, 6), "logits": (3,)}, {"aux": (3, 6), "logits": (3,)})
    with pytest.raises(ValueError, match="self-edge"):
        ctx = _ctx(3)
        ctx.source_model = nn.Linear(1, 1)  # another network
        _loss("hsakd_ce", ctx, {}, shapes)


# ---------------------------------------------------------------------------------------------- the step
def test_task_ce_and_accuracy_use_the_unrotated_rows_and_edges_see_all_rows():
    topo = quick("hsakd")
    data, batch = first_batch(topo)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[1])
    xs = rt.model_inputs(batch, 0)
    assert xs.shape[0] == 4 * len(batch.y) and torch.equal(xs[0::4], batch.x)
    outs = rt.forward(xs, ["teacher", "student"])
    assert outs["teacher"]["aux"].shape == (32, 3, 40) and outs["student"]["logits"].shape == (32, 10)
    total, terms = rt.peer_losses("student", outs, batch, 0)
    z = outs["student"]["logits"][0::4]
    ce = (torch.logsumexp(z, 1) - z.gather(1, batch.y.view(-1, 1)).squeeze(1)).mean()
    assert terms["task"].item() == pytest.approx(ce.item(), rel=1e-6)
    assert total.item() == pytest.approx((ce + terms["edge/hsakd_from_teacher"]).item(), rel=1e-6)
    res = rt.train_step(batch, 0, 0)
    assert res.count == len(batch.y) and 0 <= int(res.correct["student"]) <= len(batch.y)


def test_online_gradients_stay_with_their_peer_and_reach_its_aux_heads():
    topo = quick("hsakd_online")
    data, batch = first_batch(topo)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[0])
    outs = rt.forward(rt.model_inputs(batch, 0), ["a", "b"])
    total, terms = rt.peer_losses("b", outs, batch, 0)
    assert set(terms) == {"edge/hsakd_ce_from_b", "edge/hsakd_from_a", "task", "loss"}
    total.backward()
    assert all(p.grad is None for p in rt.peers["a"].net.parameters())  # the source never gets gradients
    b = rt.peers["b"].net
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters() if p.ndim > 1)


def test_offline_student_stage_never_touches_the_teacher():
    topo = quick("hsakd")
    data, batch = first_batch(topo)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[1])
    before = {k: v.clone() for k, v in rt.peers["teacher"].net.state_dict().items()}
    rt.train_step(batch, 0, 0)
    assert all(torch.equal(before[k], v) for k, v in rt.peers["teacher"].net.state_dict().items())
    assert all(p.grad is None for p in rt.peers["teacher"].net.parameters())
    heads = rt.peers["student"].net.auxiliary_classifier
    assert all(p.grad is not None for p in heads.parameters())  # the student's heads learn from the teacher's


def test_checkpoint_round_trip_keeps_the_aux_heads(tmp_path):
    topo = quick("hsakd")
    data, batch = first_batch(topo)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[0])
    rt.train_step(batch, 0, 0)
    path = tmp_path / "teacher.pt"
    torch.save(rt.peers["teacher"].state(), path)
    assert any(k.startswith("auxiliary_classifier.") for k in rt.peers["teacher"].state()["model"])
    fresh = Runtime(topo, data.info)
    fresh.peers["teacher"].load_state(ckpt.load(path))
    a, b = rt.peers["teacher"].net.eval(), fresh.peers["teacher"].net.eval()
    x = Rotation4()(batch.x)
    (za, aux_a), (zb, aux_b) = a.forward_aux(x), b.forward_aux(x)
    assert torch.equal(za, zb) and torch.equal(aux_a, aux_b)


# ---------------------------------------------------------------------------------------------- topologies
def test_quick_hsakd_topologies_run(tmp_path):
    for name in ("hsakd", "hsakd_online"):
        topo = quick(name, **{"train.epochs": 1, "train.max_steps_per_epoch": 4})
        summary = LocalEngine(topo, RunOptions(out_dir=tmp_path / name, tracking=False, quiet=True)).run()
        assert summary["finished"], summary
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        terms = {k for line in lines for p in line["nodes"].values() for k in p}
        want = {"hsakd": {"edge/hsakd_ce_from_teacher", "edge/hsakd_from_teacher"},
                "hsakd_online": {"edge/hsakd_ce_from_a", "edge/hsakd_from_a", "edge/hsakd_from_b"}}[name]
        assert {"task", *want} <= terms, terms
        assert all(summary["peers"][p]["top1_last"] > 0 for p in topo.config.peers)


def test_errors_name_their_place():
    def err(name, **overrides):
        with pytest.raises(TopologyError) as e:
            topo = quick(name, **overrides)
            build_plan(topo)
        return e.value

    assert err("hsakd", **{"data.expand": "none"}).place == "edges[0].loss"
    assert "rotation4" in str(err("hsakd", **{"data.expand": "rotate4"}))
    e = err("hsakd", **{"peers.teacher.model": "convnet"})
    assert e.place == "edges[0]" and "convnet_aux" in str(e)
    e = err("hsakd", **{"data.dataset": "synthetic", "data.synthetic.shape": [3, 16, 8]})
    assert e.place == "data.expand" and "square" in str(e)
    topo = quick("hsakd", **{"edges[0].to": "student", "edges[0].from": "teacher"})
    with pytest.raises(TopologyError, match="self-edge"):
        Runtime(topo, build_data(topo.config.data, 0).info)
