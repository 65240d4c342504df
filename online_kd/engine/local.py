"""The local engine: the epoch loop in this process, one worker holding every peer, nothing to exchange."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..errors import DivergenceError
from ..registry import register_engine
from ..rundir import RunDir
from ..topology.graph import Topology
from . import checkpoint as ckpt
from .base import Engine, Resources
from .loop import EpochLoop, EpochRecord, random_state
from .options import RunOptions, check_inits
from .report import Reporter
from .runtime import resolve_device


class LocalLoop(EpochLoop):
    """The epoch loop reporting through a :class:`Reporter` and checkpointing under ``<out>/checkpoints``."""

    def __init__(self, topology: Topology, options: RunOptions):
        c = topology.config
        super().__init__(topology, options.out_dir, resolve_device(c.train.device), threads=c.train.threads,
                         stop_after=options.stop_after_epochs, step_log="local" if options.record_steps else None)
        self.opt = options
        self.reporter: Reporter | None = None
        self.notes: list[str] = []  # what the resume found (a damaged checkpoint skipped, none at all)

    def started(self, state, info, steps_per_epoch, start_epoch) -> None:
        self.reporter = Reporter(self.topology, self.opt, history=state["history"] if state else [],
                                 tracker_state=state.get("tracker") if state else None)
        for note in self.notes:
            self.reporter.notice(note)
        self.reporter.start(info, steps_per_epoch, start_epoch)

    def epoch_started(self, epoch, stage, steps_per_epoch) -> None:
        self.reporter.steps_per_epoch = steps_per_epoch
        self.reporter.epoch_started(epoch, stage)

    def on_step(self, result) -> None:
        self.reporter.step_done({p: t["loss"] for p, t in result.terms.items() if "loss" in t})

    def epoch_done(self, record: EpochRecord) -> None:
        self.reporter.epoch_done(record.epoch, record.stage, record.train, record.evals, record.seconds)

    def engine_state(self) -> dict[str, Any]:
        return {"rng": random_state(self.device),
                "history": self.reporter.history, "tracker": self.reporter.tracker_state(),
                "topology": self.topology.to_yaml()}

    def save(self, epoch, files) -> None:
        ckpt.write_checkpoint(RunDir(self.out_dir).checkpoints, epoch, files)

    @contextlib.contextmanager
    def restored(self):
        if not self.opt.resume:
            yield None
            return
        root = RunDir(self.out_dir).checkpoints
        names = [ckpt.ENGINE_FILE, *(ckpt.peer_file(n) for n in self.rt.peers)]
        path, _ = ckpt.newest_intact(root, names, map_location=self.device, say=self.notes.append)
        if path is None:
            self.notes.append(f"--resume: no checkpoint under {root} (stopped before its first epoch ended); "
                              "starting from epoch 1")
        yield path

    def log(self, message: str) -> None:
        self.reporter.console.print(message, markup=False)

    def task(self, description: str, total: int):
        return self.reporter.task(description, total)


@register_engine("local")
class LocalEngine(Engine):
    """Runs a topology in this process: the design's synchronous step, evaluation, checkpoints."""

    @classmethod
    def resources(cls, topology: Topology) -> Resources:
        """One process on one CPU, and a GPU when the topology asks for one and there is one."""
        driver: dict[str, float] = {"CPU": 1}
        if topology.config.train.device != "cpu" and torch.cuda.is_available():
            driver["GPU"] = 1
        return Resources(driver, 1)

    def run(self) -> dict[str, Any]:
        check_inits(self.topology)
        loop = LocalLoop(self.topology, self.opt)
        try:
            finished = loop.run()
        except BaseException as err:
            if loop.reporter is not None:
                loop.reporter.failed(err)
            if isinstance(err, DivergenceError):
                last = ckpt.latest_checkpoint(RunDir(self.opt.out_dir).checkpoints)
                raise err.keeping(ckpt.describe_kept(last, int(last.name.split("-")[1]) if last else None)) from None
            raise
        if not finished:
            loop.reporter.stopped(loop.next_epoch)
            return loop.reporter.summary(finished=False)
        return loop.reporter.finish()
