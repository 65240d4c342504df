"""Data-free KD: the synthesis objectives against formulas written out here, the synthesize stage
(determinism, recipe, cache, resume), freeze_bn, and the producing-stage mechanism's errors."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from online_kd.data import build_data
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.errors import TopologyError
from online_kd.stages import ProduceContext, ProducedSet, no_progress
from online_kd.stages.objectives import (OBJECTIVES, BNInputHooks, competition_loss, deepinversion_bn_loss,
                                         gaussian_kl_bn_loss, image_l2, total_variation)
from online_kd.stages.synthesize import recipe_key, synthesis_lr, weights_sha256
from online_kd.topology import load_topology
from online_kd.topology.validate import build_stage_kind

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "topologies" / "quick"


# ---------------------------------------------------------------------- the objectives' pieces
def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _stats_by_hand(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), summed out explicitly."""
    count = a.shape[0] * a.shape[2] * a.shape[3]
    mean = a.sum(dim=(0, 2, 3)) / count
    var = ((a - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / count
    return mean, var


def _di_by_hand(mean, var, rm, rv):
    return math.sqrt(float(((rv - var) ** 2).sum())) + math.sqrt(float(((rm - mean) ** 2).sum()))


def _kl_by_hand(mean, var, rm, rv, eps):
    """The Knowledge Within: Σ_c log(σ̃/σ̂) − ½(1 − (σ̂² + (μ̂−μ̃)²)/σ̃²), hat = running, tilde = batch."""
    total = 0.0
    for m_b, v_b, m_r, v_r in zip(mean.tolist(), var.tolist(), rm.tolist(), rv.tolist()):
        s_b, s_r = math.sqrt(v_b + eps), math.sqrt(v_r + eps)
        total += math.log(s_b / s_r) - 0.5 * (1 - (s_r ** 2 + (m_r - m_b) ** 2) / s_b ** 2)
    return total


def _tiny_bn_net() -> nn.Sequential:
    """conv → BN(3) → ReLU → conv → BN(4), with set (non-trivial) running statistics and affine parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with torch.no_grad():
        net[1].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        net[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        net[1].weight.copy_(torch.tensor([1.2, 0.7, -0.4]))
        net[1].bias.copy_(torch.tensor([0.1, -0.3, 0.2]))
        net[4].running_mean.copy_(torch.tensor([-0.5, 0.4, 0.0, 0.9]))
        net[4].running_var.copy_(torch.tensor([0.8, 1.1, 0.3, 2.5]))
    return net.eval()


@pytest.mark.parametrize("objective", ["deepinversion", "bnstats"])
def test_bn_input_hooks_give_each_objective_on_a_tiny_bn_net(objective):
    net = _tiny_bn_net()
    x = torch.randn(5, 2, 4, 4, generator=_gen(1))
    obj = OBJECTIVES[objective](eps=1e-3)
    with BNInputHooks(net, obj.bn_term) as hooks:
        net(x)
        got = hooks.total(first_multiplier=3.0).detach()
    assert not net[1]._forward_hooks and not net[4]._forward_hooks  # removed on exit

    # independently: the inputs of both BN layers, BN in eval written out
    bn1, bn4 = net[1], net[4]
    a1 = F.conv2d(x, net[0].weight, padding=1)
    h = (a1 - bn1.running_mean[None, :, None, None]) / torch.sqrt(bn1.running_var[None, :, None, None] + bn1.eps)
    h = torch.relu(h * bn1.weight[None, :, None, None] + bn1.bias[None, :, None, None])
    a2 = F.conv2d(h, net[3].weight, net[3].bias, padding=1)
    terms = []
    for a, bn in ((a1, bn1), (a2, bn4)):
        mean, var = _stats_by_hand(a.detach())
        rm, rv = bn.running_mean, bn.running_var
        terms.append(_di_by_hand(mean, var, rm, rv) if objective == "deepinversion"
                     else _kl_by_hand(mean, var, rm, rv, 1e-3))
    expected = 3.0 * terms[0] + terms[1]
    assert terms[0] > 0.05 and terms[1] > 0.05
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_deepinversion_term_uses_l2_norms_not_squares():
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0])
    rm, rv = torch.tensor([4.0, 6.0]), torch.tensor([1.0, 13.0])
    # ‖rv − var‖ = 12, ‖rm − mean‖ = 5
    assert float(deepinversion_bn_loss(mean, var, rm, rv)) == pytest.approx(17.0)


def test_gaussian_kl_is_kl_from_the_running_gaussian_to_the_batch_gaussian():
    mean, var = torch.tensor([0.2, -1.0, 0.5]), torch.tensor([0.4, 2.0, 1.0])
    rm, rv = torch.tensor([0.0, 0.3, 0.5]), torch.tensor([1.0, 0.5, 3.0])
    eps = 1e-2
    got = float(gaussian_kl_bn_loss(mean, var, rm, rv, eps))
    assert got == pytest.approx(_kl_by_hand(mean, var, rm, rv, eps), rel=1e-6)
    running = torch.distributions.Normal(rm, torch.sqrt(rv + eps))
    batch = torch.distributions.Normal(mean, torch.sqrt(var + eps))
    assert got == pytest.approx(float(torch.distributions.kl_divergence(running, batch).sum()), rel=1e-6)
    reverse = float(torch.distributions.kl_divergence(batch, running).sum())
    assert abs(got - reverse) > 0.1  # the direction is the paper's, not the other one
    assert float(gaussian_kl_bn_loss(rm, rv, rm, rv, eps)) == pytest.approx(0.0, abs=1e-7)


def test_total_variation_against_pixel_loops():
    x = torch.randn(2, 2, 3, 4, generator=_gen(2))
    n, c, hh, ww = x.shape
    pairs = {  # direction → list of (pixel a, pixel b) with difference a − b, as the reference slices them
        "h": [((i, j), (i, j + 1)) for i in range(hh) for j in range(ww - 1)],
        "v": [((i, j), (i + 1, j)) for i in range(hh - 1) for j in range(ww)],
        "d1": [((i + 1, j), (i, j + 1)) for i in range(hh - 1) for j in range(ww - 1)],
        "d2": [((i, j), (i + 1, j + 1)) for i in range(hh - 1) for j in range(ww - 1)],
    }
    l1 = l2 = 0.0
    for plist in pairs.values():
        diffs = [float(x[b, ch, a[0], a[1]] - x[b, ch, q[0], q[1]]) for b in range(n) for ch in range(c)
                 for a, q in plist]
        l1 += sum(abs(d) for d in diffs) / len(diffs)
        l2 += math.sqrt(sum(d * d for d in diffs))
    got_l1, got_l2 = total_variation(x)
    assert float(got_l1) == pytest.approx(l1, rel=1e-5)
    assert float(got_l2) == pytest.approx(l2, rel=1e-5)


def test_image_l2_of_the_batch_or_mean_per_image():
    x = torch.zeros(2, 1, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 1, 1], x[1, 0, 0, 1] = 3.0, 4.0, 3.0    # per-image norms 3 and 5
    assert float(image_l2(x)) == pytest.approx(math.sqrt(9 + 16 + 9))
    assert float(image_l2(x, per_image=True)) == pytest.approx(4.0)


def _softmax_by_hand(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_competition_term_against_jensen_shannon_written_out():
    zs = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 3.0, -2.0], [9.0, -9.0, 0.0, 1.0]])
    zt = torch.tensor([[-1.0, 2.0, 0.0, 0.3], [0.1, 0.2, 2.5, -1.0], [-9.0, 9.0, 1.0, 0.0]])
    clamp = lambda v: min(max(v, 0.01), 0.99)  # noqa: E731
    js = 0.0
    for rs, rt in zip(zs.tolist(), zt.tolist()):
        p, q = _softmax_by_hand(rs, 3.0), _softmax_by_hand(rt, 3.0)
        m = [clamp(0.5 * (a + b)) for a, b in zip(p, q)]
        p, q = [clamp(v) for v in p], [clamp(v) for v in q]
        js += 0.5 * sum(mi * (math.log(mi) - math.log(pi)) for mi, pi in zip(m, p))
        js += 0.5 * sum(mi * (math.log(mi) - math.log(qi)) for mi, qi in zip(m, q))
    js /= len(zs)
    expected = 1.0 - min(max(js, 0.0), 1.0)
    zs_, zt_ = zs.clone().requires_grad_(), zt.clone().requires_grad_()
    got = competition_loss(zs_, zt_, temperature=3.0)
    assert 0.0 < expected < 1.0
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    got.backward()  # the term pulls on both sides' logits (images get gradient through both nets)
    assert zs_.grad.abs().sum() > 0 and zt_.grad.abs().sum() > 0
    assert float(competition_loss(zt, zt)) == pytest.approx(1.0)  # agreement: nothing to gain


def test_synthesis_lr_constant_warmup_and_the_reference_cosine():
    assert [synthesis_lr(t, 10, 0.2, "constant", 0) for t in (0, 9)] == [0.2, 0.2]
    assert synthesis_lr(0, 10, 0.2, "constant", 4) == pytest.approx(0.05)
    assert synthesis_lr(3, 10, 0.2, "cosine", 4) == pytest.approx(0.2)
    # lr_cosine_policy(base, warmup=4, epochs=10) at epoch 7: ½(1 + cos(π·3/6))·base
    assert synthesis_lr(7, 10, 0.2, "cosine", 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)) * 0.2)


# ---------------------------------------------------------------------- the synthesize stage
def _raw(**synth) -> dict:
    """Digits: a teacher stage, a synthesize stage with ``synth`` on top of tiny settings, a student stage."""
    return {
        "name": "df", "data": {"dataset": "digits", "batch_size": 16}, "train": {"epochs": 1, "seed": 0},
        "peers": {"teacher": {"model": "convnet"}, "student": {"model": "convnet_small"}},
        "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 4, "alpha": 1.0}],
        "stages": [{"name": "teacher", "train": ["teacher"]},
                   {"name": "synth", "kind": "synthesize", "teacher": "teacher", "size": 20, "batch_size": 8,
                    "iters": 3, "lr": 0.1, "jitter": 1, **synth},
                   {"name": "student", "train": ["student"], "data": "synth"}],
    }


@pytest.fixture(scope="module")
def digits():
    topo = load_topology(_raw())
    return build_data(topo.config.data, 0)


def _produce(raw: dict, data, seed: int = 0, rt: Runtime | None = None, log=None) -> tuple[ProducedSet, Runtime]:
    topo = load_topology(raw)
    rt = rt or Runtime(topo, data.info)
    kind = build_stage_kind(topo, topo.producers[0])
    ctx = ProduceContext(runtime=rt, data=data, topology=topo, out_dir=Path("."), seed=seed, produced={},
                         progress=no_progress, log=log or (lambda m: None))
    return kind.run(ctx), rt


def test_synthetic_set_is_a_function_of_the_seed_and_leaves_the_peers_untouched(digits):
    raw = _raw(flip=True, labels="random", competition=0.5, student="student")
    a, rt = _produce(raw, digits)
    teacher, student = rt.peers["teacher"].net, rt.peers["student"].net
    before = {n: copy.deepcopy(p.net.state_dict()) for n, p in rt.peers.items()}
    teacher.train()  # as after its own training stage, and the student not trained yet: both restored after
    student.eval()
    b, _ = _produce(raw, digits, rt=rt)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    c, _ = _produce(raw, digits, seed=1, rt=rt)
    assert not torch.equal(a.x, c.x)
    assert all(m.training for m in teacher.modules()) and not any(m.training for m in student.modules())
    for name, p in rt.peers.items():
        after = p.net.state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in after), name
        assert all(q.grad is None for q in p.net.parameters()), name


def test_produced_set_shape_labels_and_recipe(digits):
    made, rt = _produce(_raw(), digits)
    assert made.x.shape == (20, 1, 8, 8) and made.x.dtype == torch.float32
    assert made.y.dtype == torch.int64 and made.y.tolist() == [i % 10 for i in range(20)]  # cycling targets
    r = made.recipe
    assert r["objective"] == "deepinversion" and r["ce"] == 1.0 and r["size"] == 20 and r["seed"] == 0
    assert r["teacher_sha256"] == weights_sha256(rt.peers["teacher"].net) and r["student_sha256"] is None
    assert r["data"]["shape"] == [1, 8, 8] and r["data"]["num_classes"] == 10
    assert len(r["stats"]["loss_kept"]) == 3  # batches of 8, 8, 4
    assert r["key"] == recipe_key({k: v for k, v in r.items() if k not in ("key", "stats")})
    # bnstats has no label term by default: the labels are the teacher's answers on the kept images
    made, rt = _produce(_raw(objective="bnstats"), digits)
    assert made.recipe["ce"] == 0.0
    with torch.no_grad():
        rt.peers["teacher"].net.eval()
        assert torch.equal(made.y, rt.peers["teacher"].net(made.x).argmax(dim=1))


def test_keep_best_keeps_the_evaluated_iterate_keep_last_the_final_one(digits):
    # with one iteration the only evaluated iterate is the initial noise, whatever the lr
    best_a, _ = _produce(_raw(iters=1, keep="best", lr=0.1), digits)
    best_b, _ = _produce(_raw(iters=1, keep="best", lr=1.0), digits)
    last, _ = _produce(_raw(iters=1, keep="last", lr=0.1), digits)
    assert torch.equal(best_a.x, best_b.x)
    assert not torch.equal(best_a.x, last.x)
    assert float(best_a.x.mean()) == pytest.approx(0.0, abs=0.2) and float(best_a.x.std()) == pytest.approx(1, abs=0.2)


def test_imagenet_style_options_run_and_clip_keeps_the_raw_pixel_range(digits):
    opts = dict(tv_l1=1e-3, l2=1e-4, l2_per_image=True, first_bn_multiplier=10, schedule="cosine", warmup=1,
                betas=[0.5, 0.9], flip=True, keep="last", lr=0.5)
    low, high = (0 - digits.train.mean) / digits.train.std, (1 - digits.train.mean) / digits.train.std
    clipped, _ = _produce(_raw(clip=True, **opts), digits)
    assert float(clipped.x.min()) >= float(low.min()) - 1e-6 and float(clipped.x.max()) <= float(high.max()) + 1e-6
    free, _ = _produce(_raw(clip=False, **opts), digits)
    assert float(free.x.min()) < float(low.min()) or float(free.x.max()) > float(high.max())


def test_cache_reuses_a_set_with_the_same_recipe_and_teacher(digits, tmp_path):
    raw = _raw(cache=str(tmp_path / "cache"))
    logs: list[str] = []
    first, rt = _produce(raw, digits, log=logs.append)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1 and "stored" in logs[-1]
    again, _ = _produce(raw, digits, log=logs.append)
    assert "reused" in logs[-1] and torch.equal(first.x, again.x)
    with torch.no_grad():
        rt.peers["teacher"].net.stages[0].bn.running_mean.add_(0.1)  # another teacher: another set
    other, _ = _produce(raw, digits, rt=rt, log=logs.append)
    assert "stored" in logs[-1] and not torch.equal(first.x, other.x)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


# ---------------------------------------------------------------------- in the engine
def _quick(name: str, **overrides):
    raw = yaml.safe_load((QUICK / f"{name}.yaml").read_text())
    return load_topology(raw, overrides)


TINY = {"stages[0].epochs": 1, "stages[1].size": 48, "stages[1].batch_size": 24, "stages[1].iters": 3,
        "stages[2].epochs": 2, "train.max_steps_per_epoch": 3}


def test_quick_deepinversion_produces_the_set_and_a_resume_reloads_it(tmp_path, capsys):
    out = tmp_path / "run"
    summary = LocalEngine(_quick("deepinversion", **TINY),
                          RunOptions(out_dir=out, tracking=False, quiet=True, stop_after_epochs=2)).run()
    assert not summary["finished"]
    path = out / "produced" / "synth.pt"
    made = ProducedSet.load(path)
    assert made.x.shape == (48, 1, 8, 8) and made.recipe["kind"] == "synthesize" and made.recipe["iters"] == 3
    stamp = path.stat().st_mtime_ns
    capsys.readouterr()
    summary = LocalEngine(_quick("deepinversion", **TINY),
                          RunOptions(out_dir=out, tracking=False, quiet=False, resume=True)).run()
    assert summary["finished"] and summary["peers"]["student"]["top1_last"] > 0
    assert path.stat().st_mtime_ns == stamp
    assert "stage 'synth': reloaded 48 samples" in capsys.readouterr().err


def test_freeze_bn_keeps_the_students_running_statistics_while_its_weights_learn(tmp_path):
    from online_kd.engine import checkpoint as ckpt

    def student_after(freeze: bool):
        extra = {"stages[2].freeze_bn": ["student"]} if freeze else {}
        topo = _quick("deepinversion", **{**TINY, "stages[2].epochs": 1, **extra})
        out = tmp_path / ("frozen" if freeze else "free")
        LocalEngine(topo, RunOptions(out_dir=out, tracking=False, quiet=True)).run()
        return topo, ckpt.load(ckpt.latest_checkpoint(out / "checkpoints") / ckpt.peer_file("student"))["model"]

    topo, frozen = student_after(True)
    init = Runtime(topo, build_data(topo.config.data, 0).info).peers["student"].net.state_dict()
    stats = [k for k in init if "running_" in k or "num_batches_tracked" in k]
    assert stats and all(torch.equal(frozen[k], init[k]) for k in stats)
    assert not torch.equal(frozen["stages.0.conv.weight"], init["stages.0.conv.weight"])
    assert not torch.equal(frozen["stages.0.bn.weight"], init["stages.0.bn.weight"])  # BN affine still learns
    _, free = student_after(False)
    assert not torch.equal(free["stages.0.bn.running_mean"], init["stages.0.bn.running_mean"])


# ---------------------------------------------------------------------- errors
def _cli_validate(*sets: str):
    args = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "online_kd.cli", "validate", str(QUICK / "deepinversion.yaml"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("setting, place", [
    ("stages[1].objective=deepinvert",
     "stages[1].objective: unknown synthesis objective 'deepinvert' (did you mean deepinversion"),
    ("stages[1].competition=0.2", "stages[1].student: the competition term"),
    ("stages[1].teacher=nobody", "stages[1].teacher: unknown peer 'nobody'"),
])
def test_synthesize_mistakes_exit_2_naming_the_place(setting, place):
    r = _cli_validate(setting)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {place}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def _error(raw: dict) -> str:
    with pytest.raises(TopologyError) as info:
        load_topology(raw)
    text = str(info.value)
    assert "\n" not in text and text.startswith(info.value.place + ": ")
    return text


def test_synthesize_checks_in_process():
    raw = _raw()
    raw["peers"]["teacher"]["model"] = "mlp"
    assert _error(raw).startswith("stages[1].teacher: 'teacher' (mlp) has no BatchNorm2d layer")
    raw = _raw()
    raw["stages"][1]["teacher"] = "student"  # trained only after this stage, no init
    assert _error(raw).startswith("stages[1].teacher: 'student' has no 'init' checkpoint")
    assert _error(_raw(competition=0.1, student="teacher")).startswith("stages[1].student: the competing student "
                                                                       "cannot be the teacher")
    assert _error(_raw(labels="sorted")).startswith("stages[1].labels: ")
    assert _error(_raw(sise=3)).startswith("stages[1].sise: unknown key, did you mean 'size'?")


def test_producing_stage_mechanism_errors():
    raw = _raw()
    raw["stages"][1]["kind"] = "synthesise"
    assert _error(raw).startswith("stages[1].kind: unknown stage kind 'synthesise' (did you mean synthesize")
    raw = _raw()
    raw["stages"][2]["data"] = "synthh"
    assert _error(raw).startswith("stages[2].data: unknown producing stage 'synthh'")
    raw = _raw(epochs=3)
    assert _error(raw).startswith("stages[1].epochs: a 'synthesize' stage produces data and trains nothing")
    raw = _raw()
    raw["stages"][2]["freeze_bn"] = ["teacher"]
    assert _error(raw).startswith("stages[2].freeze_bn[0]: 'teacher' is not trained in this stage")
    raw = _raw()
    raw["engine"] = {"name": "ray"}
    assert _error(raw).startswith("stages[1].kind: 'synthesize' stages run on the local engine only")
