"""Peak memory per method: every topologies/cifar100/*.yaml for a few steps on CIFAR-size synthetic data.

Each method runs in a fresh subprocess (peaks do not mix) that builds the data (50 000 synthetic
3×32×32 training samples of 100 classes, generated lazily, so CRD's memory banks have CIFAR-100's
size), takes its RSS as the baseline, then builds the Runtime and trains the LAST stage (where the
student learns) for a few steps at the YAML's batch size. Checkpoints are not needed: a frozen
teacher (``frozen`` + ``init``) becomes a peer trained in a stage of its own placed first, which is
never run, so it answers in eval mode without gradients as it would from its checkpoint.

Reported per method: the peers' models and parameter counts, the edge modules' parameters and
buffers (connectors, CRD's memory banks, …; the peers' own networks excluded), the peak RSS above
the baseline and, on a GPU, ``torch.cuda.max_memory_allocated``. CRD runs twice: with its memory
bank as in the YAML and with the edge's ``queue: true``.

    python benchmarks/memory.py                        # every method, CPU (or CUDA when available)
    python benchmarks/memory.py --methods kd,crd --steps 2 --device cuda
    python benchmarks/memory.py --json | --readme
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ROOT / "topologies" / "cifar100"
NUM_TRAIN = 50_000
MARK = "@@memory-result@@ "
MiB = 2 ** 20


# ---------------------------------------------------------------------------------------------- child
def _rss_kib() -> int:
    """Resident set size now (KiB), from /proc; the peak so far where /proc is missing."""
    import resource

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ≥ 4.0), so that ru_maxrss counts from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prepare(raw: dict, batch_size: int, device: str, steps: int, threads: int) -> dict:
    """The YAML as this benchmark runs it: synthetic CIFAR-size data, no checkpoints, no tracking.

    Frozen peers and peers trained in no stage (they taught from ``init``) get a first stage of
    their own, so that they are peers without a checkpoint; the stages that follow are unchanged.
    """
    from online_kd.topology.load import resolve_like

    raw = resolve_like(dict(raw))
    old = raw.get("data") or {}
    raw["data"] = {"dataset": "synthetic", "batch_size": batch_size,
                   "synthetic": {"num_train": NUM_TRAIN, "num_test": 64, "shape": [3, 32, 32], "num_classes": 100}}
    for key in ("holdout", "sampler", "expand"):  # KDCL-General's refit, CS-KD's partners, HSAKD's rotations
        if old.get(key):
            raw["data"][key] = old[key]
    peers = {n: dict(p or {}) for n, p in raw["peers"].items()}
    stages = [dict(s) for s in raw.get("stages") or []]
    staged = {p for s in stages for p in s.get("train", [])}
    pre = [n for n, p in peers.items() if p.get("frozen") or (stages and n not in staged)]
    if not stages:
        stages = [{"name": "train", "train": [n for n in peers if n not in pre]}]
    if pre:
        stages.insert(0, {"name": "_pretrained", "train": pre})
    for p in peers.values():
        p.pop("frozen", None)
        p.pop("init", None)
    raw["peers"], raw["stages"] = peers, stages
    raw.setdefault("train", {})
    raw["train"] = {**raw["train"], "max_steps_per_epoch": steps, "threads": threads, "device": device}
    raw["tracking"] = {"enabled": False}
    return raw


def crd_queue_overrides(raw: dict) -> dict:
    """``edges[i].<queue>: true`` for every CRD edge; ValueError when CRD or its queue option is missing."""
    from online_kd.losses import LOSSES

    if "crd" not in LOSSES:
        raise ValueError("no 'crd' loss is registered (online_kd/losses/crd.py missing?)")
    fields = LOSSES["crd"].Params.model_fields
    name = "queue" if "queue" in fields else next((f for f in fields if "queue" in f), None)
    if name is None:
        raise ValueError(f"the crd loss has no queue option (its parameters: {', '.join(fields) or 'none'})")
    idx = [i for i, e in enumerate(raw.get("edges") or []) if isinstance(e, dict) and e.get("loss") == "crd"]
    if not idx:
        raise ValueError("the YAML has no edge with loss: crd")
    return {f"edges[{i}].{name}": True for i in idx}


def busiest_epoch(stage, active) -> int:
    """The first epoch of the stage with the most edges of non-zero weight (ReviewKD warms up from 0)."""
    counts = [sum(e.weight_at(k) != 0 for e in active) for k in range(stage.epochs)]
    return counts.index(max(counts)) if counts else 0


def measure(spec: dict) -> dict:
    """Runs in the child: build data, baseline, Runtime + a few steps of the last stage, peaks."""
    import gc
    import resource

    import torch

    from online_kd.data import BatchStream, build_data
    from online_kd.engine.runtime import Runtime, resolve_device
    from online_kd.topology import load_topology
    from online_kd.topology.load import read_yaml

    original = read_yaml(spec["yaml"])
    batch_size = int((original.get("data") or {}).get("batch_size", 64))
    raw = prepare(original, batch_size, spec["device"], spec["steps"], spec["threads"])
    overrides = crd_queue_overrides(raw) if spec.get("crd_queue") else {}
    topo = load_topology(raw, overrides)
    c = topo.config
    torch.set_num_threads(c.train.threads)
    torch.manual_seed(c.train.seed)
    device = resolve_device(c.train.device)
    data = build_data(c.data, c.train.seed)
    cuda = device.type == "cuda"
    if cuda:  # the CUDA context is not the method's memory: create it before the baseline
        torch.zeros(1, device=device)
        torch.cuda.synchronize(device)
    gc.collect()
    baseline = _rss_kib()
    exact = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()

    rt = Runtime(topo, data.info, device, train_targets=data.train.targets)
    rt.set_views(data.train, data.train_transform)
    stage = topo.stages[-1]
    rt.enter_stage(stage)
    epoch = busiest_epoch(stage, rt.active)
    stream = BatchStream(data.train, c.data.batch_size, c.train.seed, transform=data.train_transform, shuffle=True,
                         sampler=data.train_sampler)
    holdout = BatchStream(data.holdout, c.data.batch_size, c.train.seed, shuffle=False) \
        if data.holdout is not None else None
    done = 0
    for batch in stream.epoch(epoch):
        if done >= c.train.max_steps_per_epoch:
            break
        rt.train_step(batch, epoch, epoch)
        rt.refit_ensembles(holdout)
        done += 1
    if cuda:
        torch.cuda.synchronize(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    net_tensors = {id(t) for p in rt.peers.values() for t in [*p.net.parameters(), *p.net.buffers()]}
    edge_params = edge_buffers = 0
    seen = set()
    for p in rt.peers.values():
        for kind, tensors in (("p", p.edges.parameters()), ("b", p.edges.buffers())):
            for t in tensors:
                if id(t) in seen or id(t) in net_tensors:  # a loss holding the source net is not its own memory
                    continue
                seen.add(id(t))
                if kind == "p":
                    edge_params += t.numel() * t.element_size()
                else:
                    edge_buffers += t.numel() * t.element_size()
    return {
        "peers": [{"name": n, "model": p.cfg.model, "params": sum(t.numel() for t in p.net.parameters()),
                   "trained": n in stage.train} for n, p in rt.peers.items()],
        "edges": [e.key for e in rt.active],
        "stage": stage.name, "epoch_in_stage": epoch, "steps": done, "batch_size": c.data.batch_size,
        "edge_param_mib": edge_params / MiB, "edge_buffer_mib": edge_buffers / MiB,
        "edge_mib": (edge_params + edge_buffers) / MiB,
        "baseline_rss_mib": baseline / 1024, "peak_rss_mib": peak / 1024,
        "rss_increase_mib": (peak - baseline) / 1024, "peak_reset": exact,
        "gpu_peak_mib": torch.cuda.max_memory_allocated(device) / MiB if cuda else None,
        "device": str(device), "seconds": round(time.perf_counter() - t0, 1),
    }


def child(spec: dict) -> None:
    try:
        out = measure(spec)
    except BaseException as err:  # the parent reports it as a skipped method
        msg = str(err).strip().splitlines()
        out = {"error": f"{type(err).__name__}: {msg[0] if msg else ''}"[:300]}
    print(MARK + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------- parent
def run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit status {proc.returncode}: {tail}"[:300]}
    return json.loads(lines[-1][len(MARK):])


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def peers_cell(r: dict) -> str:
    return ", ".join(f"{p['name']}: {p['model']} {fmt_params(p['params'])}" + ("" if p["trained"] else " (frozen)")
                     for p in r["peers"])


def table(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    gpu = any(r.get("gpu_peak_mib") is not None for r in ok)
    head = "| method | peers (models) | edge-module params+buffers MiB | peak RSS increase MiB |" + \
           (" GPU peak MiB |" if gpu else "")
    rows = [head, "|---|---|---|---|" + ("---|" if gpu else "")]
    for r in ok:
        row = f"| {r['method']} | {peers_cell(r)} | {r['edge_mib']:.2f} | {r['rss_increase_mib']:.0f} |"
        if gpu:
            row += f" {r['gpu_peak_mib']:.0f} |" if r.get("gpu_peak_mib") is not None else " – |"
        rows.append(row)
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--methods", help="comma-separated YAML names under topologies/cifar100 (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per method")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    yamls = sorted(TOPOLOGIES.glob("*.yaml"))
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        missing = [m for m in wanted if not (TOPOLOGIES / f"{m}.yaml").is_file()]
        if missing:
            raise SystemExit(f"no topologies/cifar100/{missing[0]}.yaml")
        yamls = [TOPOLOGIES / f"{m}.yaml" for m in wanted]
    jobs = [(y.stem, {"yaml": str(y)}) for y in yamls]
    notes: list[str] = []
    if any(m == "crd" for m, _ in jobs):
        jobs.insert([m for m, _ in jobs].index("crd") + 1, ("crd + queue", {"yaml": str(TOPOLOGIES / "crd.yaml"),
                                                                           "crd_queue": True}))
    elif not args.methods:
        notes.append("no topologies/cifar100/crd.yaml yet: CRD's bank against its queue was not measured")

    results = []
    for method, spec in jobs:
        spec.update(device=args.device, steps=args.steps, threads=args.threads)
        t0 = time.perf_counter()
        r = {"method": method, **run_child(spec, args.timeout)}
        results.append(r)
        took = time.perf_counter() - t0
        if "error" in r:
            notes.append(f"{method} skipped: {r['error']}")
            print(f"  {method:<14} skipped ({took:.0f} s): {r['error']}", file=sys.stderr, flush=True)
        else:
            print(f"  {method:<14} +{r['rss_increase_mib']:.0f} MiB RSS, edge modules {r['edge_mib']:.2f} MiB "
                  f"({took:.0f} s)", file=sys.stderr, flush=True)
            if not r["peak_reset"]:
                notes.append(f"{method}: the RSS high-water mark could not be reset after the baseline, so the "
                             "increase may include a peak from before it")

    by = {r["method"]: r for r in results if "error" not in r}
    if "crd" in by and "crd + queue" in by:
        b, q = by["crd"], by["crd + queue"]
        notes.insert(0, f"CRD bank → queue: edge modules {b['edge_mib']:.2f} → {q['edge_mib']:.2f} MiB, "
                        f"peak RSS increase {b['rss_increase_mib']:.0f} → {q['rss_increase_mib']:.0f} MiB")
    if args.json:
        print(json.dumps({"results": results, "notes": notes}, indent=2))
        return
    ok = [r for r in results if "error" not in r]
    device = ok[0]["device"] if ok else args.device
    batches = sorted({r["batch_size"] for r in ok})
    text = table(results) + "\n\n" + (
        f"Peak over {args.steps} training steps of each YAML's last stage at its batch size "
        f"({'/'.join(map(str, batches))}) on {NUM_TRAIN} synthetic 3×32×32 samples of 100 classes, device {device}, "
        f"{args.threads} threads; RSS above the process's RSS after imports and data, one fresh process per method. "
        "Edge modules: the losses' own parameters and buffers (connectors, memory banks), not the peers' networks.")
    if args.readme:
        from readme import machine, update_readme

        text += f" Measured on {machine()}."
    print(text)
    for n in notes:
        print(f"- {n}")
    if args.readme:
        update_readme("memory", text + "".join(f"\n\n{n}" for n in notes if n.startswith("CRD")))


if __name__ == "__main__":
    main()
