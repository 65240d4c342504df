"""`online-kd compare`: which peer, in which topology and with which overrides, won — read from MLflow.

Rows are run × peer (ensembles too); columns: model, role, last- and best-epoch top-1 (reference
tables mix the two, so both are always shown), mean ± std over seeds for runs that differ only by
``train.seed``, and the overrides that differ among the compared runs. Every run is identified by its
MLflow run id (a unique prefix in tables and legends), its start time and its run directory. Also a PNG
of per-peer accuracy curves (one panel per topology × peer: peers of different topologies that share a
name are never drawn together; one line per run) and csv / json / markdown renderings.

The tree it reads is the one :class:`online_kd.tracking.RunTracker` writes: topology runs (tag
``online_kd.kind=topology``), each with one child per node, optionally nested under a sweep or a
seed group (``online_kd.kind`` ``sweep`` / ``seeds``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import TopologyError, suggest
from .tracking import TAG_KIND, TAG_NODE, TAG_NODES, TAG_OVERRIDES, TAG_PARENT, TAG_ROLE, TAG_TOPOLOGY

SEED_PATH = "train.seed"
GROUP_KINDS = ("sweep", "seeds")
ID_CHARS = 8  # run-id prefix shown in tables and legends (--runs accepts prefixes of 6 or more)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n−1; 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate_seeds(summaries: dict[int, dict]) -> dict[str, Any]:
    """Per peer and ensemble: mean ± std (and the values) of last- and best-epoch top-1 over seed runs' summaries."""
    out: dict[str, Any] = {"peers": {}, "ensembles": {}}
    for section in ("peers", "ensembles"):
        names = dict.fromkeys(n for s in summaries.values() for n in s.get(section, {}))
        for n in names:
            entries = {seed: s[section][n] for seed, s in summaries.items() if n in s.get(section, {})}
            first = next(iter(entries.values()))
            agg: dict[str, Any] = {k: first[k] for k in ("model", "role") if k in first}
            for key in ("top1_last", "top1_best"):
                vals = [e[key] for e in entries.values()]
                m, sd = mean_std(vals)
                agg[key] = {"mean": round(m, 4), "std": round(sd, 4), "values": dict(zip(entries, vals))}
            out[section][n] = agg
    return out


# ---------------------------------------------------------------------- reading MLflow
@dataclass
class Row:
    """One node of one topology run."""

    run: str
    run_id: str
    group: str
    group_run_id: str
    topology: str
    seed: int | None
    peer: str
    model: str
    role: str
    status: str
    epochs: int | None
    top1_last: float | None
    top1_best: float | None
    best_epoch: int | None
    best_trial: bool
    overrides: dict[str, Any]
    curve: list[tuple[int, float]] = field(default_factory=list, repr=False)
    last_mean: float | None = None
    last_std: float | None = None
    best_mean: float | None = None
    best_std: float | None = None
    n_seeds: int | None = None
    started: str = ""  # the run's start, local time
    out: str = ""      # its run directory (tag online_kd.out)

    @property
    def short_id(self) -> str:
        return self.run_id[:ID_CHARS]


def _all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _kind(run, children: dict[str, list]) -> str:
    kind = run.data.tags.get(TAG_KIND)
    if kind:
        return kind
    return "topology" if children.get(run.info.run_id) else "node"


def _select(tokens: list[str] | None, runs: list, by_id: dict, children: dict) -> list:
    """Topology runs named by ``tokens`` (run ids, id prefixes or names of topology runs or groups); all if None."""
    topo = [r for r in runs if _kind(r, children) == "topology"]
    if not tokens:
        return topo
    chosen: dict[str, Any] = {}
    for tok in tokens:
        hits = [r for r in runs if r.info.run_id == tok or (len(tok) >= 6 and r.info.run_id.startswith(tok))
                or r.info.run_name == tok]
        if not hits:
            names = {r.info.run_name for r in runs if _kind(r, children) in ("topology", *GROUP_KINDS)}
            raise TopologyError("--runs", suggest(tok, names, "run"))
        for r in hits:
            kind = _kind(r, children)
            if kind in GROUP_KINDS:
                members = [c for c in children.get(r.info.run_id, []) if _kind(c, children) == "topology"]
            elif kind == "node":
                members = [by_id[r.data.tags["mlflow.parentRunId"]]]
            else:
                members = [r]
            for m in members:
                chosen[m.info.run_id] = m
    return list(chosen.values())


