"""CRD: the NCE by hand (bank and queue), Z on the first batch, the memory update, negative sampling,
who gets which gradient, banks/queues/Z/step surviving a checkpoint, the quick and CIFAR topologies."""
import json
import math
from pathlib import Path

import pytest
import torch

from online_kd.data import Batch, BatchStream, build_data
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.losses import LOSSES, EdgeContext
from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
KEY = "crd:teacher->student"


def crd(ds=5, dt=6, targets=None, **params):
    cls = LOSSES["crd"]
    loss = cls(cls.Params.model_validate(params))
    loss.build({"pool": torch.Size((dt,))}, {"pool": torch.Size((ds,))})
    if targets is not None:
        loss.attach(EdgeContext(None, targets, len(targets), int(targets.max()) + 1))
    return loss


# ------------------------------------------------------------------ by hand, in plain Python
def embed_by_hand(lin, f):
    w, b = lin.weight.tolist(), lin.bias.tolist()
    rows = []
    for x in f.tolist():
        z = [sum(wi * xi for wi, xi in zip(wr, x)) + bi for wr, bi in zip(w, b)]
        n = math.sqrt(sum(v * v for v in z))
        rows.append([v / n for v in z])
    return rows


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def nce_by_hand(P, n, eps=1e-7):
    """ContrastLoss: -(Σ_b log(P+/(P+ + m/n + eps)) + Σ_b Σ_k log((m/n)/(P- + m/n + eps))) / B."""
    m = len(P[0]) - 1
    total = 0.0
    for row in P:
        total += math.log(row[0] / (row[0] + m / n + eps))
        total += sum(math.log((m / n) / (p + m / n + eps)) for p in row[1:])
    return -total / len(P)


@pytest.mark.parametrize("n_data,k", [(8, 3), (40, 2)])  # dense scoring, then the reference's gather
def test_bank_nce_and_memory_update_by_hand(n_data, k):
    torch.manual_seed(0)
    targets = torch.arange(n_data) % 4
    loss = crd(targets=targets, feat_dim=4, nce_k=k, nce_t=0.07, nce_m=0.5)
    f_s, f_t = torch.randn(3, 5), torch.randn(3, 6)
    index = torch.tensor([1, 6, 7])
    cidx = torch.tensor([[1, 2, 3, 4], [6, 0, 1, 3], [7, 0, 4, 5]])[:, : k + 1]
    loss.z.copy_(torch.tensor([2.5, 0.7]))  # Z fixed by hand
    bank_s, bank_t = loss.bank_s.tolist(), loss.bank_t.tolist()
    got = loss.crd(f_s, f_t, index, contrast_idx=cidx)

    v1, v2 = embed_by_hand(loss.embed_s.linear, f_s), embed_by_hand(loss.embed_t.linear, f_t)
    # student anchor v1 against the teacher bank, teacher anchor v2 against the student bank
    P1 = [[math.exp(dot(bank_t[j], v1[b]) / 0.07) / 2.5 for j in cidx[b].tolist()] for b in range(3)]
    P2 = [[math.exp(dot(bank_s[j], v2[b]) / 0.07) / 0.7 for j in cidx[b].tolist()] for b in range(3)]
    want = nce_by_hand(P1, n_data) + nce_by_hand(P2, n_data)
    assert got.item() == pytest.approx(want, rel=1e-4)

    # after scoring: bank[i] ← normalise(0.5·bank[i] + 0.5·v) at the samples' own indices; others untouched
    for bank_before, v, now in ((bank_s, v1, loss.bank_s), (bank_t, v2, loss.bank_t)):
        for b, i in enumerate(index.tolist()):
            mixed = [0.5 * x + 0.5 * y for x, y in zip(bank_before[i], v[b])]
            norm = math.sqrt(sum(x * x for x in mixed))
            assert now[i].tolist() == pytest.approx([x / norm for x in mixed], abs=1e-6)
        untouched = [i for i in range(n_data) if i not in index.tolist()]
        assert torch.equal(now[untouched], torch.tensor(bank_before)[untouched])
    assert int(loss.step) == 1


