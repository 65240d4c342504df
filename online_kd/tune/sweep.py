"""The sweep driver: Ray Tune over the trials, their outcomes read back from the run directories,
the summary ranked by configuration, and its table."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..compare import SEED_PATH, mean_std
from ..engine.raystart import ensure_ray
from ..errors import TopologyError
from ..rundir import RunDir
from ..topology.load import apply_overrides, load_topology, read_yaml
from .space import Space, SpaceConfig, check_space, load_space
from .trial import TrialJob, param_key, run_trial, trial_name, tune_metrics


# ---------------------------------------------------------------------- the driver
@dataclass
class TrialOutcome:
    """A finished, stopped or failed trial as the sweep summary shows it."""

    name: str
    trial_id: str
    overrides: dict[str, Any]
    value: float | None
    best: float | None
    epoch: int | None
    measurements: int
    status: str
    error: str | None = None
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    series: list[float] = field(default_factory=list)  # the metric at each measurement
    reports: int = 0  # results Tune received (ASHA's time)

    @property
    def config_key(self) -> str:
        return json.dumps({k: v for k, v in self.overrides.items() if k != SEED_PATH}, sort_keys=True, default=str)


def _trial_resources(topology, num_cpus: int) -> tuple[dict[str, float], int, int]:
    """(resources of one trial actor, trials at once, CPUs for the Ray instance), from what the topology's
    engine says one run occupies."""
    from ..engine import get_engine

    need = get_engine(topology.config.engine.name).resources(topology)
    return need.driver, max(1, int(num_cpus // need.cpus)), max(num_cpus, math.ceil(need.cpus))


def _scheduler(cfg: SpaceConfig, max_t: int):
    if cfg.scheduler.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t + 1: ASHA stops a trial that reaches max_t, which would cut its last epoch's summary and MLflow
    # closing short; no rung lies between max_t and max_t + 1 that the trial could be judged at.
    return ASHAScheduler(max_t=max_t + 1, grace_period=cfg.scheduler.grace_period,
                         reduction_factor=cfg.scheduler.reduction_factor)


def _search(cfg: SpaceConfig, concurrent: int):
    """(search algorithm, max_concurrent_trials for TuneConfig): the variant generator limits itself."""
    if cfg.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.search_seed), concurrent
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(constant_grid_search=True, random_state=cfg.search_seed,
                                 max_concurrent=concurrent), None


def run_sweep(topology_path: str, space_path: str, sets: list[str] = (), seeds: list[int] | None = None,
              out: str | os.PathLike | None = None, tracking: bool = True, tracking_uri: str | None = None,
              num_cpus: int | None = None, num_samples: int | None = None, quiet: bool = False,
              verbose: bool = False) -> dict:
    """Validate, search with Ray Tune, record the sweep in MLflow; the sweep summary (also <out>/sweep.json)."""
    raw = apply_overrides(read_yaml(topology_path), list(sets))
    space = load_space(space_path)
    if num_samples:
        space.config.num_samples = num_samples
    max_t = check_space(space, raw, seeds)
    topo = load_topology(raw)
    cfg, c = space.config, topo.config
    out = Path(out or Path("runs") / f"{topo.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    if (out / "sweep.json").is_file():
        raise TopologyError("--out", f"{out} already holds a sweep; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    num_cpus = num_cpus or os.cpu_count() or 1
    resources, concurrent, ray_cpus = _trial_resources(topo, num_cpus)
    if cfg.max_concurrent_trials:
        concurrent = min(concurrent, cfg.max_concurrent_trials)

    sweep = None
    uri = None
    if tracking and c.tracking.enabled:
        from ..tracking import TAG_OUT, TAG_TOPOLOGY, RunTracker, default_tracking_uri

        uri = tracking_uri or c.tracking.uri or default_tracking_uri()
        params = {"topology": c.name, "space": space.path.name, "metric": cfg.metric, "mode": cfg.mode,
                  "num_samples": cfg.num_samples, "search": cfg.search, "scheduler": cfg.scheduler.name,
                  "seeds": ",".join(map(str, seeds)) if seeds else "",
                  **({"grace_period": cfg.scheduler.grace_period, "reduction_factor": cfg.scheduler.reduction_factor,
                      "max_t": max_t} if cfg.scheduler.name == "asha" else {}),
                  **{f"space.{param_key(p)}": d.text() for p, d in space.params.items()}}
        sweep = RunTracker.open_group(uri, c.tracking.experiment or c.name, f"{c.name} tune {space.path.stem}",
                                      kind="sweep", params=params,
                                      tags={TAG_TOPOLOGY: c.name, "online_kd.metric": cfg.metric,
                                            "online_kd.mode": cfg.mode, TAG_OUT: str(out)})
        sweep.log_text(space.text, "space.yaml")
        sweep.log_text(topo.to_yaml(), "topology.yaml")

    started = ensure_ray(ray_cpus, logging_level="INFO" if verbose else "WARNING")
    try:
        from ray import tune

        overrides = {p: d.domain() for p, d in space.params.items()}
        if seeds:
            overrides[SEED_PATH] = tune.grid_search(list(seeds))
        job = TrialJob(raw=raw, out_dir=str(out), cwd=os.getcwd(), metric=cfg.metric, tracking=sweep is not None,
                       tracking_uri=uri, sweep_run_id=sweep.parent_run_id if sweep else None,
                       threads=int(resources.get("CPU", 1)))
        trainable = tune.with_resources(tune.with_parameters(run_trial, job=job), resources)
        search, limit = _search(cfg, concurrent)
        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": overrides},
            tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                                        search_alg=search, scheduler=_scheduler(cfg, max_t),
                                        max_concurrent_trials=limit, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name="tune", storage_path=str(out / "ray"), verbose=0 if quiet else 1),
        )
        with contextlib.redirect_stdout(sys.stderr):  # Tune's banners; stdout stays for --json
            grid = tuner.fit()
        outcomes = _outcomes(grid, cfg, out, topo)
    except BaseException as err:
        if sweep is not None:
            sweep.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = _summarise(topo, space, seeds, out, outcomes, max_t)
    if sweep is not None:
        from ..tracking import close_sweep

        close_sweep(sweep, summary, outcomes)
        summary["sweep_run_id"] = sweep.parent_run_id
    (out / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    if not any(o.value is not None for o in outcomes):
        first = next((o.error for o in outcomes if o.error), "no trial reported the metric")
        raise RuntimeError(f"every trial failed: {first}")
    return summary


def _outcomes(grid, cfg: SpaceConfig, out: Path, topology) -> list[TrialOutcome]:
    """What each trial did, read from Tune's results and the trial's run directory (its metric per measurement)."""
    peers, ensembles = list(topology.config.peers), list(topology.config.ensembles)
    pick = max if cfg.mode == "max" else min
    results = []
    for i in range(len(grid)):
        r = grid[i]
        m = dict(r.metrics or {})
        trial_id = str(m.get("trial_id") or Path(r.path).name)
        name = Path(r.path).name
        run = RunDir(out / "trials" / name)
        history = run.history()
        series = [float(v) for h in history
                  if (v := tune_metrics(h["nodes"], peers, ensembles).get(cfg.metric)) is not None]
        value = series[-1] if series else m.get(cfg.metric)
        done = run.is_finished()
        status = "error" if r.error else "done" if done else "stopped"
        results.append(TrialOutcome(
            name=name, trial_id=trial_id, overrides=dict(r.config.get("overrides", {})),
            value=float(value) if value is not None else None, best=pick(series) if series else None,
            series=series, epoch=history[-1]["epoch"] if history else None, measurements=len(series),
            status=status, reports=int(m.get("training_iteration") or 0),
            error=str(r.error).strip().splitlines()[-1][:300] if r.error else None,
            metrics={k: v for k, v in m.items() if isinstance(v, (int, float)) and k.startswith(("peers.", "ensemble."))},
        ))
    return sorted(results, key=lambda o: o.name)


def _summarise(topo, space: Space, seeds, out: Path, outcomes: list[TrialOutcome], max_t: int) -> dict:
    cfg = space.config
    groups: dict[str, list[TrialOutcome]] = {}
    for o in outcomes:
        groups.setdefault(o.config_key, []).append(o)
    pick = max if cfg.mode == "max" else min
    configs = []
    for key, trials in groups.items():
        # seeds of one configuration are compared at the deepest measurement all of them reached: ASHA may have
        # stopped one seed early, and a mean over different numbers of epochs would mean nothing
        measured = [t for t in trials if t.series]
        depth = min((len(t.series) for t in measured), default=0)
        vals = [t.series[depth - 1] for t in measured]
        mean, std = mean_std(vals)
        best_mean, best_std = mean_std([pick(t.series[:depth]) for t in measured])
        configs.append({"overrides": json.loads(key), "trials": [t.name for t in trials], "n": len(vals),
                        "depth": depth, "mean": mean, "std": std, "best_mean": best_mean, "best_std": best_std,
                        "values": vals})
    sign = 1 if cfg.mode == "max" else -1
    ranked = sorted(configs, key=lambda g: -sign * g["mean"] if g["n"] else math.inf)
    best = ranked[0] if ranked and ranked[0]["n"] else None
    best_trial = None
    if best is not None:
        members = [o for o in outcomes if o.name in best["trials"] and o.value is not None]
        best_trial = max(members, key=lambda o: sign * o.value).name
    return {
        "name": topo.name, "space": str(space.path), "metric": cfg.metric, "mode": cfg.mode, "out": str(out),
        "scheduler": cfg.scheduler.name, "max_t": max_t, "seeds": list(seeds or []),
        "trials": [{"trial": o.name, "trial_id": o.trial_id, "overrides": o.overrides, "metric": o.value,
                    "metric_best": o.best, "epoch": o.epoch, "measurements": o.measurements, "reports": o.reports,
                    "status": o.status,
                    "error": o.error, "out": str(out / "trials" / o.name), "metrics": o.metrics} for o in outcomes],
        "configs": ranked,
        "best": None if best is None else {"trial": best_trial, "trials": best["trials"],
                                           "overrides": best["overrides"], "mean": best["mean"], "std": best["std"],
                                           "n": best["n"], "depth": best["depth"]},
    }


def fmt_value(v: Any) -> str:
    """Override values in tables: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_sweep(summary: dict, console) -> None:
    """The configurations, best first, and the best trial named."""
    from rich.table import Table

    paths = sorted({p for t in summary["trials"] for p in t["overrides"] if p != SEED_PATH})
    seeds = bool(summary["seeds"])
    t = Table(title=f"{summary['name']}: {summary['metric']} ({summary['mode']}) at the last and the best epoch"
                    + (", mean ± std over seeds" if seeds else "") + "; ranked by the last")
    cols = ("#", *paths, "trials", "last", "best", *(["at measurement"] if seeds else []), "epochs run", "status")
    for col in cols:
        t.add_column(col, justify="right" if col not in ("trials", "status") else "left")
    by_name = {x["trial"]: x for x in summary["trials"]}
    for i, g in enumerate(summary["configs"]):
        trials = [by_name[n] for n in g["trials"]]
        value = "—" if not g["n"] else f"{g['mean']:.2f}" + (f" ± {g['std']:.2f}" if seeds else "")
        best = "—" if not g["n"] else f"{g['best_mean']:.2f}" + (f" ± {g['best_std']:.2f}" if seeds else "")
        t.add_row(str(i + 1), *[fmt_value(g["overrides"].get(p, "")) for p in paths],
                  ", ".join(g["trials"]), value, best, *([str(g["depth"])] if seeds else []),
                  ", ".join(str(x["epoch"] or "—") for x in trials),
                  ", ".join(sorted({x["status"] for x in trials})))
    console.print(t)
    b = summary["best"]
    if b:
        what = ", ".join(f"{p}={fmt_value(v)}" for p, v in b["overrides"].items()) or "the topology as it is"
        value = f"{b['mean']:.2f}" + (f" ± {b['std']:.2f} over {b['n']} seeds (measurement {b['depth']})"
                                      if seeds else "")
        console.print(f"[bold]best trial: {b['trial']}[/] ({what}): {summary['metric']} = {value}")
    for x in summary["trials"]:
        if x["error"]:
            console.print(f"[red]{x['trial']} failed: {x['error']}[/]")
    console.print(f"sweep → {summary['out']}" + (f"  (MLflow run {summary['sweep_run_id']})"
                                                 if summary.get("sweep_run_id") else ""))