def _curve(client, run_id: str) -> list[tuple[int, float]]:
    """(epoch, top-1) per epoch (MLflow steps are epoch numbers, from 1), the last logged value of an epoch
    winning (a resumed run may repeat one)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, "top1"):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, v) for step, (_, v) in sorted(by_step.items())]


def collect(tracking_uri: str, experiment: str, runs: list[str] | None = None) -> list[Row]:
    """Rows (run × node) of the topology runs of ``experiment`` (or those ``runs`` names), in run order."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        known = [e.name for e in client.search_experiments()]
        raise TopologyError("EXPERIMENT", (suggest(experiment, known, "experiment") if known else
                                           f"no experiment '{experiment}'") + f" in {tracking_uri}")
    every = _all_runs(client, exp.experiment_id)
    by_id = {r.info.run_id: r for r in every}
    children: dict[str, list] = {}
    for r in every:
        p = r.data.tags.get("mlflow.parentRunId")
        if p:
            children.setdefault(p, []).append(r)
    selected = _select(runs, every, by_id, children)

    def order(r):
        g = by_id.get(r.data.tags.get(TAG_PARENT, ""))
        return ((g or r).info.start_time, r.info.run_name if g else "", r.info.start_time)

    rows: list[Row] = []
    for run in sorted(selected, key=order):
        tags, params = run.data.tags, run.data.params
        group = by_id.get(tags.get(TAG_PARENT, ""))
        nodes = {c.data.tags.get(TAG_NODE, c.info.run_name): c for c in children.get(run.info.run_id, [])}
        node_order = [n for n in tags.get(TAG_NODES, "").split(",") if n in nodes]
        node_order += [n for n in nodes if n not in node_order]
        try:
            overrides = json.loads(tags.get(TAG_OVERRIDES, "{}"))
        except json.JSONDecodeError:
            overrides = {}
        seed = params.get(SEED_PATH, overrides.get(SEED_PATH))
        for name in node_order:
            node = nodes[name]
            curve = _curve(client, node.info.run_id)
            last = curve[-1] if curve else None
            best = max(curve, key=lambda p: (p[1], -p[0])) if curve else None
            role = node.data.tags.get(TAG_ROLE, "")
            model = node.data.params.get("model") or (f"{role}({node.data.params.get('combine', '')})"
                                                      if role == "ensemble" else "")
            rows.append(Row(
                run=run.info.run_name, run_id=run.info.run_id,
                group=group.info.run_name if group else "", group_run_id=group.info.run_id if group else "",
                topology=tags.get(TAG_TOPOLOGY, ""), seed=int(seed) if seed not in (None, "") else None,
                peer=name, model=model, role=role, status=run.info.status,
                epochs=last[0] if last else None, top1_last=last[1] if last else None,
                top1_best=best[1] if best else None, best_epoch=best[0] if best else None,
                best_trial=tags.get("best") == "true", overrides=overrides, curve=curve,
                started=_started(run), out=tags.get("online_kd.out", "")))
    add_seed_stats(rows)
    return rows


def _started(run) -> str:
    start = run.info.start_time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1000)) if start else ""


def add_seed_stats(rows: list[Row]) -> None:
    """Mean ± std of last/best top-1 over runs of one topology whose overrides differ only by seed (≥ 2 seeds)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.top1_last is None:
            continue
        key = (r.topology, json.dumps({k: v for k, v in r.overrides.items() if k != SEED_PATH}, sort_keys=True,
                                      default=str), r.peer)
        groups.setdefault(key, []).append(r)
    for members in groups.values():
        if len({m.seed for m in members}) < 2:
            continue
        lm, ls = mean_std([m.top1_last for m in members])
        bm, bs = mean_std([m.top1_best for m in members])
        for m in members:
            m.last_mean, m.last_std, m.best_mean, m.best_std, m.n_seeds = lm, ls, bm, bs, len(members)


def differing_overrides(rows: list[Row]) -> list[str]:
    """Override paths (seed aside) whose values are not the same in every compared run."""
    runs = {r.run_id: r.overrides for r in rows}
    paths = sorted({p for o in runs.values() for p in o if p != SEED_PATH})
    return [p for p in paths if len({json.dumps(o.get(p), sort_keys=True, default=str) for o in runs.values()}) > 1]


# ---------------------------------------------------------------------- rendering
def _pct(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _value(v: Any) -> str:
    if v is None:
        return "·"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def columns(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the table (shared by the terminal table and markdown)."""
    paths = differing_overrides(rows)
    show_group = any(r.group for r in rows)
    show_topology = len({r.topology for r in rows}) > 1
    show_seeds = any(r.n_seeds for r in rows)
    head = ([*(["topology"] if show_topology else []), *(["group"] if show_group else []), "run", "run id",
             "started", "seed", "peer", "model", "role", "epochs", "last top-1", "best top-1 (epoch)"]
            + (["last mean ± std", "best mean ± std", "seeds"] if show_seeds else []) + paths)
    cells = []
    for r in rows:
        row = [*([r.topology] if show_topology else []), *([r.group] if show_group else []),
               r.run + (" ★" if r.best_trial else ""), r.short_id, r.started, _value(r.seed), r.peer, r.model, r.role,
               _value(r.epochs) if r.status != "KILLED" else f"{_value(r.epochs)} (stopped)",
               _pct(r.top1_last), f"{_pct(r.top1_best)} ({_value(r.best_epoch)})"]
        if show_seeds:
            row += ([f"{r.last_mean:.2f} ± {r.last_std:.2f}", f"{r.best_mean:.2f} ± {r.best_std:.2f}", str(r.n_seeds)]
                    if r.n_seeds else ["", "", ""])
        row += [_value(r.overrides.get(p)) for p in paths]
        cells.append(row)
    return head, cells