def test_z_is_set_on_the_first_batch_to_mean_times_n_and_then_frozen():
    torch.manual_seed(1)
    targets = torch.arange(30) % 3
    loss = crd(targets=targets, feat_dim=8, nce_k=6)
    assert loss.z.tolist() == [-1.0, -1.0]
    f_s, f_t, index = torch.randn(4, 5), torch.randn(4, 6), torch.tensor([0, 4, 8, 20])
    cidx = loss.sample_contrast_idx(index)
    bank_s, bank_t = loss.bank_s.clone(), loss.bank_t.clone()
    loss.crd(f_s, f_t, index, contrast_idx=cidx)
    v1, v2 = embed_by_hand(loss.embed_s.linear, f_s), embed_by_hand(loss.embed_t.linear, f_t)
    out1 = [math.exp(dot(bank_t[j].tolist(), v1[b]) / 0.07) for b in range(4) for j in cidx[b].tolist()]
    out2 = [math.exp(dot(bank_s[j].tolist(), v2[b]) / 0.07) for b in range(4) for j in cidx[b].tolist()]
    assert loss.z[0].item() == pytest.approx(sum(out1) / len(out1) * 30, rel=1e-4)
    assert loss.z[1].item() == pytest.approx(sum(out2) / len(out2) * 30, rel=1e-4)
    z = loss.z.clone()
    loss.crd(torch.randn(4, 5), torch.randn(4, 6), index)
    assert torch.equal(loss.z, z)


def test_banks_start_uniform_in_plus_minus_stdv():
    loss = crd(targets=torch.arange(500) % 10, feat_dim=12, nce_k=10)
    stdv = 1 / math.sqrt(12 / 3)
    for bank in (loss.bank_s, loss.bank_t):
        assert bank.shape == (500, 12)
        assert bank.min() >= -stdv and bank.max() <= stdv and bank.abs().max() > 0.9 * stdv
    assert not torch.equal(loss.bank_s, loss.bank_t)


# ------------------------------------------------------------------ negatives
def test_exact_negatives_are_distinct_other_class_and_reproducible_by_seed_and_step():
    targets = torch.tensor([0, 1, 2, 3] * 25)
    index = torch.tensor([0, 1, 2, 3, 10, 55])
    for sample_on in ("cpu", "device"):  # randperm on a CPU generator / float64 keys + topk (here on the CPU)
        loss = crd(targets=targets, nce_k=60, seed=7, sample_on=sample_on)
        idx = loss.sample_contrast_idx(index)
        assert idx.shape == (6, 61) and torch.equal(idx[:, 0], index)  # exact: the positive is the sample itself
        for row, i in zip(idx, index):
            neg = row[1:]
            assert len(set(neg.tolist())) == 60  # without replacement
            assert (targets[neg] != targets[i]).all()
        assert torch.equal(idx, loss.sample_contrast_idx(index))          # same (seed, step): same draw
        assert not torch.equal(idx, loss.sample_contrast_idx(index, step=1))
        assert torch.equal(idx, crd(targets=targets, nce_k=60, seed=7, sample_on=sample_on).sample_contrast_idx(index))
        assert not torch.equal(idx, crd(targets=targets, nce_k=60, seed=8, sample_on=sample_on).sample_contrast_idx(index))


def test_relax_any_and_replacement_modes():
    targets = torch.tensor([0, 1, 2, 3] * 25)
    index = torch.arange(8)
    relax = crd(targets=targets, nce_k=20, mode="relax").sample_contrast_idx(index)
    assert (targets[relax[:, 0]] == targets[index]).all()        # a same-class sample is the positive
    assert (targets[relax[:, 1:]] != targets[index][:, None]).all()
    anyidx = crd(targets=targets, nce_k=500, negatives="any").sample_contrast_idx(index)
    assert anyidx.shape == (8, 501) and anyidx.min() >= 0 and anyidx.max() < 100
    assert (targets[anyidx[:, 1:]] == targets[index][:, None]).any()  # uniform over all indices
    rep = crd(targets=targets, nce_k=100, allow_replacement=True).sample_contrast_idx(index)
    assert (targets[rep[:, 1:]] != targets[index][:, None]).all()


