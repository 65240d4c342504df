"""Inside one Tune trial: a full topology run with the trial's overrides, reporting its epochs to Tune."""
from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..compare import SEED_PATH
from ..rundir import RunDir
from ..topology.load import apply_overrides, load_topology, set_path


# ---------------------------------------------------------------------- inside a trial
def tune_metrics(nodes: dict[str, dict], peers, ensembles) -> dict[str, float]:
    """One epoch's node metrics under the space's names: peers.<p>.top1, ensemble.<e>.top1, peers.mean.top1."""
    out: dict[str, float] = {}
    for node, m in nodes.items():
        prefix = "peers" if node in peers else "ensemble" if node in ensembles else None
        if prefix is None:
            continue
        for key in ("top1", "top5", "loss"):
            if key in m:
                out[f"{prefix}.{node}.{key}"] = float(m[key])
    for key in ("top1", "top5", "loss"):
        values = [float(nodes[p][key]) for p in peers if key in nodes.get(p, {})]
        if values:
            out[f"peers.mean.{key}"] = sum(values) / len(values)
    return out


class TuneReport:
    """Per-epoch hook of a trial: sends the epoch's metrics to Tune whenever the objective was measured.

    With ``queue`` (the ray engine's case: a TorchTrainer runs inside the trial) the result goes
    through the trial session's inter-actor queue, as Ray's TuneReportCallback does."""

    def __init__(self, metric: str, peers, ensembles, queue=None):
        self.metric, self.peers, self.ensembles, self.queue = metric, list(peers), list(ensembles), queue
        self.best: dict[str, float] = {}

    def __call__(self, epoch: int, nodes: dict[str, dict]) -> None:
        result = tune_metrics(nodes, self.peers, self.ensembles)
        if self.metric not in result:
            return
        for k, v in list(result.items()):
            if k.endswith((".top1", ".top5")):
                best_key = k[:-5] + ".best_" + k[-4:]
                self.best[best_key] = max(v, self.best.get(best_key, -math.inf))
        result.update(self.best)
        result["epoch"] = epoch  # numbered from 1, as in metrics.jsonl
        if self.queue is not None:
            self.queue.put(result)
        else:
            from ray import tune

            tune.report(result)


@dataclass
class TrialJob:
    """What every trial needs besides its overrides (sent once through the object store)."""

    raw: dict
    out_dir: str
    cwd: str
    metric: str
    tracking: bool
    tracking_uri: str | None
    sweep_run_id: str | None
    threads: int


def trial_name(trial) -> str:
    """'trial-003': short, stable, the same in Tune, the run directory and MLflow."""
    return f"trial-{int(str(trial.trial_id).rsplit('_', 1)[-1]):03d}"


def param_key(path: str) -> str:
    """'edges[0].temperature' → 'edges.0.temperature' (MLflow param names have no brackets)."""
    return re.sub(r"\[(\d+)\]", r".\1", path)


def run_trial(config: dict, job: TrialJob) -> None:
    """The Tune function trainable: one full topology run with this trial's overrides."""
    import torch
    from ray import tune

    from ..engine import get_engine
    from ..engine.options import RunOptions
    from ..tracking import TAG_OVERRIDES, TAG_SEED, TAG_TRIAL

    os.chdir(job.cwd)  # relative paths in the topology mean what they meant to the user
    overrides = dict(config["overrides"])
    ctx = tune.get_context()
    name = ctx.get_trial_name()
    raw = apply_overrides(job.raw, overrides)
    set_path(raw, "tracking.run_name", name)
    topo = load_topology(raw)
    c = topo.config
    if not c.train.threads:
        torch.set_num_threads(job.threads)
    out = Path(job.out_dir) / "trials" / name
    tags = {TAG_TRIAL: name, "online_kd.trial_id": ctx.get_trial_id(),
            TAG_OVERRIDES: json.dumps(overrides, sort_keys=True)}
    if SEED_PATH in overrides:
        tags[TAG_SEED] = str(overrides[SEED_PATH])
    opts = RunOptions(out_dir=out, quiet=True, tracking=job.tracking, tracking_uri=job.tracking_uri,
                      parent_run_id=job.sweep_run_id, extra_tags=tags,
                      extra_params={param_key(p): v for p, v in overrides.items()})
    engine = get_engine(c.engine.name)
    if engine.epochs_in_process:
        opts.on_epoch = TuneReport(job.metric, c.peers, c.ensembles)
        engine(topo, opts).run()
        return
    # the engine's epochs are written elsewhere (the ray engine's controller) to metrics.jsonl: a thread forwards each
    from ray.train._internal.session import get_session

    hook = TuneReport(job.metric, c.peers, c.ensembles, queue=get_session()._get_or_create_inter_actor_queue())
    stop = threading.Event()
    follower = threading.Thread(target=RunDir(out).follow, args=(hook, stop), daemon=True)
    follower.start()
    try:
        engine(topo, opts).run()
    finally:
        stop.set()
        follower.join()
