"""CRD — Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020), as RepDistiller codes it.

Reference: ``HobbitLong/RepDistiller`` (``crd/criterion.py``: ``CRDLoss``, ``ContrastLoss``, ``Embed``;
``crd/memory.py``: ``ContrastMemory``; ``dataset/cifar100.py``: ``CIFAR100InstanceSample``).

Both sides' penultimate features go through their own trainable ``Embed`` (Linear → L2 norm). Each
anchor is scored against the *other* side's memory bank at its own sample index (positive, column 0)
and at K indices of other classes (negatives): out = exp(⟨bank[idx], v⟩/τ) / Z, with Z fixed on the
first batch to mean(out)·N. Each side's binary NCE uses Pn = 1/N; the loss is their sum. After
scoring, the banks move toward the new embeddings at the samples' indices (momentum 0.5).
With replicas, ``forward`` reads the whole batch (features, indices, labels) through ``self.gather``,
so every replica scores the same batch, draws the same negatives and updates identical banks.

Everything that persists — banks (or queues), Z, the step counter and the sampler's seed — is a
buffer, so it is checkpointed with the target peer. Negatives are drawn by a ``torch.Generator``
seeded by (seed, step), never by the global RNG, so a resumed run draws the same negatives.
"""
from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from .base import EdgeContext, EdgeLoss, Needs, Params
from .registry import register_loss


class CRDParams(Params):
    tap: str = "pool"                        # penultimate pooled features (RepDistiller's feat[-1]), both sides
    feat_dim: int = Field(128, ge=1)         # embedding size
    nce_k: int = Field(16384, ge=1)          # negatives per sample
    nce_t: float = Field(0.07, gt=0)         # temperature τ
    nce_m: float = Field(0.5, ge=0, lt=1)    # memory momentum
    eps: float = Field(1e-7, ge=0)           # ContrastLoss's eps
    mode: Literal["exact", "relax"] = "exact"
    negatives: Literal["other_class", "any"] = "other_class"
    allow_replacement: bool = False
    queue: bool = False
    queue_size: int = Field(16384, ge=1)
    seed: int | None = Field(None, ge=0)
    sample_on: Literal["cpu", "device"] = "cpu"

    @model_validator(mode="after")
    def _fits(self) -> "CRDParams":
        if self.queue and self.nce_k > self.queue_size:
            raise ValueError(f"nce_k={self.nce_k} negatives cannot be drawn from a queue of {self.queue_size} "
                             "(raise queue_size or lower nce_k)")
        if self.queue and self.mode == "relax":
            raise ValueError("mode 'relax' (a same-class positive from the bank) needs the memory bank, not queue: true")
        return self


class Embed(nn.Module):
    """RepDistiller's ``Embed``: flatten, Linear(dim → feat_dim), L2-normalise (no eps, as the reference)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def _mix(*parts) -> int:
    """A 63-bit seed from the given parts (stable across processes and platforms)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def nce_loss(x: Tensor, n: int, eps: float = 1e-7) -> Tensor:
    """RepDistiller's ``ContrastLoss``: binary NCE over [B, 1+K] scores (positive first), Pn = 1/n.

    −[Σ_b log(P⁺/(P⁺ + K·Pn + eps)) + Σ_b Σ_k log(K·Pn/(P⁻ + K·Pn + eps))] / B.
    """
    bsz, m = x.shape[0], x.shape[1] - 1
    mpn = m / float(n)
    pos, neg = x[:, 0], x[:, 1:]
    log_d1 = torch.div(pos, pos + (mpn + eps)).log()
    log_d0 = torch.div(torch.full_like(neg, mpn), neg + (mpn + eps)).log()
    return -(log_d1.sum() + log_d0.sum()) / bsz


