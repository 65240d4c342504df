"""Active Mixup (Wang, Li, Wang, Gong, CVPR 2020): data-efficient distillation from a black-box teacher.

A small pool of real training images (their labels unused) is all the data there is. Candidate
images are convex mixes of two pool images; each round, the student trained so far scores every
candidate at every mixing weight λ, keeps for each pair the λ where its top softmax probability is
lowest, and the ``queries`` pairs with the lowest such score (the most uncertain) are sent to the
black-box teacher. Its answers (softmax probabilities, T=1) are recorded with the set, so training
on it never asks the teacher again: the teacher's query count is the method's budget.

As the official code (dwang181/active-mixup @fc113db, ``00``–``11_data_prep.py``) does it:

* the pool is a random subset of the training split; the first round labels the pool images
  themselves by the teacher (``01_data_prep.py``), a later round (``grow``) extends an earlier set
  (``11_data_prep.py``: new mixes + the previous labelled set);
* candidates are the pairs (x_i, x_{i+r mod N}) for r = 1 … ⌊(N−1)/2⌋ ("index rotation":
  499,000 pairs for N = 1000); λ ∈ {0.30, 0.34, …, 0.70}; mix = λ·x1 + (1−λ)·x2; ties go to the
  first λ (``np.argmin``) and to the lower candidate index;
* student and teacher answer in eval mode.

Differences, on purpose: pairs already queried in an earlier round are not candidates again
(the official script writes the left-over pool, ``cifar10_left_unlabeled_*.pkl``, but its loader
as published re-reads the full one); mixes are kept as float tensors in the topology's normalised
space (mixing commutes with the per-channel normalisation), not re-quantised to uint8 with the
official ``×256`` overflow; the pool is drawn from a fixed, seeded permutation (``pool_seed``), so
runs with different seeds share it; the labels ``y`` of the set are the teacher's top-1 answers,
used only for the training accuracy (train with ``task_weight: 0``: the reference has no CE).
"""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from ..data.hashing import generator_seed
from ..errors import TopologyError, suggest
from .base import ProduceContext, ProducedSet, StageKind, StageParams
from .registry import register_stage_kind

DEFAULT_LAMBDAS = [round(0.30 + 0.04 * i, 2) for i in range(11)]  # 0.30, 0.34, …, 0.70


class ActiveMixupParams(StageParams):
    teacher: str                            # the black-box peer that labels (peers.X.blackbox: true)
    student: str | None = None              # the peer that scores candidates (needed when queries > 0)
    pool: int | None = Field(None, ge=2)    # real training images in the pool (the first round)
    pool_seed: int = 0
    queries: int = Field(0, ge=0)           # mixes this round adds (each one a teacher query)
    lambdas: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=lambda: list(DEFAULT_LAMBDAS),
                                                                min_length=1)
    max_candidates: int | None = Field(None, ge=1)  # score a seeded subsample of the candidate pairs
    grow: str | None = None                 # the earlier active_mixup stage whose set this one extends
    score_batch: int = Field(1000, ge=1)    # candidates per forward pass (the reference's 1000)
    augment: bool = True                    # the reference trains with crop + flip


def pool_indices(num_train: int, size: int, seed: int) -> Tensor:
    """The pool: the first ``size`` of a permutation of the training split seeded by ``seed`` alone."""
    g = torch.Generator().manual_seed(generator_seed("online_kd/active_mixup/pool", seed))
    return torch.randperm(num_train, generator=g)[:size]


