"""What a run tells people: progress, per-epoch history, MLflow runs, pictures and the summary."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

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


PROGRESS_EVERY_ENV = "ONLINE_KD_PROGRESS_EVERY"
BAR_REFRESH_S = 0.5  # how often the bar's running losses are read (a read may wait for the device)


def progress_every() -> float:
    """Seconds between plain progress lines when the output is not a terminal ($ONLINE_KD_PROGRESS_EVERY, 30)."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_EVERY_ENV, 30)))
    except ValueError:
        return 30.0


def run_console(quiet: bool = False) -> Console:
    """The console a run writes to (stderr): a terminal gets colours and its width; a pipe or a file gets
    plain text, no ANSI codes and no wrapping, whatever the environment says about colours."""
    tty = sys.stderr.isatty()
    return Console(stderr=True, quiet=quiet, highlight=False, force_terminal=tty, no_color=not tty,
                   soft_wrap=not tty, width=None if tty else 1000)


class RunningLoss:
    """Each peer's mean step loss since the epoch began. Tensors are summed where they live and read
    only when shown, so a step on a GPU does not wait for the device."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, losses: dict[str, Any]) -> None:
        for peer, v in losses.items():
            v = v.detach() if hasattr(v, "detach") else float(v)
            self.sums[peer] = v if peer not in self.sums else self.sums[peer] + v
            self.counts[peer] = self.counts.get(peer, 0) + 1

    def text(self) -> str:
        return " · ".join(f"{p} {float(v) / self.counts[p]:.3f}" for p, v in self.sums.items())


class StepsPerSecond(ProgressColumn):
    """The bar's speed in steps/s (rich's estimate over the last 30 s)."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.1f} steps/s" if task.speed else "")


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


def mlflow_ui_command(uri: str) -> str:
    """How to look at a tracking store: the `mlflow ui` command line for a database or file store; a
    server's own address for an http(s) one."""
    import shlex

    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


