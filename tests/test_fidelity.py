"""Paper-fidelity options (issue 14): rotation and reflect padding, per-step warm-up, a stage handing on its
best epoch, frozen peers' BN in train mode, per-link chain parameters, and the YAMLs that use them."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from online_kd.data import BatchStream, PadCropFlip, build_data
from online_kd.data.augment import rotate
from online_kd.engine import checkpoint as ckpt
from online_kd.build import lr_factor
from online_kd.engine.local import LocalEngine, RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import TopologyError
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick"
CIFAR100 = ROOT / "topologies" / "cifar100"


def quick(name, **overrides):
    return load_topology(yaml.safe_load((QUICK / f"{name}.yaml").read_text()),
                         {"tracking.enabled": False, **overrides})


# ---------------------------------------------------------------- augmentation
def test_rotation_matches_torchvision_rotate_and_rot90():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    for angle in (15.0, -10.0, 7.3):
        want = TF.rotate(x, angle, interpolation=InterpolationMode.NEAREST, fill=fill.tolist())
        assert torch.equal(rotate(x, torch.tensor([angle, angle]), fill), want)
    got = rotate(x, torch.tensor([90.0, 0.0]), fill)
    assert torch.equal(got[0], torch.rot90(x[0], 1, dims=(1, 2))) and torch.equal(got[1], x[1])


def test_pad_crop_flip_rotation_draws_seeded_angles_within_the_range():
    data = build_data(load_topology(QUICK / "dml.yaml").config.data, 0)
    x, _ = data.train.get(torch.arange(64))
    aug = PadCropFlip(5, pad=1, flip=False, fill=data.train.pad_fill, rotation=15)
    angles = aug.angles(torch.arange(64), 3)
    assert angles.abs().max() <= 15 and angles.min() < -5 and angles.max() > 5
    assert torch.equal(angles, aug.angles(torch.arange(64), 3)) and not torch.equal(angles, aug.angles(torch.arange(64), 4))
    plain = PadCropFlip(5, pad=1, flip=False, fill=data.train.pad_fill)
    want = rotate(plain(x, torch.arange(64), 3), angles, data.train.pad_fill)  # rotation after crop (+flip)
    assert torch.equal(aug(x, torch.arange(64), 3), want)


def test_reflect_padding_is_torchvision_reflect_pad_then_crop():
    data = build_data(load_topology(QUICK / "dml.yaml").config.data, 0)
    idx = torch.arange(30)
    x, _ = data.train.get(idx)
    aug = PadCropFlip(2, pad=2, flip=True, fill=data.train.pad_fill, padding_mode="reflect")
    got = aug(x, idx, 1)
    dy, dx, flip = aug.params(idx, 1)
    padded = TF.pad(x, [2, 2, 2, 2], padding_mode="reflect")
    for i in range(len(idx)):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        torch.testing.assert_close(got[i], crop.flip(-1) if flip[i] else crop)
    assert not torch.equal(got, PadCropFlip(2, pad=2, flip=True, fill=data.train.pad_fill)(x, idx, 1))


def test_data_options_reach_the_transform_and_imagefolder_refuses_them(tmp_path):
    cfg = load_topology(QUICK / "dml.yaml", {"data.rotation": 15, "data.padding_mode": "reflect"}).config.data
    t = build_data(cfg, 0).train_transform
    assert (t.rotation, t.padding_mode) == (15.0, "reflect")
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    img = cfg.model_copy(update={"dataset": "imagefolder", "root": str(tmp_path)})
    from online_kd.data import DataError
    with pytest.raises(DataError, match="data.padding_mode: applies to the crop"):
        build_data(img, 0)


# ---------------------------------------------------------------- per-step warm-up
def lrs_per_step(topo, epochs, steps):
    """The student's lr at each optimizer step of the first ``epochs`` epochs (``steps`` per epoch)."""
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[0])
    rt.steps_per_epoch = steps
    stream = BatchStream(data.train, 16, 0, shuffle=True)
    seen = []
    for epoch in range(epochs):
        for i, batch in enumerate(stream.epoch(epoch)):
            if i == steps:
                break
            rt.train_step(batch, epoch, epoch)
            seen.append(rt.peers["student"].optimizer.param_groups[0]["lr"])
        rt.end_epoch()
    return seen


