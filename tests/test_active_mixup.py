"""Active Mixup with a black-box teacher: the soft CE, the candidate pairs, the λ rule and the ranking against
computations written out here, recorded answers standing in for the teacher, the black-box checks, the quick YAML."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import BatchStream, build_data
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import TopologyError
from online_kd.losses import LOSSES
from online_kd.stages import ProduceContext, ProducedSet, no_progress
from online_kd.stages.active_mixup import rotation_pairs
from online_kd.topology import load_topology
from online_kd.topology.validate import build_stage_kind

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick" / "active_mixup.yaml"
LAMBDAS = [0.30 + 0.04 * k for k in range(11)]


def raw_topology(pool: int = 9, queries: int = 5, **round1) -> dict:
    """Digits; a black-box teacher, students s0 (on the pool) and s1 (on pool + mixes scored by s0)."""
    return {
        "name": "am-test",
        "data": {"dataset": "digits", "batch_size": 8, "augment": "standard"},
        "train": {"epochs": 1, "seed": 0, "max_steps_per_epoch": 2, "device": "cpu"},
        "peers": {"teacher": {"model": "convnet_small", "blackbox": True}, "s0": {"model": "mlp"},
                  "s1": {"model": "mlp"}},
        "edges": [{"from": "teacher", "to": ["s0", "s1"], "loss": "soft_ce"}],
        "stages": [
            {"name": "teacher", "train": ["teacher"]},
            {"name": "pool", "kind": "active_mixup", "teacher": "teacher", "pool": pool},
            {"name": "train0", "train": ["s0"], "data": "pool", "task_weight": 0},
            {"name": "round1", "kind": "active_mixup", "teacher": "teacher", "student": "s0", "grow": "pool",
             "queries": queries, **round1},
            {"name": "train1", "train": ["s1"], "data": "round1", "task_weight": 0},
        ],
        "tracking": {"enabled": False},
    }


@pytest.fixture(scope="module")
def digits():
    topo = load_topology(raw_topology())
    return build_data(topo.config.data, 0)


def runtime(raw, digits):
    topo = load_topology(raw)
    return topo, Runtime(topo, digits.info, "cpu", train_targets=digits.train.targets)


def produce(topo, rt, digits, name, produced, seed=0):
    p = next(p for p in topo.producers if p.name == name)
    ctx = ProduceContext(runtime=rt, data=digits, topology=topo, out_dir=Path("."), seed=seed, produced=produced,
                         progress=no_progress)
    return build_stage_kind(topo, p).run(ctx)


def softmax64(z: torch.Tensor) -> list[float]:
    z = [float(v) for v in z]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------------- soft_ce


def test_soft_ce_matches_the_formula_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 2
    for temperature in (1.0, 2.0):
        loss = LOSSES["soft_ce"](LOSSES["soft_ce"].Params(temperature=temperature))
        probs = torch.softmax(zt, 1)  # what a black box answers: T = 1
        s = zs.clone().requires_grad_(True)
        value = loss({"probs": probs}, {"logits": s}, None)
        expected, grad = 0.0, []
        for b in range(4):  # mean over b of −Σ_c softmax(z_t/T)_c · log softmax(z_s/T)_c, no T²
            p, q = softmax64(zt[b] / temperature), softmax64(zs[b] / temperature)
            expected += -sum(pc * math.log(qc) for pc, qc in zip(p, q)) / 4
            grad.append([(qc - pc) / (4 * temperature) for pc, qc in zip(p, q)])
        assert value.item() == pytest.approx(expected, rel=1e-5)
        value.backward()
        assert torch.allclose(s.grad, torch.tensor(grad, dtype=torch.float32), atol=1e-6)
        assert loss.needs().source == ("probs",)


# ---------------------------------------------------------------------- candidates and the λ rule


def test_rotation_pairs():
    assert rotation_pairs(5).tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 0],
                                          [0, 2], [1, 3], [2, 4], [3, 0], [4, 1]]
    for n in (7, 8):
        pairs = rotation_pairs(n).tolist()
        unordered = {frozenset(p) for p in pairs}
        assert len(unordered) == len(pairs) == n * ((n - 1) // 2)
        # odd n: every pair once; even n: all but the n/2 pairs at distance n/2 (as the reference's rotations)
        missing = {frozenset((i, j)) for i in range(n) for j in range(i + 1, n)} - unordered
        assert missing == ({frozenset((i, i + n // 2)) for i in range(n // 2)} if n % 2 == 0 else set())


def test_pool_round_then_the_least_confident_mixes(digits):
    topo, rt = runtime(raw_topology(pool=9, queries=5), digits)
    pool = produce(topo, rt, digits, "pool", {})
    index = pool.provenance["pool"]
    assert len(set(index.tolist())) == 9 and bool(torch.equal(pool.x, digits.train.get(index)[0]))
    assert pool.recipe["queries"] == pool.recipe["total_queries"] == 9 and rt.queries["teacher"] == 9

    made = produce(topo, rt, digits, "round1", {"pool": pool})
    X, student = pool.x, rt.peers["s0"].net
    assert student.training  # the stage scores in eval mode and gives the mode back
    student.eval()
    rows = []
    with torch.no_grad():
        for r in range(1, 5):          # rotations r = 1..(9−1)/2, pair (x_i, x_{i+r mod 9})
            for i in range(9):
                a, b = i, (i + r) % 9
                top = [max(softmax64(student((lam * X[a] + (1 - lam) * X[b])[None])[0])) for lam in LAMBDAS]
                k = min(range(len(LAMBDAS)), key=lambda j: (top[j], j))   # the least confident λ, first on ties
                rows.append((top[k], len(rows), a, b, LAMBDAS[k]))
    best = sorted(rows)[:5]            # the 5 lowest top probabilities, earlier candidates first on ties
    assert made.provenance["pairs"][9:].tolist() == [[a, b] for _, _, a, b, _ in best]
    assert made.provenance["lambdas"][9:].tolist() == pytest.approx([lam for *_, lam in best], abs=1e-6)
    assert made.recipe["selected_top_prob_max"] == pytest.approx(best[-1][0], abs=1e-5)
    assert made.recipe["candidates"] == 36 and made.recipe["queries"] == 5 and made.recipe["total_queries"] == 14
    assert rt.queries["teacher"] == 14  # 9 pool images + 5 mixes

    teacher = rt.peers["teacher"].net.eval()
    with torch.no_grad():
        for n, (_, _, a, b, lam) in enumerate(best):
            mixed = lam * X[a] + (1 - lam) * X[b]
            assert torch.allclose(made.x[9 + n], mixed, atol=1e-6)
            answer = softmax64(teacher(mixed[None])[0])
            assert made.answers["teacher"][9 + n].tolist() == pytest.approx(answer, abs=1e-5)
            assert int(made.y[9 + n]) == max(range(10), key=lambda c: answer[c])
    assert torch.equal(made.x[:9], pool.x) and torch.equal(made.answers["teacher"][:9], pool.answers["teacher"])


def test_produced_set_is_a_function_of_the_seed(digits):
    topo, rt = runtime(raw_topology(pool=12, queries=6, max_candidates=20), digits)
    pool = produce(topo, rt, digits, "pool", {})
    a = produce(topo, rt, digits, "round1", {"pool": pool}, seed=0)
    b = produce(topo, rt, digits, "round1", {"pool": pool}, seed=0)
    c = produce(topo, rt, digits, "round1", {"pool": pool}, seed=1)
    assert a.recipe == b.recipe and a.recipe["candidates"] == 20
    for k in ("x", "y"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    assert torch.equal(a.answers["teacher"], b.answers["teacher"])
    assert all(torch.equal(a.provenance[k], b.provenance[k]) for k in a.provenance)
    assert not torch.equal(a.provenance["pairs"], c.provenance["pairs"])  # another seed scores other candidates


def test_a_later_round_skips_pairs_already_queried(digits):
    raw = raw_topology(pool=5, queries=4)
    raw["peers"]["s2"] = {"model": "mlp"}
    raw["edges"][0]["to"].append("s2")
    raw["stages"] += [{"name": "round2", "kind": "active_mixup", "teacher": "teacher", "student": "s1",
                       "grow": "round1", "queries": 6},
                      {"name": "train2", "train": ["s2"], "data": "round2", "task_weight": 0}]
    topo, rt = runtime(raw, digits)
    sets = {"pool": produce(topo, rt, digits, "pool", {})}
    sets["round1"] = produce(topo, rt, digits, "round1", sets)
    last = produce(topo, rt, digits, "round2", sets)
    pairs = [frozenset(p) for p in last.provenance["pairs"][5:].tolist()]
    assert sorted(map(sorted, pairs)) == sorted(map(sorted, map(frozenset, rotation_pairs(5).tolist())))  # all 10
    assert last.recipe["total_queries"] == 15 and last.recipe["queries"] == 6 and len(last) == 15


# ---------------------------------------------------------------------- the teacher is not asked again


def test_training_on_the_set_reads_the_recorded_answers(digits):
    topo, rt = runtime(raw_topology(pool=9, queries=7), digits)
    pool = produce(topo, rt, digits, "pool", {})
    made = produce(topo, rt, digits, "round1", {"pool": pool})
    stage = next(s for s in topo.stages if s.name == "train1")
    rt.enter_stage(stage)
    stream = BatchStream(made.dataset(), 8, 0, transform=digits.train_transform, shuffle=True)
    calls = []
    hook = rt.peers["teacher"].net.register_forward_hook(lambda *args: calls.append(1))
    try:
        asked = rt.queries["teacher"]
        rt.use_recorded(stream.dataset.answers)
        for batch in stream.epoch(0):
            with torch.no_grad():
                z = rt.peers["s1"].net(batch.x)  # s1 before this step's update (an MLP: no batch statistics)
            p = made.answers["teacher"][batch.index]
            expected = -(p * torch.log_softmax(z, 1)).sum(1).mean()
            res = rt.train_step(batch, 0, 0)
            assert res.terms["s1"]["edge/soft_ce_from_teacher"].item() == pytest.approx(expected.item(), rel=1e-5)
        assert calls == [] and rt.queries["teacher"] == asked

        rt.use_recorded(None)  # without a record the black box is queried live, and counted
        batch = next(iter(stream.epoch(1)))
        rt.train_step(batch, 1, 1)
        assert len(calls) == 1 and rt.queries["teacher"] == asked + len(batch.y)
    finally:
        hook.remove()


# ---------------------------------------------------------------------- black-box checks


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "online_kd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_cli_refuses_feature_and_logit_edges_from_a_black_box(tmp_path):
    raw = yaml.safe_load(QUICK.read_text())
    raw["edges"] = [{"from": "teacher", "to": "s0", "loss": "kd"},
                    {"from": "teacher", "to": ["s1", "s2"], "loss": "soft_ce"}]
    (tmp_path / "kd.yaml").write_text(yaml.safe_dump(raw))
    raw["edges"][0] = {"from": "teacher", "to": "s0", "loss": "at", "taps": ["stage1", "stage2"]}
    (tmp_path / "at.yaml").write_text(yaml.safe_dump(raw))
    for name, reads in (("kd", "'logits'"), ("at", "'stage1', 'stage2'")):
        r = run_cli("validate", tmp_path / f"{name}.yaml", cwd=tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert lines == [f"error: edges[0].loss: 'teacher' is a black box (peers.teacher.blackbox): only 'probs' may "
                         f"cross its edges, but loss '{name}' reads {reads} (losses that read only probs: soft_ce)"]


def error(raw) -> TopologyError:
    with pytest.raises(TopologyError) as info:
        load_topology(raw)
    return info.value


def test_misuse_is_refused_where_it_is_written():
    raw = raw_topology()
    raw["stages"][4]["train"] = ["s1", "teacher"]
    e = error(raw)
    assert e.place == "stages[4].train[1]" and "answers as one from stage 'pool' on" in e.message

    raw = raw_topology()
    raw["ensembles"] = {"both": {"members": ["s0", "teacher"]}}
    assert error(raw).place == "ensembles.both.members[1]"

    raw = raw_topology()
    raw["peers"]["teacher"]["blackbox"] = False
    e = error(raw)
    assert e.place == "stages[1].teacher" and "set peers.teacher.blackbox: true" in e.message

    raw = raw_topology(queries=40)  # 9 pool images give 36 pairs
    assert error(raw).message.startswith("asks for 40 mixes but only 36 candidate pairs are left")

    raw = raw_topology()
    del raw["stages"][3]["student"]
    assert error(raw).place == "stages[3].student"

    raw = raw_topology()
    raw["stages"][3]["student"] = "s1"  # trained only after round1
    e = error(raw)
    assert e.place == "stages[3].student" and "score the candidates untrained" in e.message

    raw = {"name": "bb", "data": {"dataset": "digits"}, "edges": [{"from": "t", "to": "s", "loss": "soft_ce"}],
           "peers": {"t": {"model": "mlp", "blackbox": True}, "s": {"model": "mlp"}}}
    e = error(raw)  # one implicit stage would train the black box while it answers
    assert e.place == "peers.t" and "freeze it" in e.message


# ---------------------------------------------------------------------- the quick topology


def test_quick_topology_runs(tmp_path):
    overrides = {"train.max_steps_per_epoch": 2, "stages[0].epochs": 1, "stages[2].epochs": 1,
                 "stages[4].epochs": 1, "stages[6].epochs": 1}
    topo = load_topology(QUICK, overrides)
    summary = LocalEngine(topo, RunOptions(out_dir=tmp_path, tracking=False, quiet=True)).run()
    assert summary["finished"] and set(summary["peers"]) == {"teacher", "s0", "s1", "s2"}
    sets = [ProducedSet.load(tmp_path / "produced" / f"{n}.pt") for n in ("pool", "round1", "round2")]
    assert [len(s) for s in sets] == [s.recipe["total_queries"] for s in sets] == [100, 600, 1100]