def records(rows: list[Row]) -> list[dict[str, Any]]:
    """Plain dicts (csv/json): every field but the curve; differing overrides also as their own keys."""
    paths = differing_overrides(rows)
    out = []
    for r in rows:
        d = {k: v for k, v in asdict(r).items() if k != "curve"}
        d.update({p: r.overrides.get(p) for p in paths})
        out.append(d)
    return out


def render(rows: list[Row], fmt: str) -> str:
    """The rows as csv, json or markdown text."""
    if fmt == "json":
        return json.dumps(records(rows), indent=2, default=str)
    if fmt == "csv":
        recs = records(rows)
        buf = io.StringIO()
        keys = list(recs[0]) if recs else []
        w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        w.writeheader()
        for rec in recs:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in rec.items()})
        return buf.getvalue()
    if fmt == "markdown":
        head, cells = columns(rows)
        esc = [[c.replace("|", "\\|") for c in row] for row in cells]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in esc]
        return "\n".join(lines) + "\n"
    raise ValueError(fmt)


def print_table(rows: list[Row], title: str, console) -> None:
    """The rows as a rich table."""
    from rich.table import Table

    head, cells = columns(rows)
    t = Table(title=title)
    for h in head:
        t.add_column(h, justify="right" if h.startswith(("last", "best", "epochs", "seed")) else "left")
    for row in cells:
        t.add_row(*row)
    console.print(t)


def panels(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """The curves' panels: (topology, peer) → its rows with a curve. A peer name is only a name within its
    topology, so peers of different topologies are never drawn in one panel."""
    out: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.curve:
            out.setdefault((r.topology, r.peer), []).append(r)
    return out


def legend_label(r: Row, paths: list[str]) -> str:
    """A curve's name: run name, run-id prefix, ★ for a sweep's best trial, the differing overrides by their
    full paths (``engine.name``, never just ``name``) and the seed where seeds are aggregated."""
    label = f"{r.run} {r.short_id}" + (" ★" if r.best_trial else "")
    if paths:
        label += " (" + ", ".join(f"{p}={_value(r.overrides.get(p))}" for p in paths) + ")"
    return label + (f" seed {r.seed}" if r.n_seeds else "")


def plot(rows: list[Row], path: str | Path, title: str | None = None) -> Path:
    """Per-peer accuracy curves: one panel per (topology, peer), one line per run (the best trial drawn thicker).

    A legend entry names the run and its id prefix, and the overrides that differ by their full paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    by_panel = panels(rows)
    peers = list(by_panel)
    several = len({t for t, _ in peers}) > 1
    ncols = min(3, max(1, len(peers)))
    nrows = max(1, math.ceil(len(peers) / ncols))
    fig = Figure(figsize=(5.2 * ncols, 3.9 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    runs = list(dict.fromkeys(r.run_id for r in rows))
    palette = [f"C{i}" for i in range(10)]
    paths = differing_overrides(rows)[:3]  # the legend says what differs (a few, by their full paths)
    if not peers:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no top-1 curves", ha="center", va="center", transform=ax.transAxes)
    for k, (topology, peer) in enumerate(peers):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        panel = by_panel[(topology, peer)]
        for r in panel:
            i = runs.index(r.run_id)
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, color=palette[i % 10], linestyle="-" if i < 10 else "--",
                    linewidth=2.6 if r.best_trial else 1.4, marker="o" if len(xs) <= 30 else None, markersize=3,
                    label=legend_label(r, paths))
        ax.set_title((f"{topology}: " if several else "") + f"{peer} ({panel[0].model})", fontsize=11)
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, facecolor="white")
    return path
