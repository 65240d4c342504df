"""Throughput of the ray engine against the local engine, 2 peers, measured in one run.

The same two-peer DML topology (resnet20 on CIFAR-size synthetic data, batch 64) trains for a
few epochs on each engine; samples per second summed over peers come from each epoch's own
training time (the first epoch, with its warm-up, is dropped), so Ray's start-up is not counted.

    python benchmarks/scaling.py [--steps 20] [--readme]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.ray import RayEngine
from online_kd.topology import load_topology

TOPOLOGY = {
    "name": "bench-scaling",
    "data": {"dataset": "synthetic", "batch_size": 64,
             "synthetic": {"num_train": 8192, "num_test": 64, "shape": [3, 32, 32], "num_classes": 100}},
    "train": {"epochs": 3, "seed": 0},
    "peers": {"a": {"model": "resnet20", "optimizer": {"lr": 0.05}}, "b": {"like": "a"}},
    "edges": [{"pattern": "all_pairs", "over": ["a", "b"], "loss": "kl", "temperature": 1}],
    "tracking": {"enabled": False},
}


def throughput(engine, steps: int, threads: int) -> float:
    topo = load_topology(TOPOLOGY, {"train.max_steps_per_epoch": steps, "train.threads": threads})
    with tempfile.TemporaryDirectory() as out:
        engine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True)).run()
        epochs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [len(topo.config.peers) * steps * 64 / e["seconds"] for e in epochs[1:]]
    return statistics.median(per_epoch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    from readme import machine, update_readme

    local = throughput(LocalEngine, args.steps, threads=2)
    distributed = throughput(RayEngine, args.steps, threads=1)
    table = ("| engine | samples/s (summed over 2 peers) | vs local |\n|---|---|---|\n"
             f"| local (1 process, 2 threads) | {local:.0f} | 1.00 |\n"
             f"| ray (2 workers × 1 thread, gloo) | {distributed:.0f} | {distributed / local:.2f} |\n\n"
             f"Measured on {machine()}: resnet20 ×2 DML on 3×32×32 synthetic data, batch 64, "
             f"median of epochs 2–3 of {args.steps} steps each.")
    print(table)
    if args.readme:
        update_readme("scaling", table)


if __name__ == "__main__":
    main()
