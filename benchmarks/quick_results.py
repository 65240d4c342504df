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
import yaml

from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.topology import load_topology

QUICK = Path(__file__).resolve().parents[1] / "topologies" / "quick"

# method → (paper, cifar100 YAML, reference CIFAR-100 top-1 with its source)
METHODS = {
    "dml": ("Deep Mutual Learning (Zhang et al., CVPR 2018)", "cifar100/dml.yaml",
            "ResNet-32 ×2: 71.19 vs 68.99 alone (paper; no official CIFAR code, unverified)"),
    "kd": ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "cifar100/kd.yaml",
           "resnet32x4→resnet8x4: 73.33 (RepDistiller README, last epoch)"),
    "kdcl": ("Online KD via Collaborative Learning, MinLogit (Guo et al., CVPR 2020)", "cifar100/kdcl.yaml",
             "— (no official code; paper figures not verified)"),
    "kdcl_general": ("Online KD via Collaborative Learning, General + views (Guo et al., CVPR 2020)",
                     "cifar100/kdcl_general.yaml", "— (no official code; paper figures not verified)"),
    "takd": ("Teacher Assistant KD (Mirzadeh et al., AAAI 2020)", "cifar100/takd.yaml",
             "R110→R20→R8: 61.82 (maintainer, official repo issue #7)"),
    "afd": ("Feature-map-level Online Adversarial KD (Chung et al., ICML 2020)", "cifar100/afd_ring3.yaml",
            "— (no public code; paper figures not verified)"),
    "at": ("Paying More Attention to Attention (Zagoruyko & Komodakis, ICLR 2017)", "cifar100/at.yaml",
           "resnet32x4→resnet8x4: 73.44 (RepDistiller README)"),
    "fitnet": ("FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)", "cifar100/fitnet.yaml",
               "resnet32x4→resnet8x4: 73.50 (RepDistiller README)"),
    "fsp": ("A Gift from Knowledge Distillation (Yim et al., CVPR 2017)", "cifar100/fsp.yaml",
            "resnet32x4→resnet8x4: 72.62 (RepDistiller README)"),
    "sp": ("Similarity-Preserving KD (Tung & Mori, ICCV 2019)", "cifar100/sp.yaml",
           "resnet32x4→resnet8x4: 72.94 (RepDistiller README)"),
    "rkd": ("Relational KD (Park et al., CVPR 2019)", "cifar100/rkd.yaml",
            "resnet32x4→resnet8x4: 71.90 (RepDistiller README)"),
    "crd": ("Contrastive Representation Distillation (Tian et al., ICLR 2020)", "cifar100/crd.yaml",
            "resnet32x4→resnet8x4: 75.51 (RepDistiller README)"),
    "ofd": ("A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019)", "cifar100/ofd.yaml",
            "resnet32x4→resnet8x4: 74.95 (third-party tables, CRD protocol)"),
    "reviewkd": ("Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021)", "cifar100/reviewkd.yaml",
                 "resnet32x4→resnet8x4: 75.63 (paper, via a third-party table)"),
    "hsakd": ("Hierarchical Self-supervised Augmented KD (Yang et al., IJCAI 2021)", "cifar100/hsakd.yaml",
              "WRN-40-2→WRN-16-2: 78.67 (HSAKD*, official README)"),
    "hsakd_online": ("HSAKD, online two-peer variant (Yang et al., IJCAI 2021)", "cifar100/hsakd_online.yaml",
                     "— (official online script; no README figure)"),
    "tfkd_self": ("Revisiting KD via Label Smoothing Regularization, Tf-KD self (Yuan et al., CVPR 2020)",
                  "cifar100/tfkd_self.yaml", "ShuffleNetV2: 72.23 vs 70.34 alone (official README)"),
    "tfkd_virtual": ("Revisiting KD via Label Smoothing Regularization, virtual teacher (Yuan et al., CVPR 2020)",
                     "cifar100/tfkd_virtual.yaml", "ShuffleNetV2: 72.09 vs 70.34 alone (official README)"),
    "label_smoothing": ("Label smoothing (Szegedy et al., 2016), as Tf-KD's LSR baseline", "cifar100/label_smoothing.yaml",
                        "— (Tf-KD's LSR baseline; figures not verified)"),
    "cskd": ("Regularizing Class-wise Predictions via Self-KD (Yun et al., CVPR 2020)", "cifar100/cskd.yaml",
             "ResNet-18: ≈78.0 (22.0 % error, paper; unverified)"),
    "kd_init": ("On the Demystification of KD: A Residual Network Perspective (Jha et al., 2020)",
                "cifar100/kd_init.yaml", "— (no public code)"),
    "bss": ("KD with Adversarial Samples Supporting Decision Boundary (Heo et al., AAAI 2019)", "cifar10/bss.yaml",
            "CIFAR-10 only (official code); figures not verified"),
    "deepinversion": ("Dreaming to Distill: Data-free KD via DeepInversion (Yin et al., CVPR 2020)",
                      "cifar10/deepinversion.yaml", "— (official code releases synthesis only, CIFAR-10)"),
    "bnstats": ("The Knowledge Within: BN-statistics synthesis (Haroush et al., CVPR 2020)", "cifar10/bnstats.yaml",
                "— (no public code)"),
    "active_mixup": ("Neural Networks Are More Productive Teachers Than Human Raters: Active Mixup (Wang et al., "
                     "CVPR 2020)", "cifar10/active_mixup.yaml", "— (CIFAR-10 only; figures not verified)"),
    "infoflow": ("Heterogeneous KD via Information Flow Modeling (Passalis et al., CVPR 2020)",
                 "cifar100/infoflow.yaml", "— (official results are CIFAR-10 retrieval mAP)"),
}


# What "alone" means where `edges=[]` is not the whole baseline (each YAML's header says the same):
# more overrides for the alone run, or, where the baseline is a peer of the same run, (peer, its baseline).
ALONE_OVERRIDES = {
    "hsakd": {"data.expand": "none"},          # CE on unrotated images, no rotation expansion
    "hsakd_online": {"data.expand": "none"},
}
SAME_RUN_BASELINE = {
    "active_mixup": ("s2", "s0"),  # two rounds of mixes vs the student trained on the 100-image pool alone
}


def last_top1(path: Path, seed: int, alone: bool) -> dict[str, float]:
    raw = yaml.safe_load(path.read_text())
    overrides = {"train.seed": seed, "tracking.enabled": False}
    if alone:  # the same peers, stages and epochs, with no edge (and no stage naming one)
        raw["edges"] = []
        for stage in raw.get("stages", []):
            stage.pop("edges", None)
        overrides.update(ALONE_OVERRIDES.get(path.stem, {}))
    topo = load_topology(raw, overrides)
    with tempfile.TemporaryDirectory() as out:
        summary = LocalEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True)).run()
    learners = {e.target for e in load_topology(path).edges if e.target != e.source}
    learners = learners or {e.target for e in load_topology(path).edges}  # self-distillation: the peer itself
    return {p: v["top1_last"] for p, v in summary["peers"].items() if p in learners}


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _cell(name: str, d: list[float], a: list[float], a_name: str = "alone") -> str:
    vs = "vs" if a_name == "alone" else f"vs {a_name}"
    return (f"{name}: {statistics.mean(d):.1f} ± {_sd(d):.1f} {vs} {statistics.mean(a):.1f} ± {_sd(a):.1f} "
            f"({statistics.mean(d) - statistics.mean(a):+.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="quick topology names (default: all)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--readme", action="store_true", help="write the method table into README.md")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = [QUICK / f"{n}.yaml" for n in args.names] or sorted(QUICK.glob("*.yaml"))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads; seeds {seeds}; last-epoch top-1 %")
    rows = []
    for path in paths:
        with_edges = [last_top1(path, s, alone=False) for s in seeds]
        if path.stem in SAME_RUN_BASELINE:
            peer, base = SAME_RUN_BASELINE[path.stem]
            cells = [_cell(peer, [r[peer] for r in with_edges], [r[base] for r in with_edges], base)]
        else:
            alone = [last_top1(path, s, alone=True) for s in seeds]
            cells = [_cell(peer, [r[peer] for r in with_edges], [r[peer] for r in alone]) for peer in with_edges[0]]
        paper, yaml_path, ref = METHODS.get(path.stem, ("", "", ""))
        row = f"| {path.stem} | {paper} | `topologies/{yaml_path}`, `topologies/quick/{path.stem}.yaml` | {ref} | {'; '.join(cells)} |"
        print(row, flush=True)
        rows.append(row)
    if args.readme:
        write_rows(rows, len(seeds))


def write_rows(rows: list[str], n_seeds: int) -> None:
    """Put these rows into the README's method table, keeping the other methods' rows, in METHODS order."""
    import re

    from readme import README, machine, update_readme

    text = README.read_text()
    section = re.search(r"<!-- bench:methods -->\n(.*?)<!-- /bench:methods -->", text, re.S)
    table = {r.split("|")[1].strip(): r for r in (section.group(1).splitlines() if section else []) if r.startswith("|")}
    table.update({r.split("|")[1].strip(): r for r in rows})
    order = [m for m in METHODS if m in table] + [m for m in table if m not in METHODS]
    update_readme("methods", "\n".join(table[m] for m in order))
    note = (f"Quick results: last-epoch top-1 on the digits test split, mean ± sd over {n_seeds} seeds, measured on "
            f"{machine()} by `benchmarks/quick_results.py`; 'vs' is the same YAML with `edges=[]` (the peer alone).")
    text = README.read_text()
    text = re.sub(r"\nQuick results: [^\n]*\n\n*", "\n", text)  # this note only; the notes after it stay
    README.write_text(text.replace("<!-- /bench:methods -->\n", "<!-- /bench:methods -->\n\n" + note + "\n\n", 1))

if __name__ == "__main__":
    main()
