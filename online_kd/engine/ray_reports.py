"""Controller-side reporting of the ray engine: every rank's epoch report merged and logged once."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from ..rundir import RunDir
from . import ray_checkpoint
from .checkpoint import atomic_write_text, fault_point
from .options import RunOptions
from .ray_storage import RayStorage, of_run
from .record import epoch_record, merge_reports
from .report import Reporter


def options_dict(opts: RunOptions) -> dict:
    return {"out_dir": str(Path(opts.out_dir).resolve()), "tracking": opts.tracking, "quiet": opts.quiet,
            "tracking_uri": opts.tracking_uri}


class EpochReports(UserCallback):
    """Controller-side: merges every rank's epoch report and logs it once (MLflow, history, progress)."""

    def __init__(self, raw: dict, options: dict, tracker_state: dict | None, channel=None):
        self.raw, self.options, self.tracker_state = raw, options, tracker_state
        self.channel = channel  # the driver's progress channel: epoch lines go there, not to this process's stderr
        self._reporter = None
        self._where: RayStorage | None = None

    def _get_reporter(self) -> Reporter:
        if self._reporter is None:
            from ..topology import load_topology

            topo = load_topology(self.raw, check=False)
            opts = RunOptions(out_dir=Path(self.options["out_dir"]), tracking=self.options["tracking"],
                              quiet=self.options["quiet"] or self.channel is not None,
                              tracking_uri=self.options["tracking_uri"])
            self._reporter = Reporter(topo, opts, history=RunDir(opts.out_dir).history(), tracker_state=self.tracker_state)
            self._reporter.attach()
        return self._reporter

    def _storage(self) -> RayStorage:
        if self._where is None:
            self._where = of_run(Path(self.options["out_dir"]))
        return self._where

    @staticmethod
    def _write_worker_files(run: RunDir, metrics: list[dict[str, Any]]) -> None:
        """What workers would have written into the run directory, which they may not see: each rank's pid
        (``pids/rank{r}.pid``), its steps of the epoch (``steps/rank{r}.jsonl``, ``--record-steps``) and
        its step profile (``profile/rank{r}.json``, ``--profile``)."""
        for m in metrics:
            rank = m["rank"]
            if "pid" in m:
                atomic_write_text(str(m["pid"]), run.path / "pids" / f"rank{rank}.pid")
            if m.get("steps"):
                (run.path / "steps").mkdir(parents=True, exist_ok=True)
                with open(run.path / "steps" / f"rank{rank}.jsonl", "a") as f:
                    f.write("".join(m["steps"]))
            if m.get("profile"):
                atomic_write_text(json.dumps(m["profile"]), run.path / "profile" / f"rank{rank}.json")

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        rep = self._get_reporter()
        records = None
        self._write_worker_files(rep.run, metrics)
        if checkpoint is not None:  # Ray has committed it: its history is the truth, the records follow it
            fault_point("ray-reported")
            atomic_write_text(self._storage().where(checkpoint.path), rep.run.checkpoints / "latest")
            records = ray_checkpoint.committed_history(checkpoint)
        if records is None:
            records = [epoch_record(rep.topology.nodes, rep.history, *merge_reports(metrics))]
        logged = {h["epoch"] for h in rep.history}
        for record in records:  # epochs a killed controller committed but never logged, then this one
            if record["epoch"] not in logged:  # a re-run after a restart is logged once
                rep.log_record(record)
                if self.channel is not None:
                    from .ray_progress import post_epoch

                    post_epoch(self.channel, record)