class Reporter:
    """Collects each epoch's metrics; shows progress, logs MLflow, writes the run directory's files."""

    def __init__(self, topology: Topology, options, history: list | None = None, tracker_state: dict | None = None):
        self.topology, self.opt = topology, options
        self.out = Path(options.out_dir)
        self.run = RunDir(self.out)
        self.history: list[dict] = list(history or [])
        self.console = run_console(options.quiet)
        self.progress_every = progress_every()
        self.roles = roles(topology)
        self._tracker_state = tracker_state
        self.tracker = None
        self.progress: Progress | None = None
        self._task = None
        self._t0 = time.time()
        self._epoch_label = ""
        self._steps = 0
        self._loss = RunningLoss()
        self._epoch_t0 = self._shown = time.monotonic()

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
        if not self.opt.quiet and self.console.is_terminal:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     StepsPerSecond(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=True)
            self.progress.start()

    def attach(self) -> None:
        """Join runs another process opened (the ray engine's controller-side callback)."""
        self.steps_per_epoch = 0
        if self._tracker_state:
            from ..tracking import RunTracker

            self.tracker = RunTracker.resume(self._tracker_state)

    def phase(self, text: str) -> None:
        """A short line on how the run is getting on ('starting Ray…', '2 workers up in 12 s'); not with --quiet."""
        self.console.print(text, markup=False)

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
            # Epochs the checkpoint holds that the store may lack: the ray engine's checkpoint is committed
            # before the controller logs the epoch. Steps the store already holds are not logged again.
            for h in self.history:
                self.tracker.log_epoch(h["epoch"], h["nodes"])
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
    def _label(self, number: int, stage: str) -> str:
        """'epoch 3/10 [stage]' (the stage where there are several); ``number`` counts from 1."""
        staged = f" [{stage}]" if len(self.topology.stages) > 1 else ""
        return f"epoch {number}/{self.topology.total_epochs}{staged}"

    def epoch_started(self, epoch: int, stage: Stage) -> None:
        """An epoch begins (``epoch``: the loop's 0-based index): resets the bar or the periodic line."""
        self._epoch_label = self._label(epoch + 1, stage.name)
        self._steps = 0
        self._loss = RunningLoss()
        self._epoch_t0 = self._shown = time.monotonic()
        if self.progress is not None:
            if self._task is not None:
                self.progress.remove_task(self._task)
            self._task = self.progress.add_task(escape(self._epoch_label), total=self.steps_per_epoch, info="")

    def step_done(self, losses: dict[str, Any] | None = None) -> None:
        """A training step ended; ``losses``: each trained peer's step loss (a float or a 0-d tensor).
        On a terminal the bar advances; otherwise a plain progress line every :attr:`progress_every` seconds."""
        if losses:
            self._loss.add(losses)
        self.steps_done(self._steps + 1)

    def steps_done(self, steps: int, loss: RunningLoss | None = None, elapsed: float | None = None) -> None:
        """``steps`` steps of the epoch are done in ``elapsed`` seconds, with these running losses: progress
        counted elsewhere (the ray engine's workers) shown like :meth:`step_done`'s."""
        advance, self._steps = steps - self._steps, steps
        if loss is not None:
            self._loss = loss
        now = time.monotonic()
        if elapsed is not None:
            self._epoch_t0 = now - elapsed
        if self.progress is not None and self._task is not None:
            self.progress.advance(self._task, advance)
            if now - self._shown >= BAR_REFRESH_S or self._steps == self.steps_per_epoch:
                self._shown = now
                self.progress.update(self._task, info=escape(self._loss.text()))
        elif self.progress is None and not self.opt.quiet and now - self._shown >= self.progress_every:
            self._shown = now
            self.console.print(self.progress_line(now), markup=False)

    def progress_line(self, now: float | None = None) -> str:
        """'epoch 2/10: step 120/782, 4.1 steps/s, loss a 1.234 · b 1.567 (29s)': the plain progress line."""
        elapsed = (time.monotonic() if now is None else now) - self._epoch_t0
        of = f"/{self.steps_per_epoch}" if self.steps_per_epoch else ""
        rate = f", {self._steps / elapsed:.1f} steps/s" if elapsed > 0 else ""
        loss = self._loss.text()
        loss = f", loss {loss}" if loss else ""
        return f"{self._epoch_label}: step {self._steps}{of}{rate}{loss} ({elapsed:.0f}s)"

    def epoch_done(self, epoch: int, stage: Stage, train: dict, evals: dict, seconds: float) -> None:
        """Record an epoch (``epoch``: the loop's 0-based index). Everything a person or a tool reads numbers
        epochs from 1 — console, metrics.jsonl, summary.json, MLflow steps, checkpoint folders — so the
        number of an epoch is also the count of epochs done when it ends."""
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
        self.epoch_line(record)

    def epoch_line(self, record: dict) -> None:
        """The console line of an epoch's record: 'epoch 3/12  a 91.2% · b 90.8%  (4.1s)'."""
        nodes = record["nodes"]
        accs = " · ".join(f"{n} {m['top1']:.1f}%" for n, m in nodes.items() if "top1" in m)
        losses = " · ".join(f"{n} loss {m['loss']:.3f}" for n, m in nodes.items() if "loss" in m)
        self.console.print(escape(self._label(record["epoch"], record["stage"])) + f"  {accs or losses}  "
                           f"({record['seconds']:.1f}s)")

    def best(self, node: str) -> tuple[float, int] | None:
        """(best top-1, its epoch number) so far."""
        return best(self.history, node)

    # ------------------------------------------------------------------ end
    def summary(self, finished: bool = True) -> dict[str, Any]:
        """Per peer and ensemble: last- and best-epoch top-1 (reference tables mix the two)."""
        c = self.topology.config
        out: dict[str, Any] = {"name": c.name, "out": str(self.out), "finished": finished,
                               "epochs": self.history[-1]["epoch"] if self.history else 0,
                               "peers": {}, "ensembles": {}}
        if self.tracker is not None:
            out["mlflow"] = {k: v for k, v in self.where().items() if k != "run_dir"}
        for section, names in (("peers", c.peers), ("ensembles", c.ensembles)):
            for n in names:
                last = next((h for h in reversed(self.history) if "top1" in h["nodes"].get(n, {})), None)
                if last is None:
                    continue
                best = self.best(n)
                entry = {"role": self.roles[n], "top1_last": round(last["nodes"][n]["top1"], 4),
                         "top5_last": round(last["nodes"][n]["top5"], 4), "top1_best": round(best[0], 4),
                         "best_epoch": best[1], "last_epoch": last["epoch"]}
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
        self.console.print(f"done in {time.time() - self._t0:.0f}s")
        self._print_where()
        return summary

    def where(self) -> dict[str, str]:
        """Where the run's results are: its directory and, when tracked, the MLflow store, experiment and run."""
        out = {"run_dir": str(self.out.resolve())}
        if self.tracker is not None:
            out.update(tracking_uri=self.tracker.uri, experiment=self.tracker.experiment,
                       run_id=self.tracker.parent_run_id or "")
        return out

    def _print_where(self) -> None:
        w = self.where()
        self.console.print(f"run directory: {w['run_dir']}", markup=False)
        if "tracking_uri" in w:
            self.console.print(f"MLflow: {w['tracking_uri']}  experiment '{w['experiment']}'  run {w['run_id']}",
                               markup=False)
            self.console.print(f"browse: {mlflow_ui_command(w['tracking_uri'])}", markup=False)

    def stopped(self, next_epoch: int) -> None:
        """Paused on request (--stop-after-epochs): MLflow runs stay open for --resume."""
        self._close_progress()
        self.console.print(f"stopped after epoch {next_epoch}; continue with --resume --out {self.out}")
        self._print_where()

    def failed(self, err: BaseException) -> None:
        self._close_progress()
        if self.tracker:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            try:
                self.tracker.finish(status)
            except Exception:
                pass

