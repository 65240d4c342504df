"""`online-kd tune`: a Ray Tune search over a topology's YAML paths, one full topology run per trial.

A *space file* maps dotted topology paths (the ``--set`` paths) to distributions, and names the
objective, the scheduler and the search::

    metric: peers.student.top1        # peers.<peer>|peers.mean|ensemble.<name> . top1|top5 (peers: |loss)
    mode: max
    num_samples: 4
    search: random                    # or optuna (pip install optuna)
    search_seed: 0                    # random search: the same draws every time
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}   # or none
    params:
      edges[0].temperature: {choice: [1, 2, 4, 8]}
      edges[0].alpha: {uniform: [0.5, 0.95]}

Every path is tried through the override mechanism of ``--set`` (with the extreme values of its
distribution) and the topology is loaded and checked before Ray starts, so a bad path, value or
metric fails at once as ``space.params."PATH": …`` with exit status 2.

Each trial is a Tune function trainable that runs the topology with its own engine: the local
engine in the trial process, or (``engine: ray``) a ``TorchTrainer`` driven from the trial, the
Train v2 pattern. After every epoch in which the objective is measured the trial reports to Tune,
so ASHA's time unit is *measurements of the metric* (for a student trained in the second stage of
quick/kd.yaml: its epochs); ``max_t`` is their count.

Seeds (``--seeds 0,1,2``) are one more grid dimension, ``train.seed``. Random values are drawn
once per sample and shared by every grid point (``constant_grid_search``), so trials that differ
only by seed form one *configuration*; the configuration's score is the mean over its seeds, and
each seed trial is a run of its own (ASHA judges each on its own, two seeds can run at once).

MLflow: the sweep is a parent run, each trial a child topology run (params: its overridden paths),
each peer a grandchild; trials of the best configuration get the tag ``best=true`` and the sweep
``best_trial``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .compare import SEED_PATH, mean_std
from .errors import TopologyError, suggest
from .topology.load import _split_path, apply_overrides, load_topology, read_yaml, set_path

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
_DIST_HELP = ("a distribution: {choice: [v, …]}, {grid: [v, …]}, {uniform: [low, high]}, "
              "{loguniform: [low, high]} or {randint: [low, high]}")
_METRIC = re.compile(r"^(peers|ensemble)\.([^.]+)\.(top1|top5|loss)$")


# ---------------------------------------------------------------------- the space file
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSpec(_Strict):
    """``asha`` (stop trials whose metric trails after ``grace_period`` measurements) or ``none``."""

    name: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1)  # default: the number of measurements of the metric


class SpaceConfig(_Strict):
    """A search: objective, budget, scheduler, search algorithm and the distributions."""

    description: str | None = None
    metric: str
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, ge=1)
    search: Literal["random", "optuna"] = "random"
    search_seed: int | None = None
    scheduler: SchedulerSpec = SchedulerSpec(name="none")
    max_concurrent_trials: int | None = Field(None, ge=1)
    params: dict[str, Any] = Field(min_length=1)

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, v: Any) -> Any:
        if v is None:
            return {"name": "none"}
        return {"name": v} if isinstance(v, str) else v


@dataclass(frozen=True)
class Distribution:
    """One path's distribution, already checked: kind in DISTRIBUTIONS and its arguments."""

    kind: str
    args: tuple

    def probes(self) -> list[Any]:
        """Values to try through the topology before anything runs (every value, or both ends)."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        lo, hi = self.args
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def domain(self):
        """The Tune search-space object."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def text(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass
class Space:
    """A validated space file."""

    config: SpaceConfig
    params: dict[str, Distribution]
    path: Path
    text: str


def _space_place(loc: tuple) -> str:
    out = "space"
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[0] == "params" and i == 1:
            out += f'."{part}"'
        else:
            out += f".{part}"
    return out


def _space_error(err: ValidationError) -> TopologyError:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if e["type"] == "extra_forbidden":
        model = SchedulerSpec if loc[:1] == ("scheduler",) else SpaceConfig
        allowed = list(model.model_fields)
        import difflib

        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f", did you mean '{close[0]}'?" if close else ""
        return TopologyError(_space_place(loc), f"unknown key{hint} (allowed: {', '.join(allowed)})")
    if e["type"] == "missing":
        return TopologyError(_space_place(loc), "required but missing")
    got = e.get("input")
    shown = "a mapping" if isinstance(got, dict) else "a list" if isinstance(got, list) else repr(got)
    return TopologyError(_space_place(loc), f"{e['msg']} (got {shown})")


