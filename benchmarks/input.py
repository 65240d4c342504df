"""Input pipeline: per-step time of a DML step fed by the loader vs with the batches already on the device.

Two data sets: an image folder of JPEGs decoded and augmented at 224 px (RandomResizedCrop + flip per image,
generated into a temporary folder from upscaled digits), and a CIFAR-size uint8 set in memory (pad-crop-flip).
For each, rounds alternate three feeds of the same steps: `resident` (the epoch's batches loaded to the device
beforehand: the floor), `prefetch` (data.workers loader processes) and `sync` (data.workers=0: the training
thread loads). Prints the medians and the ratios to `resident` (goal for prefetch: ≤ 1.10 where the loader
has a core of its own). On CUDA the step is timed with CUDA events and batches come from pinned memory.

    python benchmarks/input.py                       # trainer 1 thread, 1 loader process
    python benchmarks/input.py --device cuda --threads 4 --workers 4 --readme
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Interval  # noqa: E402

from online_kd.data import BatchStream, PadCropFlip, TensorDataset, build_data  # noqa: E402
from online_kd.data.prefetch import LoaderOptions  # noqa: E402
from online_kd.engine.runtime import Runtime  # noqa: E402
from online_kd.topology import load_topology  # noqa: E402

SMALL_FAST = {"widths": [16, 32, 64], "strides": [4, 2, 2]}  # a step of tens of ms at 224 px on one core


def write_jpegs(root: Path, per_class: int, classes: int = 4) -> None:
    """Upscaled, coloured, noisy digits as ~300 px JPEGs in ``root/{train,val}/<class>/``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
            rows = np.flatnonzero(d.target == c)
            for i in range(n):
                img = Image.fromarray((d.images[rows[i % len(rows)]] * 15).astype(np.uint8))
                w, h = (int(v) for v in rng.integers(260, 340, 2))
                arr = np.asarray(img.resize((w, h), Image.BILINEAR))[..., None] * rng.uniform(0.3, 1.0, 3)
                arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(root / split / str(c) / f"{i}.jpg", quality=90)


def topology(data: dict, model: str, model_args: dict):
    return load_topology({
        "name": "input", "data": data, "train": {"epochs": 1, "seed": 0},
        "peers": {p: {"model": model, "model_args": model_args} for p in ("a", "b")},
        "edges": [{"pattern": "all_pairs", "over": ["a", "b"], "loss": "kl", "temperature": 1}],
        "tracking": {"enabled": False},
    })


def jpeg_case(tmp: Path, args):
    write_jpegs(tmp, per_class=(args.steps + 2) * args.batch // 4)
    topo = topology({"dataset": "imagefolder", "root": str(tmp), "image_size": 224, "batch_size": args.batch},
                    "convnet", SMALL_FAST)
    data = build_data(topo.config.data, 0)
    return topo, data, lambda loader: BatchStream(data.train, args.batch, 0, data.train_transform, loader=loader)


def cifar_case(args):
    n, batch = (args.steps + 2) * 128, 128
    topo = topology({"dataset": "synthetic", "batch_size": batch,
                     "synthetic": {"num_train": n, "num_test": 8, "shape": [3, 32, 32], "num_classes": 100}},
                    "resnet8", {})
    data = build_data(topo.config.data, 0)
    g = torch.Generator().manual_seed(0)
    images = TensorDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                           torch.randint(0, 100, (n,), generator=g), [0.5] * 3, [0.25] * 3, scale=1 / 255)
    aug = PadCropFlip(0, pad=4, flip=True, fill=images.pad_fill)
    return topo, data, lambda loader: BatchStream(images, batch, 0, aug, loader=loader)


def measure(name: str, topo, data, make_stream, args) -> dict:
    device = torch.device(args.device)
    rt = Runtime(topo, data.info, device)
    rt.enter_stage(topo.stages[0])
    feeds = {"resident": LoaderOptions(0), "prefetch": LoaderOptions(args.workers, args.prefetch).on(device),
             "sync": LoaderOptions(0)}
    for b in list(make_stream(feeds["sync"]).epoch(0))[:2]:
        rt.train_step(b.to(device), 0, 0)  # warm-up
    times = {k: [] for k in feeds}
    cpu = {k: [] for k in feeds}  # the training process's own CPU time: what loading costs it
    for r in range(args.rounds):
        order = list(feeds) if r % 2 == 0 else list(feeds)[::-1]
        for feed in order:
            epoch = r + 1
            stream = make_stream(feeds[feed])
            if feed == "resident":
                batches = iter([b.to(device) for b in list(stream.epoch(epoch))[:args.steps + 1]])
            else:
                batches = stream.epoch(epoch)
            rt.train_step(next(batches), epoch, 0)  # the first batch: loader start-up, not a steady step
            c0 = time.process_time()
            with Interval(device) as t:
                for _ in range(args.steps):
                    rt.train_step(next(batches), epoch, 0)
            cpu[feed].append((time.process_time() - c0) / args.steps)
            if hasattr(batches, "close"):
                batches.close()
            times[feed].append(t.seconds / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, **{f"{k}_ms": round(1e3 * v, 2) for k, v in med.items()},
            **{f"{k}_cpu_ms": round(1e3 * statistics.median(v), 1) for k, v in cpu.items()},
            "prefetch_ratio": round(med["prefetch"] / med["resident"], 3),
            "sync_ratio": round(med["sync"] / med["resident"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="trainer's torch threads")
    ap.add_argument("--workers", type=int, default=1, help="loader processes for the prefetch feed")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="JPEG batch (the CIFAR-size batch is 128)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure("JPEG folder, 224 px, batch " + str(args.batch), *jpeg_case(Path(tmp), args), args),
                   measure("CIFAR-size in memory, batch 128", *cifar_case(args), args)]
    threads = (f"trainer {args.threads} thread(s); prefetch: {args.workers} loader process(es), 1 decode thread each; "
               f"sync: the training thread, decoding JPEGs in {min(8, os.cpu_count() or 1)} threads")
    load = "load average {:.1f} {:.1f} {:.1f} on {} cores".format(*os.getloadavg(), os.cpu_count())
    print(f"input pipeline, {args.device} ({threads}; {load})")
    for r in results:
        print(f"  {r['case']:<34} resident {r['resident_ms']:8.2f} ms  prefetch {r['prefetch_ms']:8.2f} ms "
              f"({r['prefetch_ratio']:.3f})  sync {r['sync_ms']:8.2f} ms ({r['sync_ratio']:.3f})  trainer CPU ms/step: "
              f"resident {r['resident_cpu_ms']}, prefetch {r['prefetch_cpu_ms']}, sync {r['sync_cpu_ms']}")
    if args.readme:
        from readme import machine, update_readme

        rows = ["| data | resident ms/step | prefetch ms/step | ratio | sync ms/step | ratio | trainer CPU ms/step "
                "(resident / prefetch / sync) |", "|---|---|---|---|---|---|---|"]
        rows += [f"| {r['case']} | {r['resident_ms']:.1f} | {r['prefetch_ms']:.1f} | {r['prefetch_ratio']:.3f} | "
                 f"{r['sync_ms']:.1f} | {r['sync_ratio']:.3f} | {r['resident_cpu_ms']} / {r['prefetch_cpu_ms']} / "
                 f"{r['sync_cpu_ms']} |" for r in results]
        update_readme("input", "\n".join(rows) + f"\n\nMeasured on {machine()} ({args.device}; {threads}), "
                      f"medians of {args.rounds} alternating rounds of {args.steps} steps; {load} at the end.")


if __name__ == "__main__":
    main()
