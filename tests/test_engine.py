"""The local engine: the synchronous step, stages, checkpoints and resume, the divergence guard."""
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import DivergenceError
from online_kd.losses import LOSSES, EdgeLoss, Params, register_loss
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick"


def quick(name, **overrides):
    raw = yaml.safe_load((QUICK / f"{name}.yaml").read_text())
    return load_topology(raw, overrides)


def run(topo, out, **kw):
    kw.setdefault("tracking", False)
    kw.setdefault("quiet", True)
    return LocalEngine(topo, RunOptions(out_dir=Path(out), **kw)).run()


def peer_weights(out_dir, peer):
    path = ckpt.latest_checkpoint(Path(out_dir) / "checkpoints")
    return ckpt.load(path / ckpt.peer_file(peer))


def test_quick_dml_both_peers_above_90(tmp_path):
    summary = run(quick("dml"), tmp_path / "dml")
    for peer in ("a", "b"):
        assert summary["peers"][peer]["top1_last"] > 90.0, summary
    assert (tmp_path / "dml" / "summary.json").is_file()
    assert (tmp_path / "dml" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "dml" / "topology.png").stat().st_size > 1000


def test_resume_continues_bit_for_bit(tmp_path):
    topo = quick("dml", **{"train.epochs": 4})
    whole = run(topo, tmp_path / "whole")
    first = run(topo, tmp_path / "split", stop_after_epochs=2)
    assert first["finished"] is False and first["epochs"] == 2
    second = run(topo, tmp_path / "split", resume=True)
    assert second["finished"] and second["epochs"] == 4
    for peer in ("a", "b"):
        a, b = peer_weights(tmp_path / "whole", peer), peer_weights(tmp_path / "split", peer)
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        assert whole["peers"][peer] == second["peers"][peer]
    hist = [line for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 4  # one line per epoch, none repeated


def test_student_stage_leaves_teacher_untouched_and_in_eval_mode(tmp_path):
    topo = quick("kd", **{"train.epochs": 1})
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    from online_kd.data import BatchStream

    stream = BatchStream(data.train, 64, 0, transform=data.train_transform)
    rt.enter_stage(topo.stages[1])  # trains the student only
    assert not rt.peers["teacher"].net.training and rt.peers["student"].net.training
    before = {k: v.clone() for k, v in rt.peers["teacher"].net.state_dict().items()}
    for i, batch in enumerate(stream.epoch(0)):
        rt.train_step(batch, 0, 0)
        if i == 2:
            break
    after = rt.peers["teacher"].net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included


def test_gradients_reach_target_and_its_edge_modules_never_the_source():
    topo = quick("dml")
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[0])
    from online_kd.data import BatchStream

    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    outs = rt.forward(batch.x, ["a", "b"])
    total, terms = rt.peer_losses("a", outs, batch, 0)
    assert set(terms) == {"edge/kl_from_b", "task", "loss"}
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.peers["a"].net.parameters() if p.ndim > 1)
    assert all(p.grad is None for p in rt.peers["b"].net.parameters())


def test_kd_total_is_one_minus_alpha_ce_plus_alpha_t2_kl():
    topo = quick("kd")
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[1])
    from online_kd.data import BatchStream

    batch = next(iter(BatchStream(data.train, 16, 0).epoch(0)))
    outs = rt.forward(batch.x, ["teacher", "student"])
    total, _ = rt.peer_losses("student", outs, batch, 0)
    s, t, T, a = outs["student"]["logits"], outs["teacher"]["logits"], 4.0, 0.9
    p, q = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    kl = (q * (q.log() - p.log())).sum() / len(s)
    ce = -torch.log_softmax(s, 1).gather(1, batch.y.view(-1, 1)).mean()
    assert total.item() == pytest.approx(((1 - a) * ce + a * T * T * kl).item(), rel=1e-5)


class NaNParams(Params):
    at_step: int = 0


