"""FitNet and FSP: the formulas by hand, who gets which gradient in the two-stage runs, regressor state
on resume, the quick topologies for one epoch, the CIFAR-100 topologies dry-run."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from online_kd.data import BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES
from online_kd.models import available_taps, build_model
from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]


def make(name, source_shapes, target_shapes, **params):
    cls = LOSSES[name]
    loss = cls(cls.Params.model_validate(params))
    loss.build({k: torch.Size(v) for k, v in source_shapes.items()}, {k: torch.Size(v) for k, v in target_shapes.items()})
    return loss


# ---------------------------------------------------------------------------------------------- FitNet
def regressor_by_hand(reg, x):
    """conv (explicit weights) → BN with this batch's mean and biased variance → ReLU."""
    conv, bn = reg[0], reg[1]
    z = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
    mu = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    z = (z - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return z.clamp(min=0) if len(reg) == 3 else z


@pytest.mark.parametrize("reduction", ["mean", "half_sum"])
def test_fitnet_is_mse_of_the_regressed_student_map(reduction):
    torch.manual_seed(0)
    loss = make("fitnet", {"stage2": (6, 4, 4)}, {"stage2": (3, 4, 4)}, reduction=reduction)
    g = torch.Generator().manual_seed(1)
    f_s, f_t = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 6, 4, 4, generator=g).relu()
    got = loss({"stage2": f_t}, {"stage2": f_s}, None)
    with torch.no_grad():
        r = regressor_by_hand(loss.regressor, f_s)
    total = sum(float(r[b, c, h, w] - f_t[b, c, h, w]) ** 2 for b in range(5) for c in range(6)
                for h in range(4) for w in range(4))
    want = total / (5 * 6 * 4 * 4) if reduction == "mean" else 0.5 * total / 5
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_fitnet_regressor_follows_repdistiller_convreg():
    conv = lambda s, t, **kw: make("fitnet", {"stage2": t}, {"stage2": s}, **kw).regressor  # noqa: E731
    same = conv((16, 8, 8), (32, 8, 8))
    assert same[0].kernel_size == (1, 1) and same[0].out_channels == 32 and isinstance(same[2], torch.nn.ReLU)
    down = conv((16, 8, 8), (32, 4, 4))
    assert down[0].kernel_size == (3, 3) and down[0].stride == (2, 2)
    up = conv((16, 4, 4), (32, 8, 8))
    assert isinstance(up[0], torch.nn.ConvTranspose2d) and up[0].kernel_size == (4, 4)
    valid = conv((16, 7, 7), (32, 4, 4))
    assert valid[0].kernel_size == (4, 4)
    assert len(conv((16, 8, 8), (32, 8, 8), relu=False)) == 2  # conv + BN only (the paper has no ReLU either)
    for s, t in [((16, 8, 8), (32, 8, 8)), ((16, 8, 8), (32, 4, 4)), ((16, 4, 4), (32, 8, 8)), ((16, 7, 7), (32, 4, 4))]:
        out = conv(s, t)(torch.randn(2, *s))
        assert out.shape[1:] == t
    with pytest.raises(ValueError, match="at least as large"):
        conv((16, 3, 3), (32, 8, 8))
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        make("fitnet", {"pool": (32,)}, {"pool": (16,)}, hint="pool", guided="pool")


# ---------------------------------------------------------------------------------------------- FSP
def fsp_by_hand(bottom, top):
    """G[b][j][i] = Σ_hw top[b,j,h,w]·bottom[b,i,h,w] / (H·W), on maps of one size."""
    B, Ci, H, W = bottom.shape
    Cj = top.shape[1]
    return [[[sum(float(top[b, j, h, w] * bottom[b, i, h, w]) for h in range(H) for w in range(W)) / (H * W)
              for i in range(Ci)] for j in range(Cj)] for b in range(B)]


def pool2(x):
    """2×2 average pooling, by slicing."""
    return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]) / 4


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fsp_sums_mse_of_flow_matrices_over_consecutive_taps(reduction):
    shapes = {"stem": (2, 4, 4), "stage1": (3, 4, 4), "stage2": (2, 2, 2)}
    loss = make("fsp", shapes, shapes, taps=["stem", "stage1", "stage2"], reduction=reduction)
    g = torch.Generator().manual_seed(0)
    s = {k: torch.randn(3, *v, generator=g) for k, v in shapes.items()}
    t = {k: torch.randn(3, *v, generator=g) for k, v in shapes.items()}
    got = loss(t, s, None)
    want = 0.0
    # pair 1: stem → stage1 (same size); pair 2: stage1 (pooled to 2×2) → stage2
    for bot, top in [("stem", "stage1"), ("stage1", "stage2")]:
        gs = fsp_by_hand(pool2(s[bot]) if s[bot].shape[2] > s[top].shape[2] else s[bot], s[top])
        gt = fsp_by_hand(pool2(t[bot]) if t[bot].shape[2] > t[top].shape[2] else t[bot], t[top])
        sq = [(a - b) ** 2 for ms, mt in zip(gs, gt) for rs, rt in zip(ms, mt) for a, b in zip(rs, rt)]
        want += sum(sq) / len(sq) if reduction == "mean" else sum(sq) / 3
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert not list(loss.parameters()) and not list(loss.buffers())  # no state to checkpoint