def parse_distribution(path: str, spec: Any) -> Distribution:
    """``{uniform: [0.5, 0.9]}`` → Distribution, or a TopologyError at ``space.params."PATH"``."""
    place = f'space.params."{path}"'
    if not isinstance(spec, dict) or len(spec) != 1:
        raise TopologyError(place, f"expected {_DIST_HELP} (got {spec!r})")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise TopologyError(place, suggest(str(kind), DISTRIBUTIONS, "distribution"))
    place += f".{kind}"
    if not isinstance(args, list) or not args:
        raise TopologyError(place, f"expected a non-empty list (got {args!r})")
    if kind in ("choice", "grid"):
        return Distribution(kind, tuple(args))
    if len(args) != 2:
        raise TopologyError(place, f"expected [low, high] (got {args!r})")
    lo, hi = args
    if kind == "randint":
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in args):
            raise TopologyError(place, f"expected two integers [low, high) (got {args!r})")
        if lo >= hi:
            raise TopologyError(place, f"low must be below high, high excluded (got {args!r})")
        return Distribution(kind, (lo, hi))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in args):
        raise TopologyError(place, f"expected two numbers [low, high] (got {args!r})")
    if kind == "loguniform" and lo <= 0:
        raise TopologyError(place, f"needs 0 < low < high (got {args!r})")
    if lo >= hi:
        raise TopologyError(place, f"low must be below high (got {args!r})")
    return Distribution(kind, (float(lo), float(hi)))


def load_space(path: str | os.PathLike) -> Space:
    """Read and check a space file on its own (paths are checked against a topology by check_space)."""
    if not Path(path).is_file():
        raise TopologyError("--space", f"no such space file '{path}'")
    raw = read_yaml(path) if Path(path).read_text().strip() else None
    if not isinstance(raw, dict):
        raise TopologyError(str(path), "a space file is a mapping with metric, mode, params, … (see configs/tune/)")
    try:
        cfg = SpaceConfig.model_validate(raw)
    except ValidationError as err:
        raise _space_error(err) from None
    params = {str(p): parse_distribution(str(p), spec) for p, spec in cfg.params.items()}
    return Space(cfg, params, Path(path), Path(path).read_text())


# ---------------------------------------------------------------------- checks against the topology
def metric_epochs(topology, metric: str) -> list[int]:
    """The (0-based) epochs in which ``metric`` is measured: evaluation epochs once its node is trained."""
    kind, name, _ = _METRIC.match(metric).groups()
    c = topology.config
    if kind == "ensemble":
        needed = sorted(topology.peer_sources(name))
        any_peer = False
    elif name == "mean" and name not in c.peers:
        needed, any_peer = list(c.peers), True
    else:
        needed, any_peer = [name], False
    epochs, trained, start = [], {p for p in c.peers if c.peers[p].init}, 0
    total = topology.total_epochs
    for stage in topology.stages:
        trained |= set(stage.train)
        for e in range(start, start + stage.epochs):
            evaluated = (e + 1) % c.train.eval_every == 0 or e == total - 1
            have = [p in trained for p in needed]
            if evaluated and (any(have) if any_peer else all(have)):
                epochs.append(e)
        start += stage.epochs
    return epochs


def check_metric(topology, metric: str) -> None:
    """``metric`` names a node of the topology that gets evaluated."""
    c = topology.config
    m = _METRIC.match(metric)
    allowed = ("peers.<peer>.top1|top5|loss, peers.mean.top1|top5|loss or ensemble.<ensemble>.top1|top5 "
               f"(peers: {', '.join(c.peers)}; ensembles: {', '.join(c.ensembles) or 'none'})")
    if not m:
        raise TopologyError("space.metric", f"'{metric}' is not one of {allowed}")
    kind, name, what = m.groups()
    if kind == "peers" and name not in c.peers and name != "mean":
        raise TopologyError("space.metric", suggest(name, [*c.peers, "mean"], "peer"))
    if kind == "ensemble" and name not in c.ensembles:
        raise TopologyError("space.metric", suggest(name, c.ensembles, "ensemble") if c.ensembles
                            else f"the topology has no ensembles ('{metric}')")
    if kind == "ensemble" and what == "loss":
        raise TopologyError("space.metric", f"ensembles have no training loss; use top1 or top5 ('{metric}')")
    if not metric_epochs(topology, metric):
        raise TopologyError("space.metric", f"'{name}' is never trained nor initialised, so it is never evaluated")


def _check_path(raw: dict, path: str) -> None:
    """A path into a node section must name an existing node (else --set would create a new one)."""
    try:
        parts = _split_path(path)
    except TopologyError as err:
        raise TopologyError(f'space.params."{path}"', err.message) from None
    if len(parts) >= 2 and parts[0] in ("peers", "ensembles", "virtual"):
        nodes = raw.get(parts[0]) or {}
        if str(parts[1]) not in nodes:
            what = {"peers": "peer", "ensembles": "ensemble", "virtual": "virtual node"}[parts[0]]
            raise TopologyError(f'space.params."{path}"', suggest(str(parts[1]), map(str, nodes), what))