def test_k_beyond_the_other_class_samples_is_a_clear_error():
    data = build_data(load_topology(ROOT / "topologies/quick/crd.yaml").config.data, 0)
    counts = torch.bincount(data.train.targets)
    worst = len(data.train) - int(counts.max())  # 1437 - 146 = 1291 on digits
    crd(targets=data.train.targets, nce_k=worst)
    with pytest.raises(ValueError, match=rf"nce_k=16384 exceeds the {worst} samples of other classes"):
        crd(targets=data.train.targets)  # the reference default K=16384 does not fit digits
    with pytest.raises(ValueError, match="queue of 100"):
        crd(queue=True, queue_size=100, nce_k=200)
    with pytest.raises(ValueError, match="needs the training split"):
        crd().attach(EdgeContext(None, None, None, 10))


# ------------------------------------------------------------------ queue
def test_queue_nce_by_hand_fifo_and_class_exclusion():
    torch.manual_seed(2)
    loss = crd(queue=True, queue_size=6, nce_k=2, feat_dim=4)
    assert loss.nce_n == 6
    f_s, f_t = torch.randn(2, 5), torch.randn(2, 6)
    y, index = torch.tensor([1, 2]), torch.tensor([10, 11])
    slots = torch.tensor([[0, 3], [5, 1]])
    loss.z.copy_(torch.tensor([1.5, 0.4]))
    q_s, q_t = loss.queue_s.tolist(), loss.queue_t.tolist()
    got = loss.crd(f_s, f_t, index, y, contrast_idx=slots)
    v1, v2 = embed_by_hand(loss.embed_s.linear, f_s), embed_by_hand(loss.embed_t.linear, f_t)
    # the positive is the other side's current embedding; negatives are queue entries; N = queue_size
    P1 = [[math.exp(dot(v2[b], v1[b]) / 0.07) / 1.5] + [math.exp(dot(q_t[j], v1[b]) / 0.07) / 1.5
                                                          for j in slots[b].tolist()] for b in range(2)]
    P2 = [[math.exp(dot(v1[b], v2[b]) / 0.07) / 0.4] + [math.exp(dot(q_s[j], v2[b]) / 0.07) / 0.4
                                                          for j in slots[b].tolist()] for b in range(2)]
    assert got.item() == pytest.approx(nce_by_hand(P1, 6) + nce_by_hand(P2, 6), rel=1e-4)
    # enqueued at slots 0, 1 (FIFO), with labels and indices
    assert torch.allclose(loss.queue_s[:2], torch.tensor(v1), atol=1e-6)
    assert torch.allclose(loss.queue_t[:2], torch.tensor(v2), atol=1e-6)
    assert loss.queue_label.tolist() == [1, 2, -1, -1, -1, -1] and loss.queue_index[:2].tolist() == [10, 11]
    assert int(loss.queue_ptr) == 2
    for _ in range(2):
        loss.crd(torch.randn(2, 5), torch.randn(2, 6), torch.tensor([12, 13]), torch.tensor([1, 1]))
    assert int(loss.queue_ptr) == 0 and loss.queue_label.tolist() == [1, 2, 1, 1, 1, 1]
    loss.crd(torch.randn(2, 5), torch.randn(2, 6), torch.tensor([14, 15]), torch.tensor([3, 3]))
    assert loss.queue_label.tolist() == [3, 3, 1, 1, 1, 1]  # the oldest two were replaced
    # label 1 has 4 entries, others 2: a class-1 sample draws its K=2 negatives from the two class-3 slots
    for step in range(5):
        s = loss.sample_queue_idx(torch.tensor([99]), torch.tensor([1]), step=step)
        assert sorted(s[0].tolist()) == [0, 1]
    # a class-3 sample never gets its own previous entry (index 14) while others remain
    s = loss.sample_queue_idx(torch.tensor([14]), torch.tensor([3]), step=0)
    assert set(s[0].tolist()) <= {2, 3, 4, 5}


# ------------------------------------------------------------------ in the engine
def quick(**overrides):
    return load_topology(ROOT / "topologies/quick/crd.yaml",
                         {"tracking.enabled": False, "train.threads": 1, **overrides})