if "test_nan_after" not in LOSSES:
    @register_loss("test_nan_after")
    class NaNAfter(EdgeLoss):
        """Test-only: a real loss that turns NaN from a given global step on."""

        Params = NaNParams

        def __init__(self, params):
            super().__init__(params)
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, source, target, batch):
            self.calls += 1
            value = (target["logits"] - source["logits"]).pow(2).mean()
            return value * float("nan") if int(self.calls) > self.params.at_step else value


def test_divergence_stops_with_step_peer_and_edge_and_keeps_last_good_checkpoint(tmp_path):
    topo = quick("dml", **{"train.epochs": 5})
    steps = 23  # digits: 1437 training samples / 64
    raw = dict(topo.raw)
    raw["edges"] = [{"from": "b", "to": "a", "loss": "test_nan_after", "at_step": 2 * steps + 3}]
    topo = load_topology(raw)
    with pytest.raises(DivergenceError) as err:
        run(topo, tmp_path / "nan")
    e = err.value
    assert (e.epoch, e.peer, e.term) == (2, "a", "edge/test_nan_after_from_b")
    assert "diverged at epoch 3" in str(e) and "peer 'a'" in str(e)  # the third epoch, numbered from 1
    assert f"the last good checkpoint is kept: {tmp_path / 'nan' / 'checkpoints' / 'epoch-0002'}, after epoch 2" in str(e)
    last = ckpt.latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert last.name == "epoch-0002"  # the last good epoch, whole (epochs numbered from 1)
    state = ckpt.load(last / ckpt.ENGINE_FILE)
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt.load(last / "peer_a.pt")["model"].values() if v.is_floating_point())


