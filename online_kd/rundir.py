"""A run directory: where each of a run's files lives, and how its history is read back.

Layout: ``topology.yaml`` (the topology as run), ``metrics.jsonl`` (one JSON record per epoch, appended;
derived from the checkpoints, whose engine state holds the history: a resume rewrites it from the
checkpoint it restores, so no epoch is repeated or lost), ``summary.json``, ``checkpoints/`` (``latest`` names
the last complete one), ``tracker.json`` (the MLflow runs to rejoin), ``topology.png`` and
``accuracy.png``. Engines, Tune, ``plot`` and ``compare`` go through :class:`RunDir`.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write ``path`` so that a reader (or a kill) sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """One run's directory (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def topology(self) -> Path:
        return self.path / "topology.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tracker(self) -> Path:
        return self.path / "tracker.json"

    @property
    def graph_picture(self) -> Path:
        return self.path / "topology.png"

    @property
    def curves_picture(self) -> Path:
        return self.path / "accuracy.png"

    def has_checkpoint(self) -> bool:
        """A checkpoint was completed (the run can be resumed)."""
        return (self.checkpoints / "latest").is_file()

    def is_finished(self) -> bool:
        return self.summary.is_file()

    # ------------------------------------------------------------------ writing
    def append_epoch(self, record: dict) -> None:
        """Add one epoch's record to metrics.jsonl."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_history(self, history: list[dict]) -> None:
        """Replace metrics.jsonl by ``history`` at once (a resume's reconciliation with its checkpoint)."""
        atomic_write_text("".join(json.dumps(h) + "\n" for h in history), self.metrics)

    def write_summary(self, summary: dict) -> None:
        self.summary.write_text(json.dumps(summary, indent=2))

    # ------------------------------------------------------------------ reading
    def records(self) -> list[dict]:
        """metrics.jsonl's complete records as written (a line still being written or cut by a kill is left out)."""
        if not self.metrics.is_file():
            return []
        out = []
        for line in self.metrics.read_text().split("\n")[:-1]:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def history(self) -> list[dict]:
        """One record per epoch, in epoch order (an epoch re-run after a restart keeps its last record)."""
        by_epoch = {rec["epoch"]: rec for rec in self.records()}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def read_summary(self) -> dict | None:
        return json.loads(self.summary.read_text()) if self.summary.is_file() else None

    def follow(self, hook: Callable[[int, dict], None], stop: threading.Event, every: float = 0.5) -> None:
        """Call ``hook(epoch, nodes)`` for every epoch appended to metrics.jsonl until ``stop`` is set (then
        drain); an epoch re-reported after a worker restart is not passed on again."""
        done, last_epoch = 0, -1
        while True:
            final = stop.is_set()
            records = self.records()
            for rec in records[done:]:
                if rec["epoch"] > last_epoch:
                    hook(rec["epoch"], rec["nodes"])
                    last_epoch = rec["epoch"]
            done = len(records)
            if final:
                return
            stop.wait(every)


def accuracy_series(history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per node, (epoch number, top-1 %) wherever the node was evaluated."""
    series: dict[str, list[tuple[int, float]]] = {}
    for h in history:
        for n, m in h["nodes"].items():
            if "top1" in m:
                series.setdefault(n, []).append((h["epoch"], m["top1"]))
    return series

