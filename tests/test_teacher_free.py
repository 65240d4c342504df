"""Tf-KD (self and virtual teacher), label smoothing and KD-as-initialiser, as topologies.

Each student loss is checked against its formula written out here on one real batch, computed
from the networks' own logits.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from online_kd.data import BatchStream, build_data
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.models import build_model
from online_kd.topology import load_topology

QUICK = Path(__file__).resolve().parents[1] / "topologies" / "quick"


def quick(name, **overrides):
    return load_topology(yaml.safe_load((QUICK / f"{name}.yaml").read_text()), overrides)


def student_loss(topo, stage_index=-1):
    """The student's total loss and logits on the first training batch, with the edges' terms."""
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[stage_index])
    batch = next(BatchStream(data.train, 32, 0, shuffle=True).epoch(0))
    outs = rt.forward(batch.x, list(rt.in_use))
    outs.update(rt.derived(outs, batch.y))
    total, terms = rt.peer_losses("student", outs, batch, 0)
    return total, outs, batch, data.info.num_classes


def test_label_smoothing_is_ce_with_tfkd_smoothed_labels():
    total, outs, batch, c = student_loss(quick("label_smoothing"))
    z, eps = outs["student"]["logits"], 0.1
    # Tf-KD's loss_label_smoothing: 1-ε on the label, ε/(C-1) elsewhere, in place of CE
    q = torch.full((len(batch.y), c), eps / (c - 1))
    q[torch.arange(len(batch.y)), batch.y] = 1 - eps
    expected = -(q * torch.log_softmax(z, 1)).sum() / len(batch.y)
    assert torch.allclose(total, expected, atol=1e-6)
    uniform = student_loss(quick("label_smoothing", **{"edges[0].style": "uniform"}))
    assert torch.allclose(uniform[0], F.cross_entropy(uniform[1]["student"]["logits"], batch.y, label_smoothing=eps),
                          atol=1e-6)


def test_tfkd_virtual_teacher_reference_loss():
    topo = quick("tfkd_virtual")
    total, outs, batch, c = student_loss(topo)
    z = outs["student"]["logits"]
    alpha, mult, temp, correct = 0.1, 100.0, 20.0, 0.99
    pd = torch.full((len(batch.y), c), (1 - correct) / (c - 1))
    pd[torch.arange(len(batch.y)), batch.y] = correct
    q = torch.softmax(pd / temp, dim=1)  # the official code's softmax of a probability vector
    logp = torch.log_softmax(z, dim=1)  # no temperature on the student
    kl_elementwise_mean = (q * (q.log() - logp)).sum() / q.numel()
    expected = (1 - alpha) * F.cross_entropy(z, batch.y) + alpha * mult * kl_elementwise_mean
    assert torch.allclose(total, expected, rtol=1e-5)


def test_tfkd_self_reference_loss_and_fresh_copy():
    topo = quick("tfkd_self")
    total, outs, batch, c = student_loss(topo)
    z, zt = outs["student"]["logits"], outs["teacher"]["logits"]
    alpha, temp, mult = 0.95, 6.0, 50.0
    p_t = torch.softmax(zt / temp, dim=1)
    logp_s = torch.log_softmax(z / temp, dim=1)
    kl_elementwise_mean = (p_t * (p_t.log() - logp_s)).sum() / p_t.numel()
    expected = (1 - alpha) * F.cross_entropy(z, batch.y) + alpha * kl_elementwise_mean * temp ** 2 * mult
    assert torch.allclose(total, expected, rtol=1e-5)
    assert not outs["teacher"]["logits"].requires_grad
    assert topo.config.peers["student"].model == topo.config.peers["teacher"].model
    assert not torch.equal(outs["student"]["logits"], outs["teacher"]["logits"])  # its own initial weights


def test_kd_init_edge_stops_at_until_epoch(tmp_path):
    topo = quick("kd_init", **{"train.epochs": 3, "train.max_steps_per_epoch": 3, "edges[0].until_epoch": 1})
    LocalEngine(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    hist = [yaml.safe_load(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    student = [h["nodes"]["student"] for h in hist if h["stage"] == "student" and "loss" in h["nodes"].get("student", {})]
    assert len(student) == 3
    edge = "edge/kd_from_teacher"
    assert student[0][edge] > 0  # epoch 0 of the stage: KD on
    assert all(edge not in s for s in student[1:])  # from until_epoch on: CE alone (weight 0 builds no term)
    for s in student[1:]:
        assert s["loss"] == pytest.approx(s["task"], rel=1e-6)


@pytest.mark.parametrize("name", ["resnet8_noskip", "resnet20_noskip", "resnet32x4_noskip"])
def test_noskip_resnets_have_no_shortcut(name):
    torch.manual_seed(0)
    net = build_model(name, 3, 10).eval()
    plain = build_model(name.removesuffix("_noskip"), 3, 10)
    assert not any("downsample" in n for n, _ in net.named_parameters())
    # same parameter names otherwise: a residual checkpoint minus its shortcuts loads into the plain net
    names = {n for n, _ in plain.named_parameters() if "downsample" not in n}
    assert names == {n for n, _ in net.named_parameters()}
    block = net.layer2[0]
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    expected = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x))))))
    assert torch.allclose(block(x), expected)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