@register_loss("crd")
class CRD(EdgeLoss):
    """CRD: loss_v1 + loss_v2, binary NCE of each side's embedding against the other side's memory.

    Edge weight = RepDistiller's β (``-b 0.8``); the target's CE weight (γ, ``-r 1``) is its ``task_weight``.

    Where the reference differs from the paper or from what a big data set allows, a parameter says so:

    * ``mode``: ``exact`` (default; the positive is the sample's own bank entry) or ``relax`` (the
      reference dataset's other mode: the positive is a random *same-class* sample's entry).
    * ``negatives``: ``other_class`` (default; the reference dataset draws K negatives from samples of
      other classes, without replacement) or ``any`` (``ContrastMemory``'s own fallback when no
      ``contrast_idx`` is given: K uniform draws over all indices, with replacement, self included).
    * ``allow_replacement``: the reference silently samples other-class negatives *with* replacement
      when K exceeds them; here that is a ``ValueError`` at ``attach`` unless this is true.
    * ``queue: true`` (not in the reference; asked for by its users for large data sets): instead of
      two N×feat_dim banks, two FIFO queues of the last ``queue_size`` embeddings with their labels and
      sample indices. The positive is then the other side's *current* embedding (detached, as bank rows
      are); K negatives are drawn from the queue, skipping entries of the same class (and the sample
      itself) while enough others remain. NCE constant: the noise distribution is uniform over the set
      negatives come from, so N = ``queue_size`` (Pn = 1/queue_size, Z = mean(out)·queue_size on the
      first batch). N cancels in the loss — P/(P + K·Pn) = out/(out + K·mean₀(out)) — so this choice
      matters only through eps (1e-7 against K·Pn), exactly as n_data does in bank mode. The queue starts
      filled like the bank (uniform(−stdv, stdv), label −1: usable by every class).
    * ``sample_on``: ``cpu`` (default) draws each sample's negatives with ``randperm`` on a CPU generator
      (the same negatives on any device; about 45 ms per step of 64 at CIFAR-100 sizes, like the
      reference's ``np.random.choice`` in its data workers); ``device`` draws them as the K smallest of
      uniform float64 keys on the bank's device (fast on a GPU; the stream then depends on the device type).

    Scores against a bank are computed densely (⟨v, bank⟩ for all N rows, then the K+1 columns picked)
    when B·N ≤ B·(K+1)·feat_dim, which avoids the reference's [B, K+1, feat_dim] gather (≈0.5 GB per
    bank at CIFAR-100 sizes); the values are the same dot products. Banks and queues are updated out of
    place (the backward still needs them as scored), so a step briefly holds two copies of each.
    """

    relates_samples = True  # banks keyed by sample index: scored and updated with the whole batch (self.gather)

    Params = CRDParams

    def __init__(self, params: CRDParams):
        super().__init__(params)
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.n_data: int | None = None
        self._targets: Tensor | None = None  # CPU: labels by sample index
        self._order: Tensor | None = None    # CPU: sample indices sorted by class
        self._start: Tensor | None = None    # CPU: first position of each class in _order
        self._count: Tensor | None = None    # CPU: samples per class
        self._device_cache: dict = {}
        self.register_buffer("z", torch.full((2,), -1.0))             # Z_v1, Z_v2; < 0: not set yet
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seed", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ contract
    def needs(self) -> Needs:
        return Needs(source=(self.params.tap,), target=(self.params.tap,))

    def build(self, source_shapes, target_shapes) -> None:
        p, tap = self.params, self.params.tap
        for side, shapes in (("source", source_shapes), ("target", target_shapes)):
            if tap not in shapes:
                raise ValueError(f"crd reads tap '{tap}', which the {side} does not provide")
        self.embed_s = Embed(math.prod(target_shapes[tap]), p.feat_dim)  # student (target) side: v1
        self.embed_t = Embed(math.prod(source_shapes[tap]), p.feat_dim)  # teacher (source) side: v2
        # no seed given: one drawn from the RNG the engine forks per (train.seed, edge) around build
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.seed.fill_(seed)
        if p.queue:
            q, stdv = p.queue_size, self._stdv
            g = torch.Generator().manual_seed(_mix(seed, "queue"))
            self.register_buffer("queue_s", torch.rand(q, p.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
            self.register_buffer("queue_t", torch.rand(q, p.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv))
            self.register_buffer("queue_label", torch.full((q,), -1, dtype=torch.int64))
            self.register_buffer("queue_index", torch.full((q,), -1, dtype=torch.int64))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def attach(self, ctx: EdgeContext) -> None:
        super().attach(ctx)
        p = self.params
        if ctx.train_targets is not None:
            self._index_labels(ctx.train_targets)
        if p.queue:
            return
        if ctx.num_train is None or ctx.train_targets is None:
            raise ValueError("crd's memory bank needs the training split's size and labels (none were given); "
                             "use queue: true where the run has no indexed training split")
        n = self.n_data = int(ctx.num_train)
        if p.negatives == "other_class" and not p.allow_replacement:
            avail = n - self._count
            avail = avail[self._count > 0]
            worst = int(avail.min())
            if p.nce_k > worst:
                c = int(torch.nonzero(self._count == self._count.max())[0])
                raise ValueError(f"crd: nce_k={p.nce_k} exceeds the {worst} samples of other classes available to "
                                 f"class {c} ({n} training samples); set nce_k ≤ {worst}, or allow_replacement: true "
                                 "(what the reference code does silently)")
        dev = self.embed_s.linear.weight.device
        stdv = self._stdv
        g = torch.Generator().manual_seed(_mix(int(self.seed), "bank"))
        self.register_buffer("bank_s", torch.rand(n, p.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv).to(dev))
        self.register_buffer("bank_t", torch.rand(n, p.feat_dim, generator=g).mul_(2 * stdv).add_(-stdv).to(dev))

    @property
    def _stdv(self) -> float:
        return 1.0 / math.sqrt(self.params.feat_dim / 3)

    def _index_labels(self, targets: Tensor) -> None:
        t = torch.as_tensor(targets, dtype=torch.int64).cpu()
        self._targets = t
        self._order = torch.argsort(t, stable=True)
        self._count = torch.bincount(t)
        self._start = torch.cumsum(self._count, 0) - self._count
        self._device_cache = {}

    def _on(self, dev: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if dev not in self._device_cache:
            self._device_cache[dev] = (self._order.to(dev), self._start.to(dev), self._count.to(dev))
        return self._device_cache[dev]

    @property
    def nce_n(self) -> int:
        """N of the NCE: the size of the set negatives come from (n_data, or queue_size with a queue)."""
        return self.params.queue_size if self.params.queue else self.n_data

    # ------------------------------------------------------------------ sampling
    def generator(self, step: int | None = None, device: torch.device | str = "cpu") -> torch.Generator:
        """The sampler's generator for a step (default: the current one): seeded by (seed, step) only."""
        step = int(self.step) if step is None else step
        return torch.Generator(device=device).manual_seed(_mix(int(self.seed), "negatives", step))

    def sample_contrast_idx(self, index: Tensor, step: int | None = None) -> Tensor:
        """[B, 1+K] bank indices for the samples ``index``: positive first, then K negatives."""
        p = self.params
        if self._targets is None:
            raise ValueError("crd has no training labels: attach() was not called")
        dev = self.bank_s.device if p.sample_on == "device" else torch.device("cpu")
        g = self.generator(step, dev)
        index = index.to(dev)
        order, start, count = self._on(dev)
        y = self._targets[index.cpu()].to(dev)
        b, k, n = len(index), p.nce_k, self.n_data
        if p.mode == "relax":  # a random same-class sample's entry is the positive
            q = (torch.rand(b, generator=g, device=dev, dtype=torch.float64) * count[y]).long()
            pos = order[start[y] + q]
        else:
            pos = index
        if p.negatives == "any":
            neg = torch.randint(0, n, (b, k), generator=g, device=dev)
        else:
            avail = n - count[y]                                   # other-class samples per row
            if bool((avail < k).any()):                            # only with allow_replacement (checked at attach)
                pos_in = (torch.rand(b, k, generator=g, device=dev, dtype=torch.float64) * avail[:, None]).long()
            elif dev.type == "cpu" and p.sample_on == "cpu":
                pos_in = torch.stack([torch.randperm(int(a), generator=g)[:k] for a in avail.tolist()])
            else:
                keys = torch.rand(b, n, generator=g, device=dev, dtype=torch.float64)
                keys.masked_fill_(torch.arange(n, device=dev)[None, :] >= avail[:, None], 2.0)
                pos_in = keys.topk(k, dim=1, largest=False, sorted=True).indices
            # position among other-class samples → position in class-sorted order (skip class y's block)
            s = start[y][:, None]
            pos_in = torch.where(pos_in < s, pos_in, pos_in + count[y][:, None])
            neg = order[pos_in]
        return torch.cat([pos.view(-1, 1), neg], 1)

    def sample_queue_idx(self, index: Tensor, y: Tensor, step: int | None = None) -> Tensor:
        """[B, K] queue slots: uniform without replacement, other-class (and not-self) slots first."""
        p = self.params
        dev = self.queue_s.device if p.sample_on == "device" else torch.device("cpu")
        g = self.generator(step, dev)
        keys = torch.rand(len(index), p.queue_size, generator=g, device=dev, dtype=torch.float64)
        if p.negatives == "other_class":
            keys.add_(self.queue_label.to(dev)[None, :] == y.to(dev)[:, None])
        keys.add_(self.queue_index.to(dev)[None, :] == index.to(dev)[:, None], alpha=2.0)
        return keys.topk(p.nce_k, dim=1, largest=False, sorted=True).indices

    # ------------------------------------------------------------------ loss
    def forward(self, source, target, batch):
        tap = self.params.tap
        f_s, f_t = self.gather(target[tap], source[tap])
        # the whole batch's samples: every replica scores them and moves its banks alike, so banks never drift
        index, y = self.gather(batch.index.to(f_s.device), batch.y)
        return self.crd(f_s, f_t, index, y)

    def crd(self, f_s: Tensor, f_t: Tensor, index: Tensor, y: Tensor | None = None,
            contrast_idx: Tensor | None = None) -> Tensor:
        """The CRD loss of student features ``f_s`` and teacher features ``f_t`` of samples ``index``.

        ``contrast_idx`` ([B, 1+K] bank rows, positive first; [B, K] queue slots with a queue) replaces
        the sampled indices, as the reference's ``contrast_idx`` argument does. In training mode the
        banks (queues) are updated afterwards and the step counter advances.
        """
        p = self.params
        dev = f_s.device
        index = index.to(dev)
        with torch.autocast(dev.type, enabled=False):  # exp(1/0.07) ≈ 1.6e6: scores stay in fp32
            v1 = self.embed_s(f_s.float())
            v2 = self.embed_t(f_t.float())
            if p.queue:
                if y is None:
                    raise ValueError("crd with a queue needs the batch labels")
                if contrast_idx is None:
                    contrast_idx = self.sample_queue_idx(index, y)
                contrast_idx = contrast_idx.to(dev)
                out_v1 = self._scores_queue(v1, v2.detach(), self.queue_t, contrast_idx)
                out_v2 = self._scores_queue(v2, v1.detach(), self.queue_s, contrast_idx)
            else:
                if self.n_data is None:
                    raise ValueError("crd's memory bank is not set up: attach() was not called")
                if int(index.max()) >= self.n_data or int(index.min()) < 0:
                    raise ValueError(f"sample index out of the memory bank's range [0, {self.n_data})")
                if contrast_idx is None:
                    contrast_idx = self.sample_contrast_idx(index)
                contrast_idx = contrast_idx.to(dev)
                out_v1 = self._scores_bank(v1, self.bank_t, contrast_idx)   # student anchor, teacher memory
                out_v2 = self._scores_bank(v2, self.bank_s, contrast_idx)   # teacher anchor, student memory
            n = self.nce_n
            with torch.no_grad():
                if self.z[0] < 0:
                    self.z[0] = out_v1.mean() * n
                if self.z[1] < 0:
                    self.z[1] = out_v2.mean() * n
            out_v1 = out_v1 / self.z[0]
            out_v2 = out_v2 / self.z[1]
            loss = nce_loss(out_v1, n, p.eps) + nce_loss(out_v2, n, p.eps)
            if self.training:
                with torch.no_grad():
                    if p.queue:
                        self._enqueue(v1.detach(), v2.detach(), y.to(dev), index)
                    else:
                        self._momentum_update("bank_s", v1.detach(), index)
                        self._momentum_update("bank_t", v2.detach(), index)
                self.step += 1
        return loss

    def _scores_bank(self, v: Tensor, bank: Tensor, idx: Tensor) -> Tensor:
        """exp(⟨bank[idx[b, j]], v[b]⟩ / τ), [B, 1+K]."""
        if bank.shape[0] <= idx.shape[1] * bank.shape[1]:
            s = (v @ bank.t()).gather(1, idx)                      # dense: [B, N], then the K+1 columns
        else:
            s = torch.bmm(bank[idx], v.unsqueeze(2)).squeeze(2)    # reference's gather: [B, K+1, d]
        return torch.exp(s / self.params.nce_t)

    def _scores_queue(self, v: Tensor, positive: Tensor, queue: Tensor, slots: Tensor) -> Tensor:
        """exp([⟨positive, v⟩, ⟨queue[slots], v⟩] / τ), [B, 1+K]."""
        pos = (v * positive).sum(1, keepdim=True)
        neg = (v @ queue.t()).gather(1, slots)
        return torch.exp(torch.cat([pos, neg], 1) / self.params.nce_t)

    def _momentum_update(self, name: str, v: Tensor, index: Tensor) -> None:
        """bank[i] ← normalise(m·bank[i] + (1−m)·v), the reference's update at the samples' indices.

        Out of place: the scores' backward still needs the bank as it was when scored."""
        m, bank = self.params.nce_m, getattr(self, name)
        pos = torch.index_select(bank, 0, index).mul_(m).add_(v * (1 - m))
        setattr(self, name, bank.index_copy(0, index, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5))))

    def _enqueue(self, v1: Tensor, v2: Tensor, y: Tensor, index: Tensor) -> None:
        """FIFO: the batch's embeddings, labels and indices replace the oldest queue entries."""
        q = self.params.queue_size
        if len(index) > q:
            v1, v2, y, index = v1[-q:], v2[-q:], y[-q:], index[-q:]
        slots = (int(self.queue_ptr) + torch.arange(len(index), device=v1.device)) % q
        # out of place: the scores' backward still needs the queues as they were when scored
        self.queue_s = self.queue_s.index_copy(0, slots, v1)
        self.queue_t = self.queue_t.index_copy(0, slots, v2)
        self.queue_label = self.queue_label.index_copy(0, slots, y)
        self.queue_index = self.queue_index.index_copy(0, slots, index)
        self.queue_ptr.fill_((int(self.queue_ptr) + len(index)) % q)
