"""Local-engine overhead: its DML step against a hand-written two-model PyTorch loop, same run.

Both sides train the same two networks (same initial weights, same batches, same optimizer
settings) with CE + KL(other ‖ self) each; rounds alternate between them so that machine
noise hits both alike. Prints the median per-step time of each and their ratio (goal ≤ 1.05).

    python benchmarks/overhead.py                      # convnet on digits and resnet20 on CIFAR-size data
    python benchmarks/overhead.py --rounds 10 --steps 20
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from online_kd.data import BatchStream, build_data
from online_kd.engine.runtime import Runtime
from online_kd.topology import load_topology

CASES = {
    "convnet-digits": {"data": {"dataset": "digits", "batch_size": 64, "augment": "none"}, "model": "convnet"},
    "resnet20-cifar-size": {"data": {"dataset": "synthetic", "batch_size": 64,
                                     "synthetic": {"num_train": 2048, "num_test": 64, "shape": [3, 32, 32],
                                                   "num_classes": 100}}, "model": "resnet20"},
}


def topology(case: dict):
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    return load_topology({
        "name": "overhead", "data": case["data"], "train": {"epochs": 1, "seed": 0},
        "peers": {"a": {"model": case["model"], "optimizer": opt}, "b": {"model": case["model"], "optimizer": opt}},
        "edges": [{"pattern": "all_pairs", "over": ["a", "b"], "loss": "kl", "temperature": 1}],
        "tracking": {"enabled": False},
    })


class HandLoop:
    """What a researcher writes by hand for DML: two models, two optimizers, one loop."""

    def __init__(self, rt: Runtime):
        self.a = copy.deepcopy(rt.peers["a"].net)
        self.b = copy.deepcopy(rt.peers["b"].net)
        kw = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.oa = torch.optim.SGD(self.a.parameters(), **kw)
        self.ob = torch.optim.SGD(self.b.parameters(), **kw)

    def step(self, x, y):
        za, zb = self.a(x), self.b(x)
        la = F.cross_entropy(za, y) + F.kl_div(F.log_softmax(za, 1), F.log_softmax(zb.detach(), 1),
                                               reduction="batchmean", log_target=True)
        lb = F.cross_entropy(zb, y) + F.kl_div(F.log_softmax(zb, 1), F.log_softmax(za.detach(), 1),
                                               reduction="batchmean", log_target=True)
        self.oa.zero_grad(set_to_none=True)
        self.ob.zero_grad(set_to_none=True)
        (la + lb).backward()
        self.oa.step()
        self.ob.step()
        torch.isfinite(la + lb).item()  # the engine checks every step for divergence; so does a careful loop


def measure(name: str, case: dict, rounds: int, steps: int) -> dict:
    topo = topology(case)
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    rt.enter_stage(topo.stages[0])
    hand = HandLoop(rt)
    batches = list(BatchStream(data.train, 64, 0).epoch(0))[:steps]
    for b in batches[:3]:  # warm-up both
        rt.train_step(b, 0, 0)
        hand.step(b.x, b.y)
    engine_t, hand_t = [], []
    for r in range(rounds):
        order = [("engine", lambda b: rt.train_step(b, 0, 0)), ("hand", lambda b: hand.step(b.x, b.y))]
        for label, fn in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            (engine_t if label == "engine" else hand_t).append((time.perf_counter() - t0) / len(batches))
    e, h = statistics.median(engine_t), statistics.median(hand_t)
    return {"case": name, "engine_ms": round(1e3 * e, 3), "hand_ms": round(1e3 * h, 3), "ratio": round(e / h, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [measure(n, c, args.rounds, args.steps) for n, c in CASES.items()]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if args.json:
        print(json.dumps({"machine": machine, "results": results}, indent=2))
        return
    print(f"local-engine DML step vs hand-written loop ({machine})")
    for r in results:
        print(f"  {r['case']:<22} engine {r['engine_ms']:8.2f} ms   hand {r['hand_ms']:8.2f} ms   ratio {r['ratio']:.3f}")
    if args.readme:
        from readme import machine as where, update_readme

        rows = ["| case | engine step ms | hand-written ms | ratio |", "|---|---|---|---|"]
        rows += [f"| {r['case']} | {r['engine_ms']:.2f} | {r['hand_ms']:.2f} | {r['ratio']:.3f} |" for r in results]
        update_readme("overhead", "\n".join(rows) + f"\n\nMeasured on {where()}, medians of {args.rounds} alternating "
                      f"rounds of {args.steps} steps.")


if __name__ == "__main__":
    main()