def test_per_step_warmup_is_linear_over_the_first_epochs_iterations():
    topo = quick("label_smoothing", **{"peers.student.schedule": {"name": "multistep", "milestones": [2],
                                                                  "gamma": 0.2, "warmup_epochs": 1,
                                                                  "warmup_per": "step"}})
    lr = 0.05
    got = lrs_per_step(topo, 3, 4)
    want = [lr * 1 / 4, lr * 2 / 4, lr * 3 / 4, lr] + [lr] * 4 + [lr * 0.2] * 4  # WarmUpLR: base·(k+1)/(W·S)
    assert got == pytest.approx(want, rel=1e-12)
    two = quick("label_smoothing", **{"peers.student.schedule": {"name": "constant", "warmup_epochs": 2,
                                                                 "warmup_per": "step"}})
    assert lrs_per_step(two, 3, 2) == pytest.approx([lr * k / 4 for k in (1, 2, 3, 4)] + [lr, lr], rel=1e-12)


def test_per_epoch_warmup_of_one_epoch_is_none_and_per_step_skips_the_epoch_factor():
    sched = load_topology(CIFAR100 / "tfkd_virtual.yaml").config.peers["student"].schedule
    assert sched.warmup_epochs == 1 and sched.warmup_per == "step"
    assert lr_factor(sched, 0, 200) == 1.0  # the per-step warm-up does the first epoch
    per_epoch = sched.model_copy(update={"warmup_per": "epoch"})
    assert lr_factor(per_epoch, 0, 200) == 1.0  # (0+1)/1: what `warmup_epochs: 1` per epoch gives — nothing


# ---------------------------------------------------------------- hand_over: best
def test_note_eval_keeps_the_best_epoch_ties_to_the_later_and_end_stage_loads_it():
    topo = quick("tfkd_self")
    rt = Runtime(topo, build_data(topo.config.data, 0).info)
    rt.enter_stage(topo.stages[0])
    net = rt.peers["teacher"].net
    snapshots = []
    for top1 in (80.0, 70.0, 80.0, 60.0):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        rt.note_eval({"teacher": top1})
    rt.end_stage()
    for k, v in net.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k  # 80 at epoch 2 ties epoch 0: the later one, as Tf-KD's >=
    assert not torch.equal(net.state_dict()["fc.weight"], snapshots[3]["fc.weight"])


def test_stage_hands_its_best_epoch_to_the_next_and_resumes(tmp_path):
    topo = quick("tfkd_self", **{"train.epochs": 3, "train.max_steps_per_epoch": 3,
                                 "peers.teacher.optimizer.lr": 1.0})  # noisy: its last epoch is not its best
    assert topo.stages[0].hand_over == "best" and topo.stages[1].hand_over == "last"
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    teacher = [r["nodes"]["teacher"]["top1"] for r in rows if "top1" in r["nodes"].get("teacher", {})]
    stage1, stage2 = teacher[:3], teacher[3:]
    assert stage1[-1] < max(stage1)
    assert len(stage2) == 3 and all(t == pytest.approx(max(stage1)) for t in stage2)
    assert whole["peers"]["teacher"]["top1_last"] == pytest.approx(max(stage1), abs=1e-3)  # rounded to 4 places
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=2)).run()
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert again["peers"] == whole["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_teacher.pt")
    assert a["best"]["stage"] == "teacher" and a["best"]["top1"] == pytest.approx(max(stage1))
    for k, v in a["best"]["model"].items():
        assert torch.equal(v, a["model"][k]), k


# ---------------------------------------------------------------- bn_mode: train
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_bn_mode_train_uses_batch_statistics_and_updates_running_ones(mode):
    topo = quick("ofd", **{"peers.teacher.bn_mode": mode})
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[1])  # the student's stage: the teacher answers, untrained
    teacher = rt.peers["teacher"].net
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(bn.training == (mode == "train") for bn in bns)
    assert not any(p.requires_grad for p in teacher.parameters())
    before = bns[0].running_mean.clone()
    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    out = rt.forward(batch.x, ["teacher", "student"])["teacher"]["logits"]
    changed = not torch.equal(before, bns[0].running_mean)
    assert changed == (mode == "train")
    with torch.no_grad():
        teacher.eval()
        by_running = teacher(batch.x)
        teacher.train()
        by_batch = teacher(batch.x)
    rt.enter_stage(topo.stages[1])
    assert torch.allclose(out, by_batch if mode == "train" else by_running, atol=1e-5)
    rt.logits_over(BatchStream(data.test, 64, 0, shuffle=False), ["teacher"])  # evaluation: eval mode, then back
    assert all(bn.training == (mode == "train") for bn in bns)


# ---------------------------------------------------------------- chain links
def test_takd_chain_has_per_link_lambda_and_temperature():
    topo = load_topology(CIFAR100 / "takd.yaml")
    (a, b) = topo.edges
    assert (a.source, a.target, a.params) == ("teacher", "assistant", {"reduction": "mean", "alpha": 0.5, "temperature": 5})
    assert (b.source, b.target, b.params) == ("assistant", "student", {"reduction": "mean", "alpha": 0.15, "temperature": 5})
    assert "alpha: 0.5" in topo.to_yaml() and "alpha: 0.15" in topo.to_yaml()