def test_divergence_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, capsys):
    from online_kd.cli import main

    topo = quick("dml", **{"train.epochs": 2, "train.max_steps_per_epoch": 3})
    raw = dict(topo.raw)
    raw["edges"] = [{"from": "b", "to": "a", "loss": "test_nan_after", "at_step": 1}]
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(raw))
    assert main(["run", str(tmp_path / "nan.yaml"), "--out", str(tmp_path / "nan"), "--no-tracking", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "diverged at epoch 1" in line and "no checkpoint was written before it diverged" in line
    assert "last good checkpoint" not in line
    assert not ckpt.epoch_dirs(tmp_path / "nan" / "checkpoints")


def test_checkpoint_write_is_atomic(tmp_path):
    root = tmp_path / "ck"
    ckpt.write_checkpoint(root, 0, {"peer_a.pt": {"w": torch.ones(3)}})
    with pytest.raises(Exception):
        ckpt.write_checkpoint(root, 1, {"peer_a.pt": {"w": torch.zeros(3)}, "bad.pt": lambda: None})
    last = ckpt.latest_checkpoint(root)
    assert last.name == "epoch-0001"
    assert torch.equal(ckpt.load(last / "peer_a.pt")["w"], torch.ones(3))
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0001", "latest"]  # no half-written leftovers


def test_frozen_teacher_from_init_checkpoint(tmp_path):
    topo = quick("kd", **{"train.epochs": 3})
    first = run(topo, tmp_path / "kd")
    teacher_file = ckpt.latest_checkpoint(tmp_path / "kd" / "checkpoints") / "peer_teacher.pt"
    raw = dict(topo.raw)
    raw["peers"]["teacher"] = {"model": "convnet", "frozen": True, "init": str(teacher_file)}
    raw.pop("stages")
    second = run(load_topology(raw), tmp_path / "kd2")
    assert second["peers"]["teacher"]["role"] == "teacher"
    assert second["peers"]["teacher"]["top1_last"] == first["peers"]["teacher"]["top1_last"]
    assert second["peers"]["student"]["top1_last"] > 15  # chance is 10%


def test_kdcl_linear_refits_on_holdout(tmp_path):
    raw = yaml.safe_load((QUICK / "kdcl.yaml").read_text())
    raw["data"]["holdout"] = 0.1
    raw["ensembles"]["teacher"] = {"members": ["a", "b", "c"], "combine": "linear", "refit_every": 10}
    topo = load_topology(raw, {"train.epochs": 2})
    summary = run(topo, tmp_path / "lin")
    assert "teacher" in summary["ensembles"]
    state = ckpt.load(ckpt.latest_checkpoint(tmp_path / "lin" / "checkpoints") / ckpt.ENGINE_FILE)
    w = state["combiners"]["teacher"]["weights"]
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and not torch.allclose(w, torch.full((3,), 1 / 3))


def test_bf16_precision_runs(tmp_path):
    summary = run(quick("dml", **{"train.epochs": 1, "train.precision": "bf16"}), tmp_path / "bf16")
    assert summary["peers"]["a"]["top1_last"] > 20


def test_virtual_teacher_label_smoothing_runs(tmp_path):
    raw = yaml.safe_load((QUICK / "dml.yaml").read_text())
    raw["peers"] = {"a": raw["peers"]["a"]}
    raw["virtual"] = {"smooth": {"kind": "uniform"}}
    raw["edges"] = [{"from": "smooth", "to": "a", "loss": "kd", "temperature": 1, "alpha": 0.1}]
    summary = run(load_topology(raw, {"train.epochs": 2}), tmp_path / "ls")
    assert summary["peers"]["a"]["top1_last"] > 50


def test_peers_with_views_see_their_own_augmentation_of_the_same_samples():
    topo = quick("kdcl_general")
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.set_views(data.train, data.train_transform)
    from online_kd.data import BatchStream

    batch = next(iter(BatchStream(data.train, 16, 0, transform=data.train_transform).epoch(3)))
    xs = rt.inputs(batch, 3)
    assert torch.equal(xs["a"], batch.x)  # view 0 is the batch itself
    assert not torch.equal(xs["b"], xs["a"]) and not torch.equal(xs["c"], xs["b"])
    raw, _ = data.train.get(batch.index)
    for v in (xs["b"], xs["c"]):  # the same images, shifted by at most one pixel of padding
        assert v.shape == raw.shape
    again = rt.inputs(batch, 3)
    assert all(torch.equal(again[p], xs[p]) for p in xs)  # seeded, not drawn from a global RNG
    assert not torch.equal(rt.inputs(batch, 4)["b"], xs["b"])  # a new draw each epoch


def test_kdcl_general_runs_and_refits(tmp_path):
    summary = run(quick("kdcl_general", **{"train.epochs": 2}), tmp_path / "gen")
    w = ckpt.load(ckpt.latest_checkpoint(tmp_path / "gen" / "checkpoints") / ckpt.ENGINE_FILE)["combiners"]["teacher"]["weights"]
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5) and (w >= 0).all()
    assert not torch.allclose(w, torch.full((3,), 1 / 3))
    assert set(summary["peers"]) == {"a", "b", "c"} and "teacher" in summary["ensembles"]


def test_attention_transfer_gradients_reach_the_student_only_and_quick_runs(tmp_path):
    topo = quick("at", **{"train.epochs": 1})
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[1])
    from online_kd.data import BatchStream

    batch = next(iter(BatchStream(data.train, 16, 0).epoch(0)))
    outs = rt.forward(batch.x, ["teacher", "student"])
    assert {"stage1", "stage2", "stage3"} <= set(outs["student"]) and {"stage3"} <= set(outs["teacher"])
    total, terms = rt.peer_losses("student", outs, batch, 0)
    assert terms["edge/at_from_teacher"] > 0
    total.backward()
    assert all(p.grad is None for p in rt.peers["teacher"].net.parameters())
    assert rt.peers["student"].net.conv1.weight.grad.abs().sum() > 0
    summary = run(topo, tmp_path / "at")
    assert summary["peers"]["student"]["top1_last"] > 10