def rotation_pairs(n: int) -> Tensor:
    """Candidate pairs ``[n·⌊(n−1)/2⌋, 2]``: (i, (i + r) mod n) for r = 1 … ⌊(n−1)/2⌋, rotation by rotation.

    Every unordered pair of pool positions appears once (for even n the n/2 pairs at distance
    n/2 are left out, as in the reference)."""
    r = torch.arange(1, (n - 1) // 2 + 1)
    i = torch.arange(n)
    return torch.stack([i.repeat(len(r)), ((i[None, :] + r[:, None]) % n).reshape(-1)], dim=1)


def mix(images: Tensor, pairs: Tensor, lambdas: Tensor) -> Tensor:
    """λ·images[a] + (1−λ)·images[b] per pair (a, b) and its λ (float32, the same arithmetic when scoring)."""
    lam = lambdas.to(images.dtype).view(-1, *([1] * (images.dim() - 1)))
    return lam * images[pairs[:, 0]] + (1 - lam) * images[pairs[:, 1]]


def least_confident_lambda(probs_fn, x: Tensor, pairs: Tensor, lambdas: Tensor, batch: int,
                           advance=lambda n: None) -> tuple[Tensor, Tensor]:
    """Per pair: the λ whose mix λ·x[a] + (1−λ)·x[b] gets the lowest top probability, and that probability.

    ``probs_fn(images) -> [B, K]`` softmax probabilities. Ties go to the first λ."""
    best_lam, best_score = [], []
    for start in range(0, len(pairs), batch):
        chunk = pairs[start:start + batch].to(x.device)
        top = torch.stack([probs_fn(mix(x, chunk, lam.to(x.device).expand(len(chunk)))).max(dim=1).values.cpu()
                           for lam in lambdas])                     # [L, B] top probability per λ and pair
        k = top.argmin(dim=0)                                       # [B] index of the least confident λ
        best_lam.append(lambdas[k])
        best_score.append(top.gather(0, k[None]).squeeze(0))
        advance(1)
    if not best_lam:
        return torch.empty(0), torch.empty(0)
    return torch.cat(best_lam), torch.cat(best_score)


@register_stage_kind("active_mixup")
class ActiveMixup(StageKind):
    """One round of Active Mixup: label the pool (first round) or extend a set, with the most uncertain mixes.

    The set's ``provenance``: ``pool`` (indices of the pool images in the training split), per sample
    ``pairs`` (a, b) (pool positions; (i, i) for pool image i) and ``lambdas`` λ, the sample being
    λ·pool[a] + (1−λ)·pool[b]. ``answers[teacher]`` are the teacher's probabilities for every sample.
    """

    Params = ActiveMixupParams
    blackbox_params = ("teacher",)

    def reads(self) -> dict[str, str]:
        p = self.params
        return {"teacher": p.teacher, **({"student": p.student} if p.student else {})}

    # ------------------------------------------------------------------ validation
    def _chain(self, topology, origin: str) -> list:
        """The producing stages this one grows from, oldest first (validation has already checked their
        parameters: it takes the producing stages in order)."""
        chain, name, where = [], self.params.grow, f"{origin}.grow"
        mine = next(i for i, p in enumerate(topology.producers) if p.origin == origin)
        rounds = {p.name: (i, p) for i, p in enumerate(topology.producers) if p.kind == self.name}
        while name is not None:
            earlier = [n for n, (i, _) in rounds.items() if i < mine]
            if name not in rounds:
                raise TopologyError(where, suggest(name, earlier, "active_mixup stage") if earlier else
                                    f"no earlier active_mixup stage named '{name}' to grow from")
            i, prod = rounds[name]
            if i >= mine:
                raise TopologyError(where, f"stage '{name}' runs after this one: it can only grow an earlier round")
            kind = type(self)(self.Params.model_validate(prod.params), prod.name)
            chain.insert(0, kind)
            mine, name, where = i, kind.params.grow, f"{prod.origin}.grow"
        return chain

    def check(self, topology, origin: str) -> None:
        p, c = self.params, topology.config
        if not c.peers[p.teacher].blackbox:
            raise TopologyError(f"{origin}.teacher", f"'{p.teacher}' is not a black box: set peers.{p.teacher}."
                                                     "blackbox: true (active mixup only asks it for probabilities, "
                                                     "and counts the queries)")
        if p.student == p.teacher:
            raise TopologyError(f"{origin}.student", "the student that scores candidates cannot be the teacher")
        if p.queries and p.student is None:
            raise TopologyError(f"{origin}.student", f"choosing {p.queries} mixes needs a student to score them: "
                                                     "name the peer trained in the previous round")
        if p.student is not None and not c.peers[p.student].init:
            before = next(q.before for q in topology.producers if q.origin == origin)
            first = topology.trained_stage(p.student)
            if first is None or first >= before:
                when = "in no stage" if first is None else f"first in stage '{topology.stages[first].name}'"
                raise TopologyError(f"{origin}.student", f"'{p.student}' is trained {when}, after this round: it "
                                                         "would score the candidates untrained (name the student of "
                                                         "the previous round)")
        chain = self._chain(topology, origin)
        root = chain[0].params if chain else p
        for key in ("pool", "pool_seed"):
            if chain and key in p.model_fields_set and getattr(p, key) != getattr(root, key):
                raise TopologyError(f"{origin}.{key}", f"{key} {getattr(p, key)} differs from the round it grows "
                                                       f"({getattr(root, key)}): leave it out, it is inherited")
        for k in chain:
            if k.params.teacher != p.teacher:
                raise TopologyError(f"{origin}.teacher", f"stage '{k.stage_name}', which this one grows, asked "
                                                         f"'{k.params.teacher}': one round's set has one teacher")
        if root.pool is None:
            raise TopologyError(f"{origin}.pool", "the first round needs 'pool' (how many real training images form "
                                                  "the unlabelled pool), or 'grow' naming the round it extends")
        num_train = self._num_train(topology)
        if num_train is not None and root.pool > num_train:
            raise TopologyError(f"{origin}.pool", f"the pool of {root.pool} is larger than the training split "
                                                  f"({num_train} images)")
        if p.max_candidates is not None and p.queries > p.max_candidates:
            raise TopologyError(f"{origin}.queries", f"asks for {p.queries} mixes out of {p.max_candidates} scored "
                                                     "candidates (max_candidates)")
        total = root.pool * ((root.pool - 1) // 2)
        used = sum(k.params.queries for k in chain)
        if p.queries > total - used:
            raise TopologyError(f"{origin}.queries", f"asks for {p.queries} mixes but only {total - used} candidate "
                                                     f"pairs are left ({root.pool} pool images give {total} by "
                                                     f"rotation; earlier rounds took {used})")

    @staticmethod
    def _num_train(topology) -> int | None:
        from ..data import dataset_info

        try:
            return dataset_info(topology.config.data).num_train
        except Exception:  # e.g. an imagefolder root that is not there yet: the data loader reports it
            return None

    # ------------------------------------------------------------------ the round
    def run(self, ctx: ProduceContext) -> ProducedSet:
        p, rt = self.params, ctx.runtime
        prev = ctx.produced[p.grow] if p.grow else None
        pool = prev.provenance["pool"] if prev else pool_indices(len(ctx.data.train), p.pool, p.pool_seed)
        images = ctx.data.train.get(pool)[0]
        asked_before = int(prev.recipe["total_queries"]) if prev else 0
        if prev is not None:
            x, y, answers = prev.x, prev.y, prev.answers[p.teacher]
            pairs, lams = prev.provenance["pairs"], prev.provenance["lambdas"]
            asked = asked_before
        else:  # the first round: the teacher labels the pool images themselves
            x = images
            answers = self._ask(ctx, x, f"stage '{self.stage_name}': black box '{p.teacher}' labels the "
                                        f"{len(x)} pool images")
            y = answers.argmax(dim=1)
            pairs, lams = torch.arange(len(pool)).repeat(2, 1).T.contiguous(), torch.ones(len(pool))
            asked = len(pool)
        recipe = {"kind": self.name, "teacher": p.teacher, "student": p.student, "grow": p.grow, "pool": len(pool),
                  "pool_seed": prev.recipe["pool_seed"] if prev else p.pool_seed, "pairs": "rotations",
                  "lambdas": [float(v) for v in p.lambdas], "mixes": p.queries}
        if p.queries:
            images = images.to(rt.device)
            new_pairs, new_lams, scores, candidates = self._choose(ctx, images, pairs)
            mixes = mix(images, new_pairs.to(rt.device), new_lams.to(rt.device)).cpu()
            new_answers = self._ask(ctx, mixes, f"stage '{self.stage_name}': black box '{p.teacher}' labels "
                                                f"{len(mixes)} mixes ({asked + len(mixes)} queries in all)")
            x, y = torch.cat([x, mixes]), torch.cat([y, new_answers.argmax(dim=1)])
            answers = torch.cat([answers, new_answers])
            pairs, lams = torch.cat([pairs, new_pairs]), torch.cat([lams, new_lams])
            asked += len(mixes)
            recipe.update(candidates=candidates, max_candidates=p.max_candidates,
                          selected_top_prob_mean=round(float(scores.mean()), 6),
                          selected_top_prob_max=round(float(scores.max()), 6))
        recipe.update(queries=asked - asked_before, total_queries=asked, size=len(y))
        return ProducedSet(x=x, y=y, recipe=recipe, answers={p.teacher: answers}, augment=p.augment,
                           provenance={"pool": pool, "pairs": pairs, "lambdas": lams})

    def _ask(self, ctx: ProduceContext, images: Tensor, description: str) -> Tensor:
        """The teacher's softmax answers (T=1) to ``images``, through the runtime, which counts them."""
        rt, b = ctx.runtime, self.params.score_batch
        out = []
        with ctx.progress(description, (len(images) + b - 1) // b) as bar:
            for start in range(0, len(images), b):
                out.append(rt.query(self.params.teacher, images[start:start + b]).cpu())
                bar.advance()
        return torch.cat(out) if out else torch.empty(0)

    def _choose(self, ctx: ProduceContext, images: Tensor, taken: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """The ``queries`` most uncertain candidate pairs not in the set yet: (pairs, their λ, scores, #scored)."""
        p, rt = self.params, ctx.runtime
        n = len(images)
        cands = rotation_pairs(n)
        cands = cands[~torch.isin(cands[:, 0] * n + cands[:, 1], taken[:, 0] * n + taken[:, 1])]
        if p.max_candidates is not None and len(cands) > p.max_candidates:
            g = torch.Generator().manual_seed(generator_seed("online_kd/active_mixup/candidates", ctx.seed,
                                                             self.stage_name))
            cands = cands[torch.randperm(len(cands), generator=g)[:p.max_candidates].sort().values]
        if len(cands) < p.queries:
            raise ValueError(f"stage '{self.stage_name}': {len(cands)} candidate pairs left, {p.queries} asked")
        lambdas = torch.tensor(p.lambdas, dtype=torch.float32)
        chunks = (len(cands) + p.score_batch - 1) // p.score_batch
        with ctx.progress(f"stage '{self.stage_name}': '{p.student}' scores {len(cands)} candidate pairs at "
                          f"{len(lambdas)} mixing weights", chunks) as bar:
            lam, score = least_confident_lambda(lambda im: rt.query(p.student, im), images, cands, lambdas,
                                                p.score_batch, bar.advance)
        order = torch.sort(score, stable=True).indices[:p.queries]
        return cands[order], lam[order], score[order], len(cands)