def check_space(space: Space, raw: dict, seeds: list[int] | None) -> int:
    """Try every path's extreme values (and all first values together) through the topology; check the
    metric, scheduler and search. Returns ASHA's max_t (measurements of the metric, at most)."""
    cfg = space.config
    if seeds and SEED_PATH in space.params:
        raise TopologyError("--seeds", f"the space already varies {SEED_PATH}; drop one of the two")
    if cfg.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise TopologyError("space.search", "optuna is not installed: pip install optuna "
                                "(or use search: random)") from None
        if seeds or any(d.kind == "grid" for d in space.params.values()):
            raise TopologyError("space.search", "optuna proposes one configuration per trial: it takes no grid "
                                "(and no --seeds); use choice, or search: random")
    base = load_topology(raw)
    check_metric(base, cfg.metric)
    max_t = len(metric_epochs(base, cfg.metric))
    for path, dist in space.params.items():
        _check_path(raw, path)
        for value in dist.probes():
            try:
                topo = load_topology(raw, {path: value})
            except TopologyError as err:
                raise TopologyError(f'space.params."{path}"', str(err)) from None
            max_t = max(max_t, len(metric_epochs(topo, cfg.metric)))
    joint = {p: d.probes()[0] for p, d in space.params.items()}
    try:
        load_topology(raw, joint)
    except TopologyError as err:
        raise TopologyError("space.params", f"with {joint}: {err}") from None
    if cfg.scheduler.name == "asha":
        limit = cfg.scheduler.max_t or max_t
        if cfg.scheduler.grace_period > limit:
            raise TopologyError("space.scheduler.grace_period",
                                f"{cfg.scheduler.grace_period} is beyond the {limit} measurements of "
                                f"{cfg.metric} a trial makes")
        max_t = limit
    return max_t


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

    from .engine import get_engine
    from .engine.local import RunOptions
    from .tracking import TAG_OVERRIDES

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
    tags = {"online_kd.trial": name, "online_kd.trial_id": ctx.get_trial_id(),
            TAG_OVERRIDES: json.dumps(overrides, sort_keys=True)}
    if SEED_PATH in overrides:
        tags["online_kd.seed"] = str(overrides[SEED_PATH])
    opts = RunOptions(out_dir=out, quiet=True, tracking=job.tracking, tracking_uri=job.tracking_uri,
                      parent_run_id=job.sweep_run_id, extra_tags=tags,
                      extra_params={param_key(p): v for p, v in overrides.items()})
    if c.engine.name == "local":
        opts.on_epoch = TuneReport(job.metric, c.peers, c.ensembles)
        get_engine("local")(topo, opts).run()
        return
    # ray engine: the TorchTrainer's controller writes metrics.jsonl; a thread forwards each epoch
    from ray.train._internal.session import get_session

    hook = TuneReport(job.metric, c.peers, c.ensembles, queue=get_session()._get_or_create_inter_actor_queue())
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(out / "metrics.jsonl", hook, stop), daemon=True)
    follower.start()
    try:
        get_engine(c.engine.name)(topo, opts).run()
    finally:
        stop.set()
        follower.join()


def _follow(path: Path, hook: TuneReport, stop: threading.Event) -> None:
    """Call ``hook`` for every epoch appended to a run's metrics.jsonl until ``stop`` (then drain); an epoch
    re-reported after a worker restart is not reported to Tune again."""
    done, last_epoch = 0, 0
    while True:
        final = stop.is_set()
        if path.is_file():
            lines = path.read_text().split("\n")[:-1]  # complete lines only: the writer may be mid-line
            for line in lines[done:]:
                rec = json.loads(line)
                if rec["epoch"] > last_epoch:
                    hook(rec["epoch"], rec["nodes"])
                    last_epoch = rec["epoch"]
            done = len(lines)
        if final:
            return
        stop.wait(0.5)


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


