"""Exchange cost on the ray engine: compute, waiting and exchange time per step, per peer.

Runs two topologies on CPU workers over gloo with profiling on (a barrier before each exchange
separates waiting for the slower peer from moving the taps):
  * the quick DML topology (logits, 10 classes, digits);
  * two resnet20 peers on CIFAR-size synthetic data exchanging logits (KL both ways);
  * a feature-map topology: two resnet20 peers on CIFAR-size synthetic data exchanging logits
    and their stage-3 maps (64×8×8 per sample) for attention transfer both ways.
Prints per peer: compute ms, waiting ms, exchange ms, bytes per step, and the exchange share
of the step (goal: < 2 % for logits, < 10 % for stage-3 maps).

    python benchmarks/exchange.py [--steps 40] [--readme]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from online_kd.engine.options import RunOptions
from online_kd.engine.ray import RayEngine
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]

FEATURES = {
    "name": "bench-stage3-maps",
    "data": {"dataset": "synthetic", "batch_size": 64,
             "synthetic": {"num_train": 4096, "num_test": 256, "shape": [3, 32, 32], "num_classes": 100}},
    "train": {"epochs": 1, "seed": 0},
    "peers": {"a": {"model": "resnet20", "optimizer": {"lr": 0.05}}, "b": {"like": "a"}},
    "edges": [{"pattern": "all_pairs", "over": ["a", "b"], "loss": "kl", "temperature": 4},
              {"pattern": "all_pairs", "over": ["a", "b"], "loss": "at", "taps": ["stage3"], "weight": 1000}],
    "tracking": {"enabled": False},
}


LOGITS = {**FEATURES, "name": "bench-logits", "edges": FEATURES["edges"][:1]}


def profile(raw: dict, steps: int) -> list[dict]:
    topo = load_topology(raw, {"train.epochs": 1, "train.max_steps_per_epoch": steps, "train.threads": 1,
                               "tracking.enabled": False})
    with tempfile.TemporaryDirectory() as out:
        RayEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True, profile=True)).run()
        return [json.loads(p.read_text()) for p in sorted((Path(out) / "profile").glob("rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    from readme import machine, update_readme

    cases = [("quick DML (digits logits)", yaml.safe_load((ROOT / "topologies/quick/dml.yaml").read_text())),
             ("resnet20 ×2, CIFAR-size logits", LOGITS),
             ("resnet20 ×2, stage-3 maps + logits", FEATURES)]
    rows = ["| topology | peer | compute ms | waiting ms | exchange ms | KiB/step sent | exchange share | mode |",
            "|---|---|---|---|---|---|---|---|"]
    for label, raw in cases:
        for r in profile(raw, args.steps):
            step = r["compute_ms"] + r["wait_ms"] + r["exchange_ms"]
            rows.append(f"| {label} | {','.join(r['peers'])} | {r['compute_ms']:.2f} | {r['wait_ms']:.2f} | "
                        f"{r['exchange_ms']:.2f} | {r['bytes_per_step'] / 1024:.0f} | {100 * r['exchange_ms'] / step:.1f} % "
                        f"| {r['mode']} |")
    table = "\n".join(rows) + f"\n\nMeasured on {machine()}: ray engine, 2 CPU workers × 1 thread, gloo, median of {args.steps} steps."
    print(table)
    if args.readme:
        update_readme("exchange", table)


if __name__ == "__main__":
    main()
