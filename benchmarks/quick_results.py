"""Quick-topology results for the README's method table: distilled vs trained alone, mean of seeds.

For each topology, every learning peer's last-epoch top-1 with the edges on, and the same peer
with ``edges=[]`` (same seed, same epochs, same stages), averaged over the seeds.

    python benchmarks/quick_results.py                       # every topologies/quick/*.yaml, seeds 0,1,2
    python benchmarks/quick_results.py dml kd --seeds 0,1
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from online_kd.engine.local import LocalEngine, RunOptions
from online_kd.topology import load_topology

QUICK = Path(__file__).resolve().parents[1] / "topologies" / "quick"


def last_top1(path: Path, seed: int, alone: bool) -> dict[str, float]:
    overrides = {"train.seed": seed, "tracking.enabled": False}
    if alone:
        overrides["edges"] = []
    topo = load_topology(path, overrides)
    with tempfile.TemporaryDirectory() as out:
        summary = LocalEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True)).run()
    learners = {e.target for e in load_topology(path).edges}
    return {p: v["top1_last"] for p, v in summary["peers"].items() if p in learners}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="quick topology names (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = [QUICK / f"{n}.yaml" for n in args.names] or sorted(QUICK.glob("*.yaml"))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; seeds {seeds}; last-epoch top-1 %")
    print("| topology | peer | distilled | alone | gain |")
    print("|---|---|---|---|---|")
    for path in paths:
        with_edges = [last_top1(path, s, alone=False) for s in seeds]
        alone = [last_top1(path, s, alone=True) for s in seeds]
        for peer in with_edges[0]:
            d = [r[peer] for r in with_edges]
            a = [r[peer] for r in alone]
            sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
            print(f"| {path.stem} | {peer} | {statistics.mean(d):.2f} ± {sd(d):.2f} | {statistics.mean(a):.2f} ± {sd(a):.2f} "
                  f"| {statistics.mean(d) - statistics.mean(a):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
