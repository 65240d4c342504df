"""Information-flow KD (Passalis et al., CVPR 2020): kernels, conditional probabilities and Jeffreys
by hand; gradient ownership and the critical-period weights in a real Runtime; the quick topology."""
import math
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from online_kd.data import Batch, BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick" / "infoflow.yaml"
EPS = 1e-6


def make(name="infoflow", **params):
    cls = LOSSES[name]
    return cls(cls.Params.model_validate(params))


def fixed(seed, *shape):
    """float64, so the by-hand comparison is exact to 1e-9 (an fp32 run is checked separately)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def batch(n):
    return Batch(x=torch.zeros(n, 1), y=torch.zeros(n, dtype=torch.long), index=torch.arange(n))


# ---------------------------------------------------------------- the formula in plain Python
def cosine_by_hand(rows):
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    unit = [[v / (n + EPS) for v in r] for r, n in zip(rows, norms)]
    return [[(sum(a * b for a, b in zip(u, w)) + 1) / 2 for w in unit] for u in unit]


def student_t_by_hand(rows):
    def dist(a, b):
        d2 = sum(x * x for x in a) + sum(x * x for x in b) - 2 * sum(x * y for x, y in zip(a, b))
        return math.sqrt(max(d2, 0.0) + EPS)

    return [[1 / (1 + dist(a, b)) for b in rows] for a in rows]


def rows_normalised(s):
    return [[v / sum(r) for v in r] for r in s]


def jeffreys_by_hand(p, q):
    n = len(p) * len(p[0])  # mean over all B² entries, diagonal included
    return sum((a - b) * (math.log(a) - math.log(b)) for pr, qr in zip(p, q) for a, b in zip(pr, qr)) / n


def divergence_by_hand(src, tgt, kernel="combined"):
    kernels = {"cosine": [cosine_by_hand], "student_t": [student_t_by_hand],
               "combined": [cosine_by_hand, student_t_by_hand]}[kernel]
    return sum(jeffreys_by_hand(rows_normalised(k(src)), rows_normalised(k(tgt))) for k in kernels)


def avg_pool_by_hand(fmap, k):
    """[C, H, W] nested lists → flattened C·k·k means over (H/k)×(W/k) blocks."""
    out = []
    for ch in fmap:
        h, w = len(ch) // k, len(ch[0]) // k
        for i in range(k):
            for j in range(k):
                block = [ch[i * h + a][j * w + b] for a in range(h) for b in range(w)]
                out.append(sum(block) / len(block))
    return out


# ---------------------------------------------------------------- formula tests
def test_kernel_matrices_and_conditional_probabilities_by_hand():
    from online_kd.losses.infoflow import conditional_probabilities, cosine_similarities, student_t_similarities

    f = fixed(0, 5, 3)
    rows = f.tolist()
    assert cosine_similarities(f).tolist() == [pytest.approx(r, rel=1e-9) for r in cosine_by_hand(rows)]
    assert student_t_similarities(f).tolist() == [pytest.approx(r, rel=1e-9) for r in student_t_by_hand(rows)]
    p = conditional_probabilities(student_t_similarities(f))
    assert p.tolist() == [pytest.approx(r, rel=1e-9) for r in rows_normalised(student_t_by_hand(rows))]
    assert torch.allclose(p.sum(1), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("kernel", ["combined", "cosine", "student_t"])
def test_loss_is_jeffreys_between_conditional_probabilities(kernel):
    s, t = fixed(1, 6, 4), fixed(2, 6, 7)  # heterogeneous: 4-d source, 7-d target features
    got = make(pairs=[["pool", "pool"]], kernel=kernel)({"pool": s}, {"pool": t}, batch(6))
    want = divergence_by_hand(s.tolist(), t.tolist(), kernel)
    assert got.item() == pytest.approx(want, rel=1e-9)
    # fp32 taps (the engine's case): the reference's ‖a‖²+‖b‖²−2ab expansion is noisy near d=0 in fp32
    got32 = make(pairs=[["pool", "pool"]], kernel=kernel)({"pool": s.float()}, {"pool": t.float()}, batch(6))
    assert got32.dtype == torch.float32 and got32.item() == pytest.approx(want, rel=1e-3)
    # bf16 taps (a bf16 run): kernels, logs and the result stay in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got16 = make(pairs=[["pool", "pool"]], kernel=kernel)({"pool": s.bfloat16()}, {"pool": t.bfloat16()}, batch(6))
    assert got16.dtype == torch.float32 and got16.item() == pytest.approx(want, rel=5e-2)


def test_jeffreys_is_symmetric_and_zero_for_equal_features():
    s, t = fixed(3, 6, 4), fixed(4, 6, 4)
    loss = make(pairs=[["pool", "pool"]])
    ab = loss({"pool": s}, {"pool": t}, batch(6))
    ba = loss({"pool": t}, {"pool": s}, batch(6))
    assert ab.item() == pytest.approx(ba.item(), rel=1e-6) and ab.item() > 0
    assert loss({"pool": s}, {"pool": s.clone()}, batch(6)).item() == pytest.approx(0, abs=1e-7)


def test_pairs_pooling_and_pair_weights_by_hand():
    # stage1 maps are average-pooled to 2×2 (4×4 → 2×2 blocks) and flattened; pool taps flattened as is
    s1, t1 = fixed(5, 4, 3, 4, 4).relu(), fixed(6, 4, 2, 4, 4).relu()
    sp, tp = fixed(7, 4, 5), fixed(8, 4, 3)
    loss = make(pairs=[["stage1", "stage1"], ["pool", "pool"]], pool={"stage1": 2}, weights=[3.0, 0.5])
    got = loss({"stage1": s1, "pool": sp}, {"stage1": t1, "pool": tp}, batch(4))
    ps1 = [avg_pool_by_hand(m, 2) for m in s1.tolist()]
    pt1 = [avg_pool_by_hand(m, 2) for m in t1.tolist()]
    want = 3.0 * divergence_by_hand(ps1, pt1) + 0.5 * divergence_by_hand(sp.tolist(), tp.tolist())
    assert got.item() == pytest.approx(want, rel=1e-9)
    # a map not listed in `pool` is flattened whole; the grid never exceeds the map
    whole = make(pairs=[["stage1", "stage1"]], pool={})({"stage1": s1}, {"stage1": t1}, batch(4))
    assert whole.item() == pytest.approx(divergence_by_hand(s1.flatten(1).tolist(), t1.flatten(1).tolist()), rel=1e-9)
    big = make(pairs=[["stage1", "stage1"]], pool={"stage1": 16})({"stage1": s1}, {"stage1": t1}, batch(4))
    assert big.item() == pytest.approx(whole.item(), rel=1e-6)


def test_reference_default_pairs_and_pooling():
    p = LOSSES["infoflow"].Params()
    assert [list(x) for x in p.pairs] == [["stage1", "stage1"], ["stage2", "stage2"], ["stage3", "stage3"], ["pool", "pool"]]
    assert p.pool == {"stage1": 4, "stage2": 4, "stage3": 2} and p.kernel == "combined"
    assert [list(x) for x in LOSSES["infoflow_critical"].Params().pairs] == [["stage1", "stage1"], ["stage2", "stage2"],
                                                                            ["stage3", "stage3"]]
    loss = make(pairs=[["stage2", "stage3"], ["pool", "pool"]])
    assert loss.needs().target == ("stage2", "pool") and loss.needs().source == ("stage3", "pool")
    with pytest.raises(ValidationError):
        make(pairs=[["pool", "pool"]], weights=[1.0, 2.0])
    with pytest.raises(ValidationError):
        make(kernel="rbf")
    taps = {"stage1": torch.Size([4, 8, 8]), "stage2": torch.Size([8, 4, 4]), "stage3": torch.Size([16, 2, 2]),
            "pool": torch.Size([16])}
    make().build(taps, taps)
    with pytest.raises(ValueError, match="source has no tap 'stage3'"):
        make().build({k: v for k, v in taps.items() if k != "stage3"}, taps)


# ---------------------------------------------------------------- in the engine
def quick(**overrides):
    return load_topology(QUICK, {"tracking.enabled": False, **overrides})


def test_gradient_ownership_and_critical_period_weights():
    topo = quick()
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    student_stage = next(s for s in topo.stages if s.name == "student")
    rt.enter_stage(student_stage)
    b = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    outs = rt.forward(b.x, ["aux", "student"])
    for epoch, w in ((0, 100.0), (3, 100.0 * 0.7 ** 3)):
        total, terms = rt.peer_losses("student", outs, b, epoch)
        assert set(terms) == {"edge/infoflow_from_aux", "edge/infoflow_critical_from_aux", "task", "loss"}
        # no CE (stage task_weight 0): last pair × 1 + earlier pairs × 100·0.7^epoch
        want = terms["edge/infoflow_from_aux"] + w * terms["edge/infoflow_critical_from_aux"]
        assert total.item() == pytest.approx(want.item(), rel=1e-9)
    # the critical edge is the three earlier pairs, recomputed here from the taps
    loss = make(pairs=[["stage1", "stage1"], ["stage2", "stage2"], ["stage3", "stage3"]])
    again = loss({k: v.detach() for k, v in outs["aux"].items()}, outs["student"], b)
    assert again.item() == pytest.approx(terms["edge/infoflow_critical_from_aux"].item(), rel=1e-9)
    total.backward()
    student, aux = rt.peers["student"].net, rt.peers["aux"].net
    assert all(p.grad is None for p in aux.parameters())
    convs = [p for n, p in student.named_parameters() if n.startswith("stages") and p.ndim > 1]
    assert convs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in student.fc.parameters())  # no CE → fc idle
    assert not list(rt.peers["student"].edges.parameters())  # the loss owns no modules


def run(topo, out, **kw):
    return LocalEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True, **kw)).run()


def test_quick_topology_runs_one_epoch_per_stage(tmp_path):
    topo = quick(**{"train.epochs": 1, "stages[1].epochs": 1, "stages[3].epochs": 1})
    assert [(s.name, s.epochs, s.task_weight) for s in topo.stages] == [
        ("teacher", 1, None), ("auxiliary", 1, 0), ("student", 1, 0), ("readout", 1, None)]
    summary = run(topo, tmp_path / "one")
    assert summary["finished"] and summary["epochs"] == 4
    assert {"teacher", "aux", "student"} <= set(summary["peers"])


def test_resume_inside_the_student_stage_is_bit_for_bit(tmp_path):
    # the critical-period weight depends on the epoch in the stage: stop after the student stage's
    # first epoch, resume, and match an uninterrupted run (short epochs keep this cheap)
    raw = yaml.safe_load(QUICK.read_text())
    raw["stages"] = raw["stages"][:3]
    over = {"tracking.enabled": False, "train.epochs": 1, "train.max_steps_per_epoch": 3,
            "stages[1].epochs": 1, "stages[2].epochs": 2}
    topo = load_topology(raw, over)
    whole = run(topo, tmp_path / "whole")
    assert whole["finished"] and whole["epochs"] == 4
    assert run(topo, tmp_path / "split", stop_after_epochs=3)["finished"] is False
    assert run(topo, tmp_path / "split", resume=True)["finished"]
    for peer in ("aux", "student"):
        a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / ckpt.peer_file(peer))
        b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / ckpt.peer_file(peer))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (peer, key)
        assert a["edges"] == b["edges"]  # no edge state: the loss owns no modules or buffers
