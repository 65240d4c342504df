"""SP and RKD: formulas by hand, who gets gradients, resume, the quick topologies."""
import itertools
import math
from pathlib import Path

import pytest
import torch

from online_kd.data import Batch, BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import TopologyError
from online_kd.losses import LOSSES
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]


def make(name, **params):
    cls = LOSSES[name]
    return cls(cls.Params.model_validate(params))


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rows(f):
    """Per-sample features flattened to Python lists."""
    return f.reshape(f.shape[0], -1).tolist()


# ---------------------------------------------------------------- SP
def sp_by_hand(fs, ft):
    def gram(f):  # G_ij = <f_i, f_j>, then each row divided by its L2 norm
        g = [[sum(a * b for a, b in zip(x, y)) for y in f] for x in f]
        return [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in g]

    gs, gt = gram(rows(fs)), gram(rows(ft))
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def test_sp_by_hand_on_maps_of_different_widths():
    fs, ft = rand(5, 3, 2, 2, seed=0).relu(), rand(5, 6, 4, 4, seed=1).relu()
    loss = make("sp")
    assert loss.needs().source == ("stage3",) and loss.needs().target == ("stage3",)
    got = loss({"stage3": ft}, {"stage3": fs}, None)
    assert got.item() == pytest.approx(sp_by_hand(fs, ft), rel=1e-5)


def test_sp_source_tap_and_flat_features():
    fs, ft = rand(4, 7, seed=2), rand(4, 2, 3, 3, seed=3)
    loss = make("sp", tap="pool", source_tap="stage2")
    assert loss.needs().source == ("stage2",) and loss.needs().target == ("pool",)
    got = loss({"stage2": ft}, {"pool": fs}, None)
    assert got.item() == pytest.approx(sp_by_hand(fs, ft), rel=1e-5)


def test_sp_ignores_feature_scale():
    f = rand(6, 4, 2, 2, seed=4)
    assert make("sp")({"stage3": 5 * f}, {"stage3": f}, None).item() == pytest.approx(0, abs=1e-7)


# ---------------------------------------------------------------- RKD
def smooth_l1_mean(a, b):
    d = [abs(x - y) for x, y in zip(a, b)]
    return sum(0.5 * v * v if v < 1 else v - 0.5 for v in d) / len(d)


