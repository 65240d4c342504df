"""GPU throughput: images/s of a DML pair and of a KD student, per precision and accelerator option.

Two topologies on CIFAR-size synthetic data held on the device: resnet32 × 2 deep mutual learning, and
resnet32x4 → resnet8x4 Hinton KD (the student's stage: the teacher answers, frozen). Each runs with
`fp32`, `bf16`, `bf16 + channels_last` and `bf16 + channels_last + compile` (inductor), and each peer also
runs alone (trained with its CE only) so the topology's cost reads against its peers'. Steps are timed with
CUDA events after warm-up (compilation included there); peak memory is `max_memory_allocated` per run.
`--ray` instead runs the DML pair on the ray engine, both peers colocated in one GPU worker.

    python benchmarks/gpu.py                          # on the GPU, about 4 minutes
    python benchmarks/gpu.py --device cpu --steps 2   # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Interval  # noqa: E402

from online_kd.data import build_data  # noqa: E402
from online_kd.engine.runtime import Runtime  # noqa: E402
from online_kd.topology import load_topology  # noqa: E402

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}
OPT = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


def data_section(batch: int, num_train: int) -> dict:
    return {"dataset": "synthetic", "batch_size": batch,
            "synthetic": {"num_train": num_train, "num_test": 64, "shape": [3, 32, 32], "num_classes": 100}}


def cases() -> dict[str, dict]:
    """Topology bodies (peers, edges, stages) and the stage that is timed."""
    return {
        "resnet32x2 DML": {"peers": {p: {"model": "resnet32", "optimizer": OPT} for p in ("a", "b")},
                           "edges": [{"pattern": "all_pairs", "over": ["a", "b"], "loss": "kl", "temperature": 1}],
                           "stage": 0},
        "resnet32x4->resnet8x4 KD": {
            "peers": {"teacher": {"model": "resnet32x4", "optimizer": OPT}, "student": {"model": "resnet8x4", "optimizer": OPT}},
            "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 4, "alpha": 0.9}],
            "stages": [{"train": ["teacher"]}, {"train": ["student"]}], "stage": 1},
    }


def images_per_second(body: dict, train: dict, args) -> tuple[float, float]:
    """(images/s, peak GiB) of the timed stage's steps on batches already on the device."""
    device = torch.device(args.device)
    raw = {"name": "gpu", "data": data_section(args.batch, args.batch * 4), "train": {"epochs": 1, "seed": 0, **train},
           "tracking": {"enabled": False}, **{k: v for k, v in body.items() if k != "stage"}}
    topo = load_topology(raw)
    data = build_data(topo.config.data, 0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rt = Runtime(topo, data.info, device)
    stage = topo.stages[body["stage"]]
    rt.enter_stage(stage)
    batches = [b.to(device) for b in data.train_stream().epoch(0)]
    for i in range(args.warmup):
        rt.train_step(batches[i % len(batches)], 0, 0)
    with Interval(device) as t:
        for i in range(args.steps):
            rt.train_step(batches[i % len(batches)], 0, 0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return args.batch * args.steps / t.seconds, peak


def alone(body: dict, peer: str) -> dict:
    """The body with only ``peer``, trained with its CE."""
    return {"peers": {peer: body["peers"][peer]}, "edges": [], "stage": 0}


def local(args) -> None:
    print(f"images/s on {args.device} (batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"compile: {VARIANTS['bf16+channels_last+compile']['compile']}); "
          "'alone' = one peer trained with CE only; peak = max memory allocated")
    for name, body in cases().items():
        for variant, train in VARIANTS.items():
            ips, peak = images_per_second(body, train, args)
            parts = [f"{name:<26} {variant:<27} topology {ips:9.0f} img/s  peak {peak:6.2f} GiB (CUDA only)"]
            for p in body["peers"]:
                solo, solo_peak = images_per_second(alone(body, p), train, args)
                parts.append(f"{p} alone {solo:9.0f} img/s ({solo_peak:.2f} GiB)")
            print("  |  ".join(parts), flush=True)


def ray(args) -> None:
    """The DML pair on the ray engine, colocated in one worker (one GPU): the second epoch's images/s."""
    import ray as ray_lib

    from online_kd.engine.options import RunOptions
    from online_kd.engine.ray import RayEngine

    body = cases()["resnet32x2 DML"]
    steps = args.steps
    gpu = torch.device(args.device).type == "cuda"
    raw = {"name": "gpu-ray", "data": data_section(args.batch, args.batch * steps),
           "train": {"epochs": 2, "seed": 0, "precision": "bf16" if gpu else "fp32"}, "tracking": {"enabled": False},
           "peers": body["peers"], "edges": body["edges"],
           "engine": {"name": "ray", "colocate": [["a", "b"]], "resources_per_worker": {"GPU": 1} if gpu else {}}}
    with tempfile.TemporaryDirectory() as out:
        RayEngine(load_topology(raw), RunOptions(out_dir=Path(out), tracking=False, quiet=True)).run()
        epochs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    ray_lib.shutdown()
    seconds = epochs[-1]["seconds"]
    print(f"ray engine, resnet32x2 DML colocated in one {'GPU' if gpu else 'CPU'} worker: "
          f"{args.batch * steps / seconds:9.0f} img/s (epoch 2: {steps} steps and a 64-image evaluation in {seconds:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=None, help="default: 5 (2 with --steps < 5)")
    ap.add_argument("--compile-backend", default=None,
                    help="train.compile's backend (default: inductor on CUDA, aot_eager on CPU, where inductor "
                         "spends minutes compiling)")
    ap.add_argument("--ray", action="store_true", help="the ray-engine run instead of the local measurements")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = 5 if args.steps >= 5 else 2
    if args.device == "cpu":
        args.batch = min(args.batch, 16)
    backend = args.compile_backend or ("inductor" if args.device.startswith("cuda") else "aot_eager")
    VARIANTS["bf16+channels_last+compile"]["compile"] = backend
    torch.backends.cudnn.benchmark = True
    (ray if args.ray else local)(args)


if __name__ == "__main__":
    main()