def test_fsp_needs_equal_channels():
    with pytest.raises(ValueError, match="equal channel counts"):
        make("fsp", {"stage1": (16, 8, 8), "stage2": (32, 4, 4)}, {"stage1": (16, 8, 8), "stage2": (16, 4, 4)},
             taps=["stage1", "stage2"])
    with pytest.raises(ValueError):
        LOSSES["fsp"].Params.model_validate({"taps": ["stage1"]})  # one tap makes no pair


def test_resnets_expose_the_stem_tap_repdistiller_fsp_reads():
    for name in ("resnet8x4", "resnet32x4", "resnet8"):
        assert "stem" in available_taps(build_model(name, num_classes=10, in_channels=3))


# ---------------------------------------------------------------------------------------------- engine
def quick(name, **overrides):
    return load_topology(ROOT / f"topologies/quick/{name}.yaml",
                         {"train.epochs": 1, "tracking.enabled": False, "train.threads": 1, **overrides})


def grads(module):
    return [p.grad for p in module.parameters()]


def nonzero(gs):
    return all(g is not None and g.abs().sum() > 0 for g in gs)


def none_or_zero(gs):
    return all(g is None or not g.any() for g in gs)


def one_step(topo, stage_index):
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[stage_index])
    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    outs = rt.forward(batch.x, rt.in_use)
    total, terms = rt.peer_losses("student", outs, batch, 0)
    total.backward()
    return rt, total, terms


def test_hint_stage_trains_only_the_student_up_to_the_guided_tap_and_the_regressor():
    rt, total, terms = one_step(quick("fitnet_two_stage"), 1)
    student, teacher = rt.peers["student"], rt.peers["teacher"]
    assert set(terms) == {"edge/fitnet_from_teacher", "task", "loss"}
    assert total.item() == pytest.approx(100 * terms["edge/fitnet_from_teacher"].item(), rel=1e-6)  # CE × 0
    assert all(g is None for g in grads(teacher.net))  # no gradient crosses the edge
    net = student.net
    assert nonzero(grads(net.stages[0])) and nonzero(grads(net.stages[1]))  # up to the guided tap (stage2)
    assert none_or_zero(grads(net.stages[2])) and none_or_zero(grads(net.fc))  # deeper layers, classifier: none
    assert nonzero(grads(student.edges["fitnet:teacher->student"]))  # the regressor, owned by the student
    reg = {id(p) for p in student.edges["fitnet:teacher->student"].parameters()}
    assert reg <= {id(p) for g in student.optimizer.param_groups for p in g["params"]}


def test_kd_stage_leaves_the_regressor_alone():
    rt, _, terms = one_step(quick("fitnet_two_stage"), 2)
    assert set(terms) == {"edge/kd_from_teacher", "task", "loss"}
    assert all(g is None for g in grads(rt.peers["student"].edges["fitnet:teacher->student"]))
    assert nonzero(grads(rt.peers["student"].net.fc)) and all(g is None for g in grads(rt.peers["teacher"].net))


def test_fsp_stage_reaches_the_student_features_only_then_plain_ce():
    rt, total, terms = one_step(quick("fsp"), 1)
    assert set(terms) == {"edge/fsp_from_teacher", "task", "loss"}
    assert total.item() == pytest.approx(terms["edge/fsp_from_teacher"].item(), rel=1e-6)
    net = rt.peers["student"].net
    assert all(nonzero(grads(s)) for s in net.stages) and none_or_zero(grads(net.fc))
    assert all(g is None for g in grads(rt.peers["teacher"].net))
    rt, total, terms = one_step(quick("fsp"), 2)
    assert set(terms) == {"task", "loss"} and total.item() == pytest.approx(terms["task"].item())


def test_fitnet_regressor_resumes_bit_for_bit_mid_hint_stage(tmp_path):
    topo = quick("fitnet_two_stage", **{"stages[1].epochs": 2})  # teacher 1, hint 2, student 1 epochs; stop inside the hint
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=2)).run()
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["finished"] and again["finished"] and whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_student.pt")
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    edge = a["edges"]["fitnet:teacher->student"]
    assert {"0.weight", "1.running_mean", "1.running_var"} <= {k.split("regressor.")[-1] for k in edge}
    for k, v in edge.items():
        assert torch.equal(v, b["edges"]["fitnet:teacher->student"][k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_quick_fsp_runs_one_epoch_per_stage(tmp_path):
    summary = LocalEngine(quick("fsp"), RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"] and summary["epochs"] == 3 and summary["peers"]["student"]["top1_last"] > 0


@pytest.mark.parametrize("name", ["fitnet_two_stage", "fsp"])
def test_cifar100_topologies_dry_run(name):
    topo = load_topology(ROOT / f"topologies/cifar100/{name}.yaml")
    plan = build_plan(topo)
    assert [s.task_weight for s in topo.stages] == [0, None] and [s.epochs for s in topo.stages] == [30, 240]
    if name == "fsp":
        assert plan.shapes["student"]["stem"] == plan.shapes["teacher"]["stem"]