@pytest.mark.parametrize("links, message", [
    ([{"alpha": 0.5}], "edges[0]: 'links' has 1 entries for the 2 links of 'over' (teacher → assistant → student)"),
    ([{"alpha": 0.5}, {"alfa": 0.1}], "edges[0].links[1].alfa: unknown key, did you mean 'alpha'?"),
    ([{"alpha": 0.5}, {"alpha": 2}], "edges[0].links[1].alpha:"),
    ([{"alpha": 0.5}, {"weight": -1}], "edges[0]: links[1].weight: must be a finite number ≥ 0 (got -1)"),
    ([{"alpha": 0.5}, {"to": "teacher"}], "edges[0]: links[1]: 'to' is the whole entry's"),
])
def test_bad_links_name_their_place(links, message):
    raw = yaml.safe_load((QUICK / "takd.yaml").read_text())
    raw["edges"][0]["links"] = links
    with pytest.raises(TopologyError) as err:
        load_topology(raw)
    assert str(err.value).startswith(message)


def test_links_need_a_chain():
    raw = yaml.safe_load((QUICK / "dml.yaml").read_text())
    raw["edges"][0]["links"] = [{"temperature": 2}, {"temperature": 3}]
    with pytest.raises(TopologyError, match="'links' .per-link parameters. needs 'pattern: chain'"):
        load_topology(raw)


def test_link_weight_overrides_the_entrys():
    raw = yaml.safe_load((QUICK / "takd.yaml").read_text())
    raw["edges"][0].update(weight=2.0, links=[{"weight": 0.5}, {}])
    assert [e.weight for e in load_topology(raw).edges] == [0.5, 2.0]


# ---------------------------------------------------------------- the YAMLs
def test_tfkd_family_yamls():
    for name in ("tfkd_self", "tfkd_virtual", "label_smoothing"):
        c = load_topology(CIFAR100 / f"{name}.yaml").config
        assert (c.data.rotation, c.data.padding_mode, c.data.batch_size, c.train.epochs) == (15, "constant", 128, 200)
        for peer in c.peers.values():
            s = peer.schedule
            assert (s.milestones, s.gamma, s.warmup_epochs, s.warmup_per) == ([60, 120, 160], 0.2, 1, "step")
    topo = load_topology(CIFAR100 / "tfkd_self.yaml")
    assert [s.hand_over for s in topo.stages] == ["best", "last"]
    for path in (CIFAR100 / "label_smoothing.yaml", QUICK / "label_smoothing.yaml"):
        (e,) = load_topology(path).edges
        assert (e.source, e.target, e.loss, e.params) == ("student", "student", "label_smoothing",
                                                          {"epsilon": 0.1, "style": "tfkd"})
        assert not load_topology(path).config.virtual


def test_fitnet_default_is_repdistiller_hint_and_two_stage_is_a_variant():
    topo = load_topology(CIFAR100 / "fitnet.yaml")
    (e,) = topo.edges
    (stage,) = topo.stages
    assert (e.loss, e.weight, e.params) == ("fitnet", 100, {"hint": "stage2", "guided": "stage2"})
    assert stage.train == ("student",) and stage.epochs == 240 and stage.task_weight is None
    c = topo.config
    opt, sched = c.peers["student"].optimizer, c.peers["student"].schedule
    assert (c.data.batch_size, opt.lr, opt.weight_decay, sched.milestones) == (64, 0.05, 5.0e-4, [150, 180, 210])
    two = load_topology(CIFAR100 / "fitnet_two_stage.yaml")
    assert [(s.name, s.epochs, s.task_weight) for s in two.stages] == [("hint", 30, 0), ("student", 240, None)]
    assert [s.name for s in load_topology(QUICK / "fitnet.yaml").stages] == ["teacher", "student"]


def test_ofd_runs_the_crd_protocol_with_the_official_padding_and_teacher_bn():
    c = load_topology(CIFAR100 / "ofd.yaml").config
    opt, sched = c.peers["student"].optimizer, c.peers["student"].schedule
    assert (c.data.batch_size, c.train.epochs, opt.lr, opt.momentum, opt.weight_decay) == (64, 240, 0.05, 0.9, 5.0e-4)
    assert sched.milestones == [150, 180, 210] and sched.gamma == 0.1
    assert c.data.padding_mode == "reflect" and c.peers["teacher"].bn_mode == "train" and c.peers["teacher"].frozen
    assert load_topology(CIFAR100 / "reviewkd.yaml").config.peers["teacher"].bn_mode == "train"
    assert load_topology(QUICK / "ofd.yaml").config.peers["teacher"].bn_mode == "train"