def test_gradients_reach_student_and_both_embeddings_never_the_teacher():
    topo = quick()
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info, train_targets=data.train.targets)
    rt.enter_stage(topo.stages[1])
    edge = rt.peers["student"].edges[KEY]
    assert edge.bank_s.shape == (len(data.train), 32) and edge.params.nce_k == 256
    opt_params = {id(p) for g in rt.peers["student"].optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in edge.parameters())  # both heads in the student's optimizer
    batch = next(iter(BatchStream(data.train, 32, 0).epoch(0)))
    outs = rt.forward(batch.x, ["teacher", "student"])
    total, terms = rt.peer_losses("student", outs, batch, 0)
    assert set(terms) == {"edge/crd_from_teacher", "task", "loss"}
    # γ·CE + β·CRD with γ = 1 (task_weight), β = 0.8 (edge weight)
    assert total.item() == pytest.approx(terms["task"].item() + 0.8 * terms["edge/crd_from_teacher"].item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rt.peers["student"].net.parameters() if p.ndim > 1)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in edge.parameters())
    assert all(p.grad is None for p in rt.peers["teacher"].net.parameters())


@pytest.mark.parametrize("queue", [False, True], ids=["bank", "queue"])
def test_banks_queues_z_and_step_resume_bit_for_bit(tmp_path, queue):
    extra = {"edges[0].queue": True, "edges[0].queue_size": 512} if queue else {}
    # teacher 2 epochs, student 2 epochs; stop after 3 (inside the student stage), resume, compare
    topo = quick(**{"train.epochs": 2, "train.max_steps_per_epoch": 4, **extra})
    whole = LocalEngine(topo, RunOptions(out_dir=tmp_path / "whole", tracking=False, quiet=True)).run()
    LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, stop_after_epochs=3)).run()
    mid = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    again = LocalEngine(topo, RunOptions(out_dir=tmp_path / "split", tracking=False, quiet=True, resume=True)).run()
    assert whole["peers"] == again["peers"]
    a = ckpt.load(ckpt.latest_checkpoint(tmp_path / "whole" / "checkpoints") / "peer_student.pt")
    b = ckpt.load(ckpt.latest_checkpoint(tmp_path / "split" / "checkpoints") / "peer_student.pt")
    ea, eb, em = a["edges"][KEY], b["edges"][KEY], mid["edges"][KEY]
    memory = ["queue_s", "queue_t", "queue_label", "queue_index", "queue_ptr"] if queue else ["bank_s", "bank_t"]
    assert set(memory + ["z", "step", "seed", "embed_s.linear.weight", "embed_t.linear.weight"]) <= set(ea)
    for k, v in ea.items():
        assert torch.equal(v, eb[k]), k
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert int(em["step"]) == 4 and int(ea["step"]) == 8  # the step counter travelled with the checkpoint
    assert (em["z"] > 0).all() and torch.equal(em["z"], ea["z"])  # Z set once, in the first student step
    assert not torch.equal(em[memory[0]], ea[memory[0]])  # the memory moved after the resume


def test_quick_topology_runs_one_epoch(tmp_path):
    summary = LocalEngine(quick(**{"train.epochs": 1}), RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["nodes"]["student"]
    assert math.isfinite(last["edge/crd_from_teacher"]) and last["edge/crd_from_teacher"] > 0


def test_cifar100_topology_at_reference_settings():
    topo = load_topology(ROOT / "topologies/cifar100/crd.yaml")
    (edge,) = topo.edges
    assert (edge.loss, edge.weight, edge.source, edge.target) == ("crd", 0.8, "teacher", "student")
    p = LOSSES["crd"].Params.model_validate(edge.params)
    assert (p.feat_dim, p.nce_k, p.nce_t, p.nce_m, p.mode) == (128, 16384, 0.07, 0.5, "exact")
    assert topo.config.peers["student"].task_weight == 1.0 and topo.config.data.batch_size == 64
    plan = build_plan(topo)  # dry forward on CIFAR shapes; both embeddings see 256-d pooled features
    assert plan.shapes["teacher"]["pool"] == (256,) and plan.shapes["student"]["pool"] == (256,)
