"""The space file of a sweep (paths → distributions, objective, scheduler, search), checked against
the topology before Ray starts; and the seeds of a sweep or seed group."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..compare import SEED_PATH
from ..errors import TopologyError, suggest
from ..topology.load import _split_path, load_topology, read_yaml


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
