"""Per-epoch records: what an epoch logs, built the same way by both engines.

The checkpoint is an epoch's commit point and its engine state holds the history (one record
per epoch). ``metrics.jsonl`` and the MLflow metrics are derived: a resume rewrites
``metrics.jsonl`` from the checkpoint's history and MLflow skips the steps it already holds
(:meth:`online_kd.tracking.RunTracker.resume`), so a kill at any point of the write path
neither repeats nor loses an epoch. Both engines build records with :func:`epoch_record`.
"""
from __future__ import annotations

from typing import Any


def best(history: list[dict], node: str) -> tuple[float, int] | None:
    """(best top-1, its epoch number) of ``node`` over ``history``."""
    out = None
    for h in history:
        m = h["nodes"].get(node, {})
        if "top1" in m and (out is None or m["top1"] > out[0]):
            out = (m["top1"], h["epoch"])
    return out


def epoch_record(nodes_order: list[str], history: list[dict], epoch: int, stage: str, train: dict, evals: dict,
                 seconds: float) -> dict[str, Any]:
    """The record of ``epoch`` (the loop's 0-based index): each node's train and eval metrics, with its best
    top-1 so far. A record numbers its epoch from 1, as the console, summary.json, MLflow steps and
    checkpoint folders do: the number of an epoch is the count of epochs done when it ends."""
    nodes: dict[str, dict[str, float]] = {}
    for node in [n for n in nodes_order if n in train or n in evals]:
        nodes[node] = {**train.get(node, {}), **evals.get(node, {})}
    for node, m in nodes.items():
        if "top1" in m:
            prev = best(history, node)
            m["best_top1"] = max(m["top1"], prev[0]) if prev else m["top1"]
    return {"epoch": epoch + 1, "stage": stage, "seconds": seconds, "nodes": nodes}


def merge_reports(metrics: list[dict]) -> tuple[int, str, dict, dict, float]:
    """(epoch, stage, train, evals, seconds) of one epoch from every ray rank's report."""
    train: dict[str, dict] = {}
    evals: dict[str, dict] = {}
    for m in metrics:
        train.update(m.get("train", {}))
        evals.update(m.get("eval", {}))
    return metrics[0]["epoch"], metrics[0]["stage"], train, evals, max(m["seconds"] for m in metrics)
