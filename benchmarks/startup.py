"""Time to first training step of the local and the ray engine: the same CLI run, the same topology.

Each engine runs ``online-kd run topologies/quick/dml.yaml --record-steps`` in a fresh subprocess
(MLflow on, as by default, into a temporary directory); the first step is the moment the step log
(<out>/steps/*.jsonl, flushed every step) holds its first line. Prints both times, their ratio and
difference, and each run's total time. With ``--readme`` the table goes into the README.
Run it alone on the machine (the ray engine starts a local Ray instance).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "topologies" / "quick" / "dml.yaml"


def first_step(engine: str, sets: list[str], timeout: float) -> tuple[float, float]:
    """(seconds to the first step's line in the step log, seconds until the process exited) of one CLI run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "online_kd.cli", "run", str(TOPOLOGY), "--engine", engine, "--out", str(out),
               "--record-steps", "--quiet", *[a for s in sets for a in ("--set", s)]]
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = None
        while first is None and proc.poll() is None and time.monotonic() - t0 < timeout:
            if any(f.stat().st_size for f in (out / "steps").glob("*.jsonl")):
                first = time.monotonic() - t0
            else:
                time.sleep(0.05)
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
        total = time.monotonic() - t0
        err = proc.stderr.read()
        if proc.returncode != 0 or first is None:
            raise SystemExit(f"{engine}: no first step (exit {proc.returncode}):\n{err[-2000:]}")
        return first, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating (median reported)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from readme import machine, update_readme

    sets = ["train.epochs=1", "train.max_steps_per_epoch=5", "train.threads=1"]
    times: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    for _ in range(args.repeats):
        for engine in times:
            times[engine].append(first_step(engine, sets, args.timeout))
    med = {e: (statistics.median(f for f, _ in t), statistics.median(s for _, s in t)) for e, t in times.items()}
    (lf, lt), (rf, rt) = med["local"], med["ray"]
    table = ("| engine | first training step | whole run (1 epoch × 5 steps) |\n|---|---|---|\n"
             f"| local | {lf:.1f} s | {lt:.1f} s |\n"
             f"| ray (2 workers × 1 thread) | {rf:.1f} s | {rt:.1f} s |\n"
             f"| ray / local | {rf / lf:.1f}× (+{rf - lf:.1f} s) | {rt / lt:.1f}× |\n\n"
             f"Measured on {machine()} (shared with other jobs), `online-kd run topologies/quick/dml.yaml` with "
             f"MLflow on, {'median of ' + str(args.repeats) + ' runs' if args.repeats > 1 else 'one run'} per engine "
             f"from process start (`python benchmarks/startup.py`).")
    print(table)
    if args.readme:
        update_readme("startup", table)


if __name__ == "__main__":
    main()