def _ray_init(num_cpus: int) -> bool:
    """A local Ray instance (or $RAY_ADDRESS) as the ray engine starts one; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    from .engine.ray import HEALTH_CHECK_ENV

    os.environ.setdefault(HEALTH_CHECK_ENV, "0.25")
    env = {"env_vars": {HEALTH_CHECK_ENV: os.environ[HEALTH_CHECK_ENV]}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=env, log_to_driver=True)  # the dashboard serves Train's State API
    return True


def _trial_resources(topology, num_cpus: int) -> tuple[dict[str, float], int, int]:
    """(resources of one trial actor, trials at once, CPUs for the Ray instance) from the topology's engine:
    a local-engine trial is one process on one CPU; a ray-engine trial drives a worker per peer replica."""
    c = topology.config
    if c.engine.name == "local":
        per_trial: dict[str, float] = {"CPU": 1}
        try:
            import torch

            if c.train.device != "cpu" and torch.cuda.is_available():
                per_trial["GPU"] = 1
        except Exception:
            pass
        return per_trial, max(1, num_cpus), num_cpus
    from .engine.exchange import placement

    world = len(placement(topology))
    cpu_per_worker = float(dict(c.engine.resources_per_worker).get("CPU", 1))
    need = world * cpu_per_worker + 1  # the workers, and the trial actor that drives them
    return {"CPU": 1}, max(1, int(num_cpus // need)), max(num_cpus, math.ceil(need))


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
              num_cpus: int | None = None, num_samples: int | None = None, quiet: bool = False) -> dict:
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
        from .tracking import RunTracker, default_tracking_uri

        uri = tracking_uri or c.tracking.uri or default_tracking_uri()
        params = {"topology": c.name, "space": space.path.name, "metric": cfg.metric, "mode": cfg.mode,
                  "num_samples": cfg.num_samples, "search": cfg.search, "scheduler": cfg.scheduler.name,
                  "seeds": ",".join(map(str, seeds)) if seeds else "",
                  **({"grace_period": cfg.scheduler.grace_period, "reduction_factor": cfg.scheduler.reduction_factor,
                      "max_t": max_t} if cfg.scheduler.name == "asha" else {}),
                  **{f"space.{param_key(p)}": d.text() for p, d in space.params.items()}}
        sweep = RunTracker.open_group(uri, c.tracking.experiment or c.name, f"{c.name} tune {space.path.stem}",
                                      kind="sweep", params=params,
                                      tags={"online_kd.topology": c.name, "online_kd.metric": cfg.metric,
                                            "online_kd.mode": cfg.mode, "online_kd.out": str(out)})
        sweep.log_text(space.text, "space.yaml")
        sweep.log_text(topo.to_yaml(), "topology.yaml")

    started = _ray_init(ray_cpus)
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
        _record(sweep, summary, outcomes)
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
        history = _read_history(out / "trials" / name / "metrics.jsonl")
        series = [float(v) for h in history
                  if (v := tune_metrics(h["nodes"], peers, ensembles).get(cfg.metric)) is not None]
        value = series[-1] if series else m.get(cfg.metric)
        done = (out / "trials" / name / "summary.json").is_file()
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


def _read_history(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


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


def _record(sweep, summary: dict, outcomes: list[TrialOutcome]) -> None:
    """Close what stopped trials left open, tag the best configuration, close the sweep run."""
    from mlflow.entities import RunTag

    client = sweep.client
    trial_runs = client.search_runs([sweep.experiment_id], max_results=5000,
                                    filter_string=f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'")
    by_name = {r.data.tags.get("online_kd.trial"): r for r in trial_runs}
    best = summary["best"] or {"trials": []}
    end = int(time.time() * 1000)
    for o in outcomes:
        run = by_name.get(o.name)
        if run is None:
            continue
        o.run_id = run.info.run_id
        tags = [RunTag("online_kd.status", o.status), RunTag("best", str(o.name in best["trials"]).lower())]
        client.log_batch(run.info.run_id, tags=tags)
        if o.status != "done" and run.info.status != "FINISHED":  # stopped by ASHA: Tune ended its process
            status = "FAILED" if o.status == "error" else "KILLED"
            nodes = client.search_runs([sweep.experiment_id], max_results=1000,
                                       filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
            for r in [*nodes, run]:
                if r.info.status != status:
                    client.set_terminated(r.info.run_id, status=status, end_time=end)
    for t in summary["trials"]:
        t["run_id"] = next((o.run_id for o in outcomes if o.name == t["trial"]), None)
    if summary["best"]:
        b = summary["best"]
        sweep.set_tags({"best_trial": b["trial"], "best_trials": ",".join(b["trials"]),
                        "best_overrides": json.dumps(b["overrides"], sort_keys=True, default=str)})
        sweep.log_summary({sweep.PARENT: {"best_mean": b["mean"], "best_std": b["std"]}})
    sweep.finish("FINISHED")


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


def parse_seeds(text: str | None) -> list[int] | None:
    """'0,1,2' → [0, 1, 2]."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise TopologyError("--seeds", f"expected integers separated by commas, e.g. 0,1,2 (got {text!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise TopologyError("--seeds", f"expected distinct integers separated by commas, e.g. 0,1,2 (got {text!r})")
    return seeds


