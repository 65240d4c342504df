"""CS-KD (class-paired batches, the self-edge) and BSS (boundary-supporting samples): each piece against
the formulas of methods.md §6 and §11 written out here, who gets gradients, the quick topologies, resume,
and the topology errors."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from online_kd.data import build_data
from online_kd.data.samplers import ClassPairedSampler
from online_kd.data.stream import Batch
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.errors import TopologyError
from online_kd.losses import LOSSES, EdgeContext
from online_kd.losses.base import Clock
from online_kd.losses.boundary import bss_attack, sample_target_classes, select_base_samples
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick"


def digits(sampler="random", **data):
    topo = load_topology(QUICK / "cskd.yaml", {"data.sampler": sampler, "edges": [],
                                               **{f"data.{k}": v for k, v in data.items()}})
    return build_data(topo.config.data, 3)


def context(source=None, target=None, clock=None, seed=0) -> EdgeContext:
    return EdgeContext(source_model=source, train_targets=None, num_train=None, num_classes=4,
                       target_model=target, clock=clock or Clock(), seed=seed)


def make_loss(name: str, **params):
    cls = LOSSES[name]
    return cls(cls.Params.model_validate(params))


# ---------------------------------------------------------------------- the class-paired sampler
def test_partners_share_the_class_are_deterministic_and_may_be_the_anchor():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 1, 0])
    s = ClassPairedSampler(targets, seed=5)
    index = torch.arange(len(targets))
    seen = {i: set() for i in range(len(targets))}
    for epoch in range(200):
        p = s.partners(index, epoch)
        assert torch.equal(targets[p], targets)
        assert torch.equal(p, ClassPairedSampler(targets, seed=5).partners(index, epoch))  # a pure function
        for i, j in zip(index.tolist(), p.tolist()):
            seen[i].add(j)
    assert seen[0] == {0, 1, 2, 7} and seen[3] == {3, 4, 6}  # uniform over the whole class, anchor included
    assert seen[5] == {5}                                     # alone in its class: its own partner
    assert not torch.equal(s.partners(index, 0), s.partners(index, 1))
    assert not torch.equal(s.partners(index, 0), ClassPairedSampler(targets, seed=6).partners(index, 0))
    # a partner depends on the anchor's index only, not on its position or batch companions
    assert torch.equal(s.partners(index.flip(0), 3), s.partners(index, 3).flip(0))
    assert torch.equal(s.partners(index[2:5], 3), s.partners(index, 3)[2:5])


@pytest.mark.parametrize("num_shards", [2, 3])
def test_pairs_do_not_depend_on_the_shard_count(num_shards):
    data = digits(sampler="class_paired", batch_size=32)
    whole = list(data.train_stream().epoch(1))[:4]
    shards = [list(data.train_stream(num_shards, r).epoch(1))[:4] for r in range(num_shards)]
    for b, parts in zip(whole, zip(*shards)):
        for field in ("x", "y", "index"):
            assert torch.equal(getattr(b.pair, field), torch.cat([getattr(p.pair, field) for p in parts])), field
        assert torch.equal(b.pair.y, b.y)


def test_partners_are_augmented_by_their_own_index():
    data = digits(sampler="class_paired", batch_size=32)
    sampler = data.train_sampler
    assert isinstance(sampler, ClassPairedSampler)
    b = next(data.train_stream().epoch(2))
    own = sampler.partner_transform(data.train_transform)
    x, y = own.load(data.train, b.pair.index, 2)
    assert torch.equal(b.pair.x, x) and torch.equal(b.pair.y, y)
    k = int(b.pair.index[5])
    assert torch.equal(b.pair.x[5], own.load(data.train, torch.tensor([k]), 2)[0][0])  # alone: the same crop
    # a stream of its own: a partner's crop is not its crop as an anchor, nor the raw image
    as_anchor = data.train_transform.load(data.train, b.pair.index, 2)[0]
    raw = data.train.get(b.pair.index)[0]
    assert not torch.equal(b.pair.x, as_anchor) and not torch.equal(b.pair.x, raw)


def test_random_sampler_gives_no_pair_and_the_same_anchors():
    plain, paired = digits(), digits(sampler="class_paired")
    assert plain.train_sampler is None
    a, b = next(plain.train_stream().epoch(0)), next(paired.train_stream().epoch(0))
    assert a.pair is None and b.pair is not None
    assert torch.equal(a.index, b.index) and torch.equal(a.x, b.x)
    moved = b.to("cpu")
    assert torch.equal(moved.pair.x, b.pair.x) and torch.equal(moved.index, b.index)


# ---------------------------------------------------------------------- CS-KD
def tiny_bn_net(seed=0, d_in=4, classes=3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, classes))


def fixed_batch(n=5, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, xp = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    y = torch.arange(n) % 3
    return Batch(x, y, torch.arange(n), pair=Batch(xp, y, torch.arange(n) + 100))


def test_cskd_is_t2_kl_of_partner_over_anchor_batchmean_and_updates_bn_in_train_mode():
    T = 4.0
    net = tiny_bn_net().train()
    ref = copy.deepcopy(net)
    batch = fixed_batch()
    loss = make_loss("cskd", temperature=T)
    loss.attach(context(source=net, target=net))
    anchor = net(batch.x)
    got = loss({"logits": anchor.detach()}, {"logits": anchor}, batch)

    za, zp = ref(batch.x), ref(batch.pair.x)           # train mode: batch statistics, running stats move
    want = 0.0
    for i in range(5):
        p = [math.exp(v / T) for v in zp[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in za[i].tolist()]
        q = [v / sum(q) for v in q]
        want += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q))
    assert float(got.detach()) == pytest.approx(T * T * want / 5, rel=1e-5)
    bn, bn_ref = net[1], ref[1]  # running statistics: anchor batch, then the partner batch, as the reference
    assert torch.allclose(bn.running_mean, bn_ref.running_mean) and int(bn.num_batches_tracked) == 2

    net.eval()  # a network in eval mode forwards its partners in eval mode (running stats stay)
    before = bn.running_mean.clone()
    anchor = net(batch.x)
    loss({"logits": anchor.detach()}, {"logits": anchor}, batch)
    assert torch.equal(bn.running_mean, before)


def test_cskd_gradient_comes_from_the_anchor_side_only():
    T = 3.0
    net = tiny_bn_net(seed=2).train()
    ref = copy.deepcopy(net)
    batch = fixed_batch(seed=4)
    pair_x = batch.pair.x.clone().requires_grad_(True)
    batch = batch._replace(pair=batch.pair._replace(x=pair_x))
    loss = make_loss("cskd", temperature=T)
    loss.attach(context(source=net, target=net))
    anchor = net(batch.x)
    loss({"logits": anchor.detach()}, {"logits": anchor}, batch).backward()
    assert pair_x.grad is None  # the partner forward builds no graph

    za = ref(batch.x)
    with torch.no_grad():
        p = torch.softmax(ref(batch.pair.x) / T, 1)   # a constant target
    (T * T * (p * (p.log() - torch.log_softmax(za / T, 1))).sum() / 5).backward()
    for (name, a), b in zip(net.named_parameters(), ref.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_cskd_without_a_pair_says_what_to_set():
    net = tiny_bn_net()
    loss = make_loss("cskd")
    loss.attach(context(source=net, target=net))
    batch = fixed_batch()._replace(pair=None)
    z = net(batch.x)
    with pytest.raises(RuntimeError, match="data.sampler: class_paired"):
        loss({"logits": z}, {"logits": z}, batch)


# ---------------------------------------------------------------------- BSS: the pieces
def tiny_net(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)] if bn else [nn.Conv2d(2, 3, 2)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Flatten(), nn.Linear(12, 4))


def attack_one_sample(model, x, target, steps, alpha, lo, hi):
    """The reference attack written for one sample: it moves while its prediction is still the initial one."""
    x = x.clone()
    gt = None
    for _ in range(steps):
        xv = x.clone().requires_grad_(True)
        out = model(xv.unsqueeze(0))[0]
        if gt is None:
            gt = int(out.argmax())
        if int(out.argmax()) != gt:
            break
        (g,) = torch.autograd.grad(out[target] - out[gt], xv)
        gap = float((out[gt] - out[target]).detach())
        x = torch.clamp(x + alpha * (gap + 1e-4) * g / math.sqrt(float((g * g).sum())), lo, hi)
    return x


def test_attack_matches_the_reference_per_sample_with_stop_rule_and_clamp():
    model = tiny_net(0).eval()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 2, 3, 3, generator=g)
    start = model(x).argmax(1)
    target = (start + 1 + torch.arange(6) % 3) % 4
    for steps, alpha, (lo, hi) in ((10, 0.3, (-2.5, 2.5)), (10, 0.5, (-1.0, 1.0)), (1, 0.3, (-2.5, 2.5))):
        got = bss_attack(model, x, target, steps, alpha, (lo, hi))
        want = torch.stack([attack_one_sample(model, x[i], int(target[i]), steps, alpha, lo, hi) for i in range(6)])
        assert torch.allclose(got, want, atol=1e-6), (steps, alpha)
    got = bss_attack(model, x, target, 10, 0.3, (-2.5, 2.5))
    flipped = model(got).argmax(1) != start
    assert flipped.any() and not flipped.all()  # some stop early (the stop rule matters), the others use every step …
    tight = bss_attack(model, x, target, 10, 0.5, (-1.0, 1.0))
    assert tight.abs().max() <= 1.0 and (tight.abs() == 1.0).any()  # … and the clamp binds
    assert all(p.grad is None for p in model.parameters())


def test_base_samples_are_correct_ones_with_the_largest_off_label_gap():
    g = torch.Generator().manual_seed(3)
    zt, zs = torch.randn(8, 4, generator=g) * 3, torch.randn(8, 4, generator=g) * 3
    y = zt.argmax(1).clone()
    y[1] = (y[1] + 1) % 4                         # the teacher is wrong on sample 1
    zs[:, :] = zs.clone()
    zs[2] = -10.0
    zs[2, (y[2] + 1) % 4] = 10.0                  # the student is wrong on sample 2
    for i in (0, 3, 4, 5, 6, 7):                  # and right on the others
        zs[i, y[i]] = zs[i].max() + 0.5
    pt, ps = torch.softmax(zt, 1), torch.softmax(zs, 1)
    score = {i: sum(float(pt[i, c] - ps[i, c]) ** 2 for c in range(4) if c != int(y[i])) for i in range(8)}

    both = [i for i in range(8) if i not in (1, 2)]
    assert sorted(select_base_samples(zt, zs, y, 64, "both").tolist()) == both
    assert sorted(select_base_samples(zt, zs, y, 64, "teacher").tolist()) == sorted(both + [2])
    top3 = sorted(both, key=lambda i: -score[i])[:3]
    assert select_base_samples(zt, zs, y, 3, "both").tolist() == top3


def test_target_classes_follow_the_teachers_softmax_without_its_top_class():
    zt = torch.tensor([[2.0, 0.5, 1.0, -1.0, 0.0]])
    p = torch.softmax(zt, 1)[0].tolist()
    order = sorted(range(5), key=lambda c: -p[c])[1:]           # top-1 (class 0) excluded
    total = sum(p[c] for c in order)

    def by_hand(u):
        run = 0.0
        for c in order:
            run += p[c]
            if run >= u * total:
                return c
        return order[0]

    us = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 0.999999])
    got = sample_target_classes(zt.expand(len(us), 5), us).tolist()
    assert got == [by_hand(float(u)) for u in us]
    grid = (torch.arange(10000, dtype=torch.float64) + 0.5) / 10000
    counts = torch.bincount(sample_target_classes(zt.expand(len(grid), 5), grid), minlength=5).double() / len(grid)
    assert counts[0] == 0
    for c in order:
        assert float(counts[c]) == pytest.approx(p[c] / total, abs=2e-4)


@pytest.mark.parametrize("e0", [0, 1, 30, 38, 59, 60, 79])
def test_decaying_weights_follow_the_reference_counting_epochs_from_1(e0):
    E = 80
    loss = make_loss("bss")
    loss.attach(context(source=tiny_net(0), target=tiny_net(1), clock=Clock(epoch_in_stage=e0, stage_epochs=E)))
    e = e0 + 1
    kd, bss = loss.weights()
    assert kd == pytest.approx(max(3 * (1 - e / E), 0) + 1)
    assert bss == pytest.approx(max(2 * (1 - 4 / 3 * e / E), 0))
    zero_based = make_loss("bss", epoch_base=0)
    zero_based.attach(context(source=tiny_net(0), target=tiny_net(1), clock=Clock(epoch_in_stage=e0, stage_epochs=E)))
    assert zero_based.weights() == pytest.approx((max(3 * (1 - e0 / E), 0) + 1, max(2 * (1 - 4 / 3 * e0 / E), 0)))


# ---------------------------------------------------------------------- BSS: the whole edge
def soft_ce(s, t, T):
    return -(torch.softmax(t / T, 1) * torch.log_softmax(s / T, 1)).sum() / s.shape[0]


def test_bss_value_by_hand_and_only_the_student_learns():
    T = 3.0
    teacher, student = tiny_net(0, bn=True).train(), tiny_net(1, bn=True).train()
    teacher_bn = teacher[1].running_mean.clone()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 2, 3, 3, generator=g)
    with torch.no_grad():
        teacher.eval()
        zt = teacher(x)
        teacher.train()
    y = zt.argmax(1)
    index = torch.arange(10) * 7 + 3
    clock = Clock(epoch=5, epoch_in_stage=2, stage_epochs=20)
    loss = make_loss("bss", temperature=T, attack_size=4)
    loss.attach(context(source=teacher, target=student, clock=clock, seed=9))
    ref_student = copy.deepcopy(student)
    zs = student(x)
    got = loss({"logits": zt}, {"logits": zs}, Batch(x, y, index))

    w_kd, w_bss = 1 + 3 * (1 - 3 / 20), 2 * (1 - 4 / 3 * 3 / 20)
    zs_ref = ref_student(x)
    base = select_base_samples(zt, zs_ref.detach(), y, 4, "both")
    assert 0 < len(base) <= 4
    cls = sample_target_classes(zt[base], loss.uniforms(index[base]))
    teacher.eval()
    adv = torch.stack([attack_one_sample(teacher, x[i], int(c), 10, 0.3, -2.5, 2.5) for i, c in zip(base.tolist(), cls.tolist())])
    with torch.no_grad():
        zt_adv = teacher(adv)
    teacher.train()
    want = w_kd * soft_ce(zs_ref, zt, T) + w_bss * soft_ce(ref_student(adv), zt_adv, T)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)

    got.backward()
    want.backward()
    assert teacher.training and torch.equal(teacher[1].running_mean, teacher_bn)  # attacked in eval mode
    assert all(p.grad is None for p in teacher.parameters())
    for (name, a), b in zip(student.named_parameters(), ref_student.parameters()):
        assert a.grad is not None and torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_bss_draws_depend_on_seed_epoch_and_index_only():
    loss = make_loss("bss")
    clock = Clock(epoch=4)
    loss.attach(context(source=tiny_net(0), target=tiny_net(1), clock=clock, seed=2))
    index = torch.tensor([5, 17, 90, 3])
    u = loss.uniforms(index)
    assert torch.equal(loss.uniforms(index.flip(0)), u.flip(0)) and ((u >= 0) & (u < 1)).all()
    clock.epoch = 5
    assert not torch.equal(loss.uniforms(index), u)


def test_bss_runs_no_attack_once_its_weight_is_zero():
    teacher, student = tiny_net(0).eval(), tiny_net(1).train()
    loss = make_loss("bss", temperature=3.0)
    loss.attach(context(source=teacher, target=student, clock=Clock(epoch_in_stage=60, stage_epochs=80)))
    x = torch.randn(6, 2, 3, 3)
    zt = teacher(x).detach()
    calls = []
    handle = teacher.register_forward_hook(lambda *a: calls.append(1))
    zs = student(x)
    got = loss({"logits": zt}, {"logits": zs}, Batch(x, zt.argmax(1), torch.arange(6)))
    handle.remove()
    assert not calls
    assert float(got.detach()) == pytest.approx(float((1 + 3 * (1 - 61 / 80)) * soft_ce(zs, zt, 3.0).detach()), rel=1e-6)


# ---------------------------------------------------------------------- topologies, engine, errors
def metrics_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_quick_cskd_runs_one_epoch(tmp_path):
    topo = load_topology(QUICK / "cskd.yaml", {"train.epochs": 1, "train.max_steps_per_epoch": 4})
    summary = LocalEngine(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"]
    edge = [r["nodes"]["net"]["edge/cskd_from_net"] for r in metrics_rows(tmp_path) if "nodes" in r]
    assert edge and all(math.isfinite(v) and v > 0 for v in edge)


def test_quick_bss_runs_attacks_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    """Teacher 2 epochs, student 3 (w_bss > 0 in its first two): stop after the student's first epoch."""
    import online_kd.losses.boundary as boundary

    attacked = []
    real = boundary.bss_attack
    monkeypatch.setattr(boundary, "bss_attack", lambda model, x, *a, **k: attacked.append(len(x)) or real(model, x, *a, **k))
    raw = yaml.safe_load((QUICK / "bss.yaml").read_text())
    raw["stages"][0]["epochs"], raw["stages"][1]["epochs"] = 2, 3
    topo = load_topology(raw, {"train.max_steps_per_epoch": 8, "tracking.enabled": False})
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    assert whole["finished"] and len(attacked) >= 4 and all(0 < n <= 16 for n in attacked)
    edge = [r["nodes"]["student"]["edge/bss_from_teacher"] for r in metrics_rows(tmp_path / "whole")
            if r.get("stage") == "student"]
    assert len(edge) == 3 and all(math.isfinite(v) and v > 0 for v in edge)
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=3)).run()
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_student.pt")["model"]
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_topology_errors_name_the_edge_and_the_fix():
    with pytest.raises(TopologyError) as err:
        load_topology(QUICK / "cskd.yaml", {"data.sampler": "random"})
    assert str(err.value).startswith("edges[0].loss: loss 'cskd' (net→net) reads batch.pair")
    assert "set data.sampler: class_paired" in str(err.value)
    with pytest.raises(TopologyError) as err:
        load_topology(QUICK / "bss.yaml", {"engine.name": "ray", "engine.colocate": []})
    assert str(err.value).startswith("edges[0].loss: loss 'bss' reads the network of 'teacher' itself")
    assert "engine.colocate: [[teacher, student]]" in str(err.value)
    load_topology(QUICK / "bss.yaml", {"engine.name": "ray"})  # colocated: fine
    with pytest.raises(TopologyError, match=r"edges\[0\]\.clamp"):
        load_topology(QUICK / "bss.yaml", {"edges[0].clamp": [1, -1]})
    with pytest.raises(TopologyError, match=r"^edges\[0\]\.kd_weight\.start: required"):
        load_topology(QUICK / "bss.yaml", {"edges[0].kd_weight": {"end": 4}})
    with pytest.raises(TopologyError, match=r"^edges\[0\]\.kd_weight\.ned: unknown key"):
        load_topology(QUICK / "bss.yaml", {"edges[0].kd_weight": {"start": 4, "ned": 1}})


@pytest.mark.parametrize("name, overrides, expected", [
    ("cskd", ["data.sampler=random"], "error: edges[0].loss: loss 'cskd' (net→net) reads batch.pair"),
    ("bss", ["engine.name=ray", "engine.colocate=[]"], "error: edges[0].loss: loss 'bss' reads the network of"),
])
def test_cli_exits_2_with_one_line(tmp_path, name, overrides, expected):
    sets = [a for o in overrides for a in ("--set", o)]
    r = subprocess.run([sys.executable, "-m", "online_kd.cli", "validate", QUICK / f"{name}.yaml", *sets],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr
