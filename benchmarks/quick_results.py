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

# method → (paper, cifar100 YAML, reference top-1 with its source and whether it is the last or the best
# epoch, how the YAML still differs from the official setting and why; "none known" after the issue-14 audit)
LAST = "last epoch"
METHODS = {
    "dml": ("Deep Mutual Learning (Zhang et al., CVPR 2018)", "cifar100/dml.yaml",
            "ResNet-32 ×2: 71.19 vs 68.99 alone (paper; epoch not stated; no official CIFAR code, unverified)",
            "no official code: settings from the paper"),
    "kd": ("Distilling the Knowledge in a Neural Network (Hinton et al., 2015)", "cifar100/kd.yaml",
           f"resnet32x4→resnet8x4: 73.33 (RepDistiller README, {LAST})", "none known"),
    "kdcl": ("Online KD via Collaborative Learning, MinLogit (Guo et al., CVPR 2020)", "cifar100/kdcl.yaml",
             "— (no official code; paper figures not verified)", "no official code: settings from the paper"),
    "kdcl_general": ("Online KD via Collaborative Learning, General + views (Guo et al., CVPR 2020)",
                     "cifar100/kdcl_general.yaml", "— (no official code; paper figures not verified)",
                     "no official code: settings from the paper"),
    "takd": ("Teacher Assistant KD (Mirzadeh et al., AAAI 2020)", "cifar100/takd.yaml",
             "R110→R20→R8: 61.82 (maintainer, official repo issue #7, best epoch)",
             "none known (per-link λ/T as the maintainer's best links; the code's lr and KL quirks kept)"),
    "afd": ("Feature-map-level Online Adversarial KD (Chung et al., ICML 2020)", "cifar100/afd_ring3.yaml",
            "— (no public code; paper figures not verified)", "no public code: settings from the paper"),
    "at": ("Paying More Attention to Attention (Zagoruyko & Komodakis, ICLR 2017)", "cifar100/at.yaml",
           f"resnet32x4→resnet8x4: 73.44 (RepDistiller README, {LAST})", "none known"),
    "fitnet": ("FitNets: Hints for Thin Deep Nets (Romero et al., ICLR 2015)", "cifar100/fitnet.yaml",
               f"resnet32x4→resnet8x4: 73.50 (RepDistiller README, {LAST})",
               "none known (RepDistiller's one-stage `--distill hint`; the paper's two stages: fitnet_two_stage.yaml)"),
    "fitnet_two_stage": ("FitNets, the paper's hint stage then KD (Romero et al., ICLR 2015)",
                         "cifar100/fitnet_two_stage.yaml", "— (no figure for the two-stage form on this pair)",
                         "RepDistiller's figure is the one-stage form (fitnet row)"),
    "fsp": ("A Gift from Knowledge Distillation (Yim et al., CVPR 2017)", "cifar100/fsp.yaml",
            f"resnet32x4→resnet8x4: 72.62 (RepDistiller README, {LAST})", "none known"),
    "sp": ("Similarity-Preserving KD (Tung & Mori, ICCV 2019)", "cifar100/sp.yaml",
           f"resnet32x4→resnet8x4: 72.94 (RepDistiller README, {LAST})", "none known"),
    "rkd": ("Relational KD (Park et al., CVPR 2019)", "cifar100/rkd.yaml",
            f"resnet32x4→resnet8x4: 71.90 (RepDistiller README, {LAST})", "none known"),
    "crd": ("Contrastive Representation Distillation (Tian et al., ICLR 2020)", "cifar100/crd.yaml",
            f"resnet32x4→resnet8x4: 75.51 (RepDistiller README, {LAST})", "none known"),
    "ofd": ("A Comprehensive Overhaul of Feature Distillation (Heo et al., ICCV 2019)", "cifar100/ofd.yaml",
            "resnet32x4→resnet8x4: 74.95 (mdistiller's table, CRD protocol; epoch not stated)",
            "CRD protocol as that figure, but reflect padding and the teacher's BN in train mode as the official "
            "OFD code (mdistiller pads with zeros, teacher in eval mode; both one `--set` away)"),
    "reviewkd": ("Distilling Knowledge via Knowledge Review (Chen et al., CVPR 2021)", "cifar100/reviewkd.yaml",
                 "resnet32x4→resnet8x4: 75.63 (paper, via mdistiller's table; epoch not stated, the official "
                 "train.py tracks the best)", "none known (teacher BN in train mode, as the official train.py)"),
    "hsakd": ("Hierarchical Self-supervised Augmented KD (Yang et al., IJCAI 2021)", "cifar100/hsakd.yaml",
              "WRN-40-2→WRN-16-2: 78.67 (HSAKD*, official README, best epoch)", "none known"),
    "hsakd_online": ("HSAKD, online two-peer variant (Yang et al., IJCAI 2021)", "cifar100/hsakd_online.yaml",
                     "— (official online script; no README figure)", "none known"),
    "tfkd_self": ("Revisiting KD via Label Smoothing Regularization, Tf-KD self (Yuan et al., CVPR 2020)",
                  "cifar100/tfkd_self.yaml", "ShuffleNetV2: 72.23 vs 70.34 alone (official README, best epoch)",
                  "network: RepDistiller's CIFAR ShuffleNetV2 (Tf-KD uses its own implementation)"),
    "tfkd_virtual": ("Revisiting KD via Label Smoothing Regularization, virtual teacher (Yuan et al., CVPR 2020)",
                     "cifar100/tfkd_virtual.yaml", "ShuffleNetV2: 72.09 vs 70.34 alone (official README, best epoch)",
                     "network: RepDistiller's CIFAR ShuffleNetV2 (Tf-KD uses its own implementation)"),
    "label_smoothing": ("Label smoothing (Szegedy et al., 2016), as Tf-KD's LSR baseline", "cifar100/label_smoothing.yaml",
                        "— (the Tf-KD README gives no LSR figure for ShuffleNetV2)",
                        "network: RepDistiller's CIFAR ShuffleNetV2 (Tf-KD uses its own implementation)"),
    "cskd": ("Regularizing Class-wise Predictions via Self-KD (Yun et al., CVPR 2020)", "cifar100/cskd.yaml",
             "ResNet-18: ≈78.0 (22.0 % error, paper, best epoch; unverified)",
             "normalisation: CIFAR-100 statistics (the official code uses CIFAR-10's); network: the paper's "
             "PreAct ResNet-18 (`preact_resnet18`, 11.2M parameters) as officially"),
    "kd_init": ("On the Demystification of KD: A Residual Network Perspective (Jha et al., 2020)",
                "cifar100/kd_init.yaml", "— (no public code)", "no public code: settings from the paper"),
    "bss": ("KD with Adversarial Samples Supporting Decision Boundary (Heo et al., AAAI 2019)", "cifar10/bss.yaml",
            "CIFAR-10 only (official code); figures not verified",
            "CIFAR-10 normalisation statistics (networks: ResNet-8/26 with the official zero-padding shortcuts, "
            "`resnet{8,26}_zeropad`); the optimizer is not recreated at the lr drops (momentum kept)"),
    "deepinversion": ("Dreaming to Distill: Data-free KD via DeepInversion (Yin et al., CVPR 2020)",
                      "cifar10/deepinversion.yaml", "— (official code releases synthesis only, CIFAR-10)",
                      "pair resnet56→resnet20 (the paper's ResNet-34→18 is not in the zoo); the KD recipe is ours "
                      "(the official code has none)"),
    "bnstats": ("The Knowledge Within: BN-statistics synthesis (Haroush et al., CVPR 2020)", "cifar10/bnstats.yaml",
                "— (no public code)", "no public code: settings from the paper"),
    "active_mixup": ("Neural Networks Are More Productive Teachers Than Human Raters: Active Mixup (Wang et al., "
                     "CVPR 2020)", "cifar10/active_mixup.yaml",
                     "— (CIFAR-10 only; figures not verified; the official code reports the best epoch)",
                     "inputs normalised (network: the official VGG-16 with 5 max-pools, `vgg16_5pool`), mixes kept "
                     "in float, momentum kept at the lr drops"),
    "infoflow": ("Heterogeneous KD via Information Flow Modeling (Passalis et al., CVPR 2020)",
                 "cifar100/infoflow.yaml", "— (official results are CIFAR-10 retrieval mAP)", "none known"),
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


def method_row(name: str, quick_cell: str) -> str:
    """One row of the README's method table (the quick-results cell comes from a run)."""
    paper, yaml_path, ref, differs = METHODS.get(name, ("", "", "", ""))
    return (f"| {name} | {paper} | `topologies/{yaml_path}`, `topologies/quick/{name}.yaml` | {ref} | {differs} "
            f"| {quick_cell} |")


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
        row = method_row(path.stem, "; ".join(cells))
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