def rkd_terms_by_hand(fs, ft):
    def dist(f):  # Euclidean distances (diagonal 0), ÷ mean of the off-diagonal ones
        b = len(f)
        d = [[0.0 if i == j else math.sqrt(sum((x - y) ** 2 for x, y in zip(f[i], f[j]))) for j in range(b)]
             for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [d[i][j] / mu for i in range(b) for j in range(b)]

    def angles(f):  # cos of (f_j − f_i, f_k − f_i) over all B³ triplets; a zero vector gives 0
        def unit(v):
            n = math.sqrt(sum(x * x for x in v))
            return [x / n for x in v] if n > 0 else [0.0] * len(v)

        out = []
        for i, j, k in itertools.product(range(len(f)), repeat=3):
            u = unit([a - b for a, b in zip(f[j], f[i])])
            v = unit([a - b for a, b in zip(f[k], f[i])])
            out.append(sum(a * b for a, b in zip(u, v)))
        return out

    s, t = rows(fs), rows(ft)
    return smooth_l1_mean(dist(s), dist(t)), smooth_l1_mean(angles(s), angles(t))


def test_rkd_by_hand_with_repdistiller_weights():
    fs, ft = rand(5, 4, seed=5), rand(5, 7, seed=6) * 3
    loss = make("rkd")
    assert loss.needs().source == ("pool",) and loss.needs().target == ("pool",)
    l_d, l_a = rkd_terms_by_hand(fs, ft)
    assert l_d > 0 and l_a > 0
    got = loss({"pool": ft}, {"pool": fs}, None)
    assert got.item() == pytest.approx(25 * l_d + 50 * l_a, rel=1e-5)


@pytest.mark.parametrize("w_d,w_a", [(1.0, 0.0), (0.0, 2.0)])
def test_rkd_each_term_alone(w_d, w_a):
    fs, ft = rand(6, 2, 2, 2, seed=7), rand(6, 3, seed=8)  # a map is flattened
    l_d, l_a = rkd_terms_by_hand(fs, ft)
    got = make("rkd", w_d=w_d, w_a=w_a)({"pool": ft}, {"pool": fs}, None)
    assert got.item() == pytest.approx(w_d * l_d + w_a * l_a, rel=1e-5)


def test_rkd_ignores_scale_and_handles_a_single_sample():
    f = rand(6, 5, seed=9)
    assert make("rkd")({"pool": 4 * f}, {"pool": f}, None).item() == pytest.approx(0, abs=1e-5)
    one = rand(1, 5, seed=10).requires_grad_(True)
    value = make("rkd")({"pool": rand(1, 5, seed=11)}, {"pool": one}, None)
    assert value.item() == 0 and torch.isfinite(value)
    value.backward()  # still part of the graph: the step's backward does not break


def test_rkd_has_finite_gradients_with_duplicate_samples():
    s = rand(4, 3, seed=12)
    s = torch.cat([s, s[:1]]).requires_grad_(True)  # two identical samples: a zero distance off the diagonal
    make("rkd")({"pool": rand(5, 3, seed=13)}, {"pool": s}, None).backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name,tap", [("sp", "stage3"), ("rkd", "pool")])
def test_computed_in_fp32_under_autocast(name, tap):
    fs, ft = rand(8, 16, 4, 4, seed=14).relu(), rand(8, 32, 4, 4, seed=15).relu()
    loss = make(name, tap=tap)
    want = loss({tap: ft}, {tap: fs}, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss({tap: ft}, {tap: fs}, None)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["sp", "rkd"])
def test_shape_checks_and_no_trainable_state(name):
    loss = make(name, tap="stage2")
    with pytest.raises(ValueError, match="no tap 'stage2'"):
        loss.build({"logits": torch.Size((10,))}, {"stage2": torch.Size((8, 4, 4))})
    loss.build({"stage2": torch.Size((16, 2, 2))}, {"stage2": torch.Size((8, 4, 4))})
    assert list(loss.parameters()) == [] and loss.state_dict() == {}
    with pytest.raises(Exception):
        LOSSES[name].Params.model_validate({"tap": "pool", "beta": 1})  # unknown keys are errors


def test_relational_edges_need_a_network_as_source():
    raw = load_raw("sp")
    raw["ensembles"] = {"ens": {"members": ["teacher"], "combine": "mean"}}
    raw["edges"][0]["from"] = "ens"
    with pytest.raises(TopologyError, match="source of kind peer"):
        load_topology(raw, {"tracking.enabled": False})


# ---------------------------------------------------------------- in a run
def load_raw(method):
    import yaml

    return yaml.safe_load((ROOT / "topologies" / "quick" / f"{method}.yaml").read_text())


def quick(method, **overrides):
    return load_topology(ROOT / "topologies" / "quick" / f"{method}.yaml",
                         {"train.epochs": 1, "tracking.enabled": False, **overrides})


@pytest.mark.parametrize("method", ["sp", "rkd"])
def test_gradients_reach_the_student_only(method):
    topo = quick(method)
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[1])  # the student's stage; the teacher answers frozen
    batch = next(iter(BatchStream(data.train, 16, 0).epoch(0)))
    # the teacher as a trained peer would be (requires_grad on): only the edge's detach keeps it out
    rt.peers["teacher"].net.requires_grad_(True)
    outs = {"teacher": rt.peers["teacher"].tapped(batch.x), "student": rt.peers["student"].tapped(batch.x)}
    total, terms = rt.peer_losses("student", outs, batch, 0)
    assert terms[f"edge/{method}_from_teacher"] > 0
    total.backward(retain_graph=True)
    assert all(p.grad is None for p in rt.peers["teacher"].net.parameters())
    student = list(rt.peers["student"].net.parameters())
    assert all(p.grad is not None for p in student) and any(p.grad.abs().sum() > 0 for p in student)
    assert list(rt.peers["student"].edges.parameters()) == []  # nothing of its own to train
    # the edge alone moves the student's features
    rt.peers["student"].net.zero_grad(set_to_none=True)
    edge = rt.peers["student"].edges[next(iter(rt.peers["student"].edges))]
    edge({k: v.detach() for k, v in outs["teacher"].items()}, outs["student"], batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.peers["student"].net.parameters())


def test_quick_sp_runs_and_resumes_bit_for_bit(tmp_path):
    topo = quick("sp")
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=1)).run()
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_student.pt")
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    assert a["edges"] == b["edges"] == {"sp:teacher->student": {}}  # SP keeps no state
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_quick_rkd_runs_one_epoch(tmp_path):
    summary = LocalEngine(quick("rkd"), RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert set(summary["peers"]) == {"teacher", "student"}
    assert all(math.isfinite(v["top1_last"]) for v in summary["peers"].values())
