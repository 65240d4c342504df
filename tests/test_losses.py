"""Each loss, combiner and virtual teacher against its formula written out by hand."""
import math

import pytest
import torch

from online_kd.losses import COMBINERS, LOSSES, VIRTUAL_TEACHERS
from online_kd.data import Batch

B, C = 6, 5


def fixed(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, generator=g) * 3


def make(name, **params):
    cls = LOSSES[name]
    return cls(cls.Params.model_validate(params))


def softmax_rows(z, T=1.0):
    e = [[math.exp(v / T) for v in row] for row in z.tolist()]
    return [[v / sum(row) for v in row] for row in e]


def kl_by_hand(student, teacher, T, divide_by):
    p, q = softmax_rows(student, T), softmax_rows(teacher, T)
    total = sum(qi * (math.log(qi) - math.log(pi)) for prow, qrow in zip(p, q) for pi, qi in zip(prow, qrow))
    return total / divide_by * T * T


def batch(y):
    return Batch(x=torch.zeros(len(y), 1), y=y, index=torch.arange(len(y)))


Y = torch.tensor([0, 1, 2, 3, 4, 0])


def test_kd_matches_hinton_formula():
    s, t = fixed(0), fixed(1)
    loss = make("kd", temperature=4.0, alpha=0.9)
    got = loss({"logits": t}, {"logits": s}, batch(Y))
    # α·T²·KL(softmax(t/T) ‖ softmax(s/T)), summed over classes and samples, ÷B
    assert got.item() == pytest.approx(0.9 * kl_by_hand(s, t, 4.0, B), rel=1e-5)
    assert loss.task_scale == pytest.approx(0.1)  # (1-α)·CE


def test_kd_elementwise_mean_reduction_divides_by_classes_too():
    s, t = fixed(2), fixed(3)
    got = make("kd", temperature=5.0, alpha=0.15, reduction="mean")({"logits": t}, {"logits": s}, batch(Y))
    assert got.item() == pytest.approx(0.15 * kl_by_hand(s, t, 5.0, B * C), rel=1e-5)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kl_dml(T):
    s, t = fixed(4), fixed(5)
    got = make("kl", temperature=T)({"logits": t}, {"logits": s}, batch(Y))
    assert got.item() == pytest.approx(kl_by_hand(s, t, T, B), rel=1e-5)


def test_kl_is_zero_between_equal_outputs():
    s = fixed(6)
    assert make("kl")({"logits": s.clone()}, {"logits": s}, batch(Y)).item() == pytest.approx(0, abs=1e-6)


def test_tfkd_loss_reference_form():
    s = fixed(7)
    q_logits = torch.log(torch.softmax(fixed(8), 1))
    got = make("tfkd", alpha=0.95, multiplier=100.0)({"logits": q_logits}, {"logits": s}, batch(Y))
    # α·m·KLDivLoss(mean)(log_softmax(z), q): student at T=1, no T², ÷(B·C)
    assert got.item() == pytest.approx(0.95 * 100.0 * kl_by_hand(s, fixed(8), 1.0, B * C), rel=1e-5)


def virtual(kind, num_classes=C, **params):
    cls = VIRTUAL_TEACHERS[kind]
    return cls(cls.Params.model_validate(params), num_classes)


def test_uniform_teacher_and_label_smoothing_equivalence():
    out = virtual("uniform")(Y)
    assert torch.allclose(torch.softmax(out["logits"], 1), torch.full((B, C), 1 / C))
    # a kd edge with T=1, α=ε from the uniform teacher gives label smoothing's gradient:
    # (1-ε)·CE + ε·KL(u‖p) = (1-ε)·CE + ε·CE(u, p) - ε·H(u)
    eps = 0.1
    s = fixed(9).requires_grad_(True)
    loss = make("kd", temperature=1.0, alpha=eps)
    ours = loss.task_scale * torch.nn.functional.cross_entropy(s, Y) + loss(out, {"logits": s}, batch(Y))
    g_ours, = torch.autograd.grad(ours, s)
    smoothed = torch.nn.functional.cross_entropy(s, Y, label_smoothing=eps)
    g_ref, = torch.autograd.grad(smoothed, s)
    assert torch.allclose(g_ours, g_ref, atol=1e-6)


def test_tfkd_virtual_teacher_reference_construction():
    out = virtual("tfkd", correct_prob=0.99, temperature=20.0)(Y)
    q = torch.softmax(out["logits"], 1)
    for row, y in zip(q.tolist(), Y.tolist()):
        pd = [0.99 if c == y else 0.01 / (C - 1) for c in range(C)]
        e = [math.exp(v / 20.0) for v in pd]
        assert row == pytest.approx([v / sum(e) for v in e], rel=1e-5)
    paper = torch.softmax(virtual("tfkd", construction="paper")(Y)["logits"], 1)
    assert paper[0, 0].item() == pytest.approx(0.99, rel=1e-5)


def combiner(name, m=3, **params):
    cls = COMBINERS[name]
    return cls(cls.Params.model_validate(params), m)


