"""What a run tells people: progress, per-epoch history, MLflow runs, pictures and the summary."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..rundir import RunDir, accuracy_series
from ..topology.graph import Stage, Topology
from .checkpoint import fault_point
from .record import best, epoch_record


def roles(topology: Topology) -> dict[str, str]:
    """'teacher' (only teaches), 'student' (only learns), 'peer' (both), 'alone' (neither)."""
    out = {}
    for name, p in topology.config.peers.items():
        teaches = any(name in topology.peer_sources(e.source) and e.target != name for e in topology.edges)
        learns = any(e.target == name for e in topology.edges)
        out[name] = "peer" if teaches and learns else "teacher" if teaches else "student" if learns else "alone"
    for name in topology.config.ensembles:
        out[name] = "ensemble"
    return out


class _Advance:
    """What :meth:`Reporter.task` yields: ``advance(n)`` moves the bar."""

    def __init__(self, fn):
        self._fn = fn

    def advance(self, n: int = 1) -> None:
        self._fn(n)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class Reporter:
    """Collects each epoch's metrics; shows progress, logs MLflow, writes the run directory's files."""

    def __init__(self, topology: Topology, options, history: list | None = None, tracker_state: dict | None = None):
        self.topology, self.opt = topology, options
        self.out = Path(options.out_dir)
        self.run = RunDir(self.out)
        self.history: list[dict] = list(history or [])
        self.console = Console(stderr=True, quiet=options.quiet, highlight=False)
        self.roles = roles(topology)
        self._tracker_state = tracker_state
        self.tracker = None
        self.progress: Progress | None = None
        self._task = None
        self._t0 = time.time()

    # ------------------------------------------------------------------ lifecycle
    def start(self, info, steps_per_epoch: int, start_epoch: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.run.topology.write_text(self.topology.to_yaml())
        self.run.write_history(self.history)  # derived from the checkpoint: a resume drops epochs it does not hold
        graph = self._draw_graph()
        self.steps_per_epoch = steps_per_epoch
        if self.opt.tracking and self.topology.config.tracking.enabled:
            self._start_tracker(graph)
        what = f"resuming at epoch {start_epoch + 1}" if start_epoch else "starting"
        self.console.print(f"[bold]{self.topology.name}[/]: {what}; {self.topology.total_epochs} epochs, "
                           f"{len(self.topology.config.peers)} peers, {len(self.topology.edges)} edges → {self.out}")
        if not self.opt.quiet and sys.stderr.isatty():
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=True)
            self.progress.start()

    def attach(self) -> None:
        """Join runs another process opened (the ray engine's controller-side callback)."""
        self.steps_per_epoch = 0
        if self._tracker_state:
            from ..tracking import RunTracker

            self.tracker = RunTracker.resume(self._tracker_state)

    def notice(self, text: str) -> None:
        """A one-line notice shown even with --quiet (a resume that falls back or starts over)."""
        print(text, file=sys.stderr, flush=True)

    def _draw_graph(self) -> Path | None:
        try:
            from ..plot import draw_topology

            nodes, edges = self.topology.graph_spec()
            return draw_topology(nodes, edges, self.run.graph_picture, title=self.topology.name)
        except Exception as err:  # a picture must never stop training
            self.console.print(f"[yellow]could not draw the topology: {err}[/]")
            return None

    def _start_tracker(self, graph: Path | None) -> None:
        import logging

        from ..tracking import TAG_OUT, TAG_TOPOLOGY, RunTracker, default_tracking_uri

        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)

        c = self.topology.config
        if self._tracker_state:
            self.tracker = RunTracker.resume(self._tracker_state)
            return
        uri = self.opt.tracking_uri or c.tracking.uri or default_tracking_uri()
        tags = {TAG_TOPOLOGY: c.name, TAG_OUT: str(self.out.resolve()), **self.opt.extra_tags}
        self.tracker = RunTracker(uri, c.tracking.experiment or c.name, c.tracking.run_name or c.name, tags=tags,
                                  nest_under=self.opt.parent_run_id)
        nodes = {}
        for name, p in c.peers.items():
            nodes[name] = {"role": self.roles[name], **_flat(p.model_dump(mode="json", exclude_none=True))}
            nodes[name]["incoming"] = ", ".join(e.key for e in self.topology.edges if e.target == name) or "none"
        for name, e in c.ensembles.items():
            nodes[name] = {"role": "ensemble", "combine": e.combine, "members": ", ".join(e.members)}
        params = {"engine": c.engine.name, **_flat(c.train.model_dump(mode="json"), "train."),
                  **_flat(c.data.model_dump(mode="json", exclude={"synthetic"}), "data."),
                  "edges": len(self.topology.edges), "stages": len(self.topology.stages),
                  **self.opt.extra_params}
        self.tracker.start(nodes, params)
        self.tracker.log_text(self.topology.to_yaml(), "topology.yaml")
        if graph is not None:
            self.tracker.log_artifact(graph)

    def tracker_state(self) -> dict | None:
        return self.tracker.state() if self.tracker else None

    # ------------------------------------------------------------------ producing stages
    @contextmanager
    def task(self, description: str, total: int):
        """Progress of a long piece of work outside the epochs (a producing stage): a bar, or start/end lines."""
        t0 = time.time()
        self.console.print(f"{escape(description)}: {total} steps")
        if self.progress is not None:
            task = self.progress.add_task(escape(description), total=total, info="")
            try:
                yield _Advance(lambda n: self.progress.advance(task, n))
            finally:
                self.progress.remove_task(task)
        else:
            yield _Advance(lambda n: None)
        self.console.print(f"{escape(description)}: done in {time.time() - t0:.1f}s")

    # ------------------------------------------------------------------ per epoch
    def epoch_started(self, epoch: int, stage: Stage) -> None:
        if self.progress is not None:
            if self._task is not None:
                self.progress.remove_task(self._task)
            desc = f"epoch {epoch + 1}/{self.topology.total_epochs}" + (escape(f" [{stage.name}]") if len(self.topology.stages) > 1 else "")
            self._task = self.progress.add_task(desc, total=self.steps_per_epoch, info="")

    def step_done(self) -> None:
        if self.progress is not None:
            self.progress.advance(self._task)

    def epoch_done(self, epoch: int, stage: Stage, train: dict, evals: dict, seconds: float) -> None:
        self.log_record(epoch_record(self.topology.nodes, self.history, epoch, stage.name, train, evals, seconds))

    def log_record(self, record: dict) -> None:
        """Add an epoch's record: history, metrics.jsonl, MLflow, the on_epoch hook and the console line."""
        epoch, nodes = record["epoch"], record["nodes"]
        self.history.append(record)
        self.run.append_epoch(record)
        fault_point("metrics-line")
        if self.tracker:
            self.tracker.log_epoch(epoch, nodes)
        if self.opt.on_epoch is not None:
            self.opt.on_epoch(epoch, nodes)  # e.g. a Tune trial reporting to its scheduler
        fault_point("epoch-logged")
        accs = " · ".join(f"{n} {m['top1']:.1f}%" for n, m in nodes.items() if "top1" in m)
        losses = " · ".join(f"{n} loss {m['loss']:.3f}" for n, m in nodes.items() if "loss" in m)
        self.console.print(f"epoch {epoch + 1}/{self.topology.total_epochs}"
                           + (escape(f" [{record['stage']}]") if len(self.topology.stages) > 1 else "")
                           + f"  {accs or losses}  ({record['seconds']:.1f}s)")

    def best(self, node: str) -> tuple[float, int] | None:
        """(best top-1, its epoch) so far."""
        return best(self.history, node)

    # ------------------------------------------------------------------ end
    def summary(self, finished: bool = True) -> dict[str, Any]:
        """Per peer and ensemble: last- and best-epoch top-1 (reference tables mix the two)."""
        c = self.topology.config
        out: dict[str, Any] = {"name": c.name, "out": str(self.out), "finished": finished,
                               "epochs": self.history[-1]["epoch"] + 1 if self.history else 0,
                               "peers": {}, "ensembles": {}}
        for section, names in (("peers", c.peers), ("ensembles", c.ensembles)):
            for n in names:
                last = next((h for h in reversed(self.history) if "top1" in h["nodes"].get(n, {})), None)
                if last is None:
                    continue
                best = self.best(n)
                entry = {"role": self.roles[n], "top1_last": round(last["nodes"][n]["top1"], 4),
                         "top5_last": round(last["nodes"][n]["top5"], 4), "top1_best": round(best[0], 4),
                         "best_epoch": best[1] + 1, "last_epoch": last["epoch"] + 1}
                if section == "peers":
                    entry = {"model": c.peers[n].model, **entry}
                out[section][n] = entry
        return out

    def _curves(self) -> Path | None:
        try:
            from ..plot import plot_curves

            series = accuracy_series(self.history)
            return plot_curves(series, self.run.curves_picture, title=self.topology.name) if series else None
        except Exception as err:
            self.console.print(f"[yellow]could not plot curves: {err}[/]")
            return None

    def _close_progress(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self) -> dict[str, Any]:
        self._close_progress()
        summary = self.summary(finished=True)
        self.run.write_summary(summary)
        curves = self._curves()
        if self.tracker:
            self.tracker.log_summary({n: {k: v for k, v in e.items() if isinstance(v, (int, float))}
                                      for sec in ("peers", "ensembles") for n, e in summary[sec].items()})
            if curves is not None:
                self.tracker.log_artifact(curves)
            self.tracker.log_artifact(self.run.summary)
            self.tracker.finish("FINISHED")
        for sec in ("peers", "ensembles"):
            for n, e in summary[sec].items():
                self.console.print(f"  {n:<12} {e.get('model', e['role']):<14} top-1 last {e['top1_last']:.2f}%  "
                                   f"best {e['top1_best']:.2f}% (epoch {e['best_epoch']})")
        self.console.print(f"done in {time.time() - self._t0:.0f}s → {self.out}")
        return summary

    def stopped(self, next_epoch: int) -> None:
        """Paused on request (--stop-after-epochs): MLflow runs stay open for --resume."""
        self._close_progress()
        self.console.print(f"stopped after epoch {next_epoch}; continue with --resume --out {self.out}")

    def failed(self, err: BaseException) -> None:
        self._close_progress()
        if self.tracker:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            try:
                self.tracker.finish(status)
            except Exception:
                pass