def test_mean_combiner():
    zs = [fixed(i) for i in range(3)]
    assert torch.allclose(combiner("mean")(zs, Y), (zs[0] + zs[1] + zs[2]) / 3)


def test_naive_picks_lowest_batch_ce():
    zs = [fixed(i) for i in range(3)]
    ces = [torch.nn.functional.cross_entropy(z, Y).item() for z in zs]
    assert torch.equal(combiner("naive")(zs, Y), zs[ces.index(min(ces))])


def test_min_logit_by_hand():
    zs = [fixed(i) for i in range(3)]
    got = combiner("min_logit")(zs, Y)
    for b in range(B):
        for c in range(C):
            want = min(z[b, c].item() - z[b, Y[b]].item() for z in zs)
            assert got[b, c].item() == pytest.approx(want, abs=1e-6)
    assert torch.all(got.gather(1, Y.view(-1, 1)) == 0)


def test_linear_refit_finds_simplex_weights_minimising_ce():
    torch.manual_seed(0)
    n = 200
    y = torch.randint(0, C, (n,))
    good = torch.nn.functional.one_hot(y, C).float() * 4 + torch.randn(n, C) * 0.5
    bad = torch.randn(n, C)
    comb = combiner("linear", m=2, refit_every=1)
    assert torch.allclose(comb.weights, torch.tensor([0.5, 0.5]))
    comb.refit([good, bad], y)
    w = comb.weights
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and (w >= 0).all()
    assert w[0] > 0.9
    # no point of a coarse simplex grid does better than the fitted weights
    fitted = torch.nn.functional.cross_entropy(w[0] * good + w[1] * bad, y).item()
    for a in torch.linspace(0, 1, 21):
        assert fitted <= torch.nn.functional.cross_entropy(a * good + (1 - a) * bad, y).item() + 1e-4
    assert torch.allclose(comb([good, bad], y), w[0] * good + w[1] * bad)


def test_gradients_reach_the_target_only():
    src = fixed(1).requires_grad_(True)
    tgt = fixed(2).requires_grad_(True)
    for name in ("kd", "kl"):
        loss = make(name)
        value = loss({"logits": src.detach()}, {"logits": tgt}, batch(Y))  # the engine detaches sources
        value.backward()
        assert tgt.grad is not None and tgt.grad.abs().sum() > 0
        assert src.grad is None
        tgt.grad = None


def test_attention_transfer_by_hand():
    g = torch.Generator().manual_seed(0)
    fs = {"stage1": torch.rand(2, 3, 4, 4, generator=g), "stage3": torch.rand(2, 5, 2, 2, generator=g)}
    ft = {"stage1": torch.rand(2, 6, 8, 8, generator=g), "stage3": torch.rand(2, 4, 2, 2, generator=g)}
    loss = make("at", taps=["stage1", "stage3"])
    got = loss(ft, fs, batch(Y[:2]))

    def amap(f):  # mean over channels of f², flattened, L2-normalised per sample
        a = [[sum(f[b, c, i, j].item() ** 2 for c in range(f.shape[1])) / f.shape[1]
              for i in range(f.shape[2]) for j in range(f.shape[3])] for b in range(f.shape[0])]
        return [[v / math.sqrt(sum(x * x for x in row)) for v in row] for row in a]

    want = 0.0
    for tap in ("stage1", "stage3"):
        s, t = fs[tap], ft[tap]
        if t.shape[2] > s.shape[2]:
            t = torch.nn.functional.adaptive_avg_pool2d(t, s.shape[2:])  # the larger map is pooled
        a_s, a_t = amap(s), amap(t)
        diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)]
        want += sum(diffs) / len(diffs)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert loss.needs().source == ("stage1", "stage3")


def test_general_combiner_closed_form_by_hand():
    torch.manual_seed(1)
    n = 50
    y = torch.randint(0, C, (n,))
    zs = [torch.nn.functional.one_hot(y, C).float() * s + torch.randn(n, C) for s in (3.0, 1.0, 2.0)]
    comb = combiner("general", m=3, refit_every=1, ridge=0.0)
    comb.refit(zs, y)
    # C_ij = mean over samples of Σ_c (p_i - onehot)(p_j - onehot); w ∝ C⁻¹·1
    errs = [[[p - (1.0 if c == yy else 0.0) for c, p in enumerate(row)] for row, yy in
             zip(torch.softmax(z.double(), 1).tolist(), y.tolist())] for z in zs]
    cm = [[sum(sum(a * b for a, b in zip(ri, rj)) for ri, rj in zip(errs[i], errs[j])) / n for j in range(3)]
          for i in range(3)]
    w = torch.linalg.solve(torch.tensor(cm, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    w = (w / w.sum()).clamp_min(0)
    w = w / w.sum()
    assert torch.allclose(comb.weights.double(), w, atol=1e-6)
    assert comb.weights[0] > comb.weights[1]  # the most accurate member weighs most
    assert torch.allclose(comb(zs, y), sum(wi * z for wi, z in zip(comb.weights, zs)), atol=1e-6)
