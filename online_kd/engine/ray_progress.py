"""What the ray engine shows while it runs, without Ray's own log forwarding.

Workers and the Train controller live in other processes; what they print reaches the driver only
through Ray's log forwarding (``log_to_driver``), prefixed with ``(RayTrainWorker pid=…)`` and mixed
with Ray's own lines. Instead they post small messages to a :class:`Channel` actor, and a
:class:`Relay` thread on the driver turns them into the driver's own output (the run's
:class:`~online_kd.engine.report.Reporter`): "2 workers up in 12 s", the progress bar or the plain
progress line inside an epoch, each epoch's line and forwarded warnings. That lets the driver start
Ray with ``log_to_driver=False`` unless ``--verbose``.

Workers post every :data:`POST_EVERY_S` seconds at most (and on an epoch's first step), never per step:
a post is one asynchronous actor call, outside the collectives of the step.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

POST_EVERY_S = 1.0  # a worker's progress posts, at most this often
POLL_S = 0.25  # how often the driver's relay collects the channel's messages


class _Channel:
    """A mailbox: posts are kept in order until the driver takes them."""

    def __init__(self):
        self.messages: list[tuple] = []

    def post(self, message: tuple) -> None:
        self.messages.append(message)

    def take(self) -> list[tuple]:
        out, self.messages = self.messages, []
        return out


def open_channel():
    """A new channel actor (no CPU of its own) in the running Ray instance; its handle goes to workers.

    It lives on the driver's node, as the Train controller does: a node lost mid-run (which the run
    survives through ``engine.max_failures``) must not take the run's output channel with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, max_concurrency=1)(_Channel).options(scheduling_strategy=here).remote()


def post_epoch(channel, record: dict) -> None:
    """Controller side: an epoch's record, delivered before the callback returns (so before fit() ends)."""
    import ray

    try:
        ray.get(channel.post.remote(("epoch", record)), timeout=30)
    except Exception:  # the console line is lost; metrics.jsonl and MLflow already have the epoch
        pass


class WarningsToChannel(logging.Handler):
    """Forwards a worker's or the controller's warnings and errors (Python logging) to the driver."""

    def __init__(self, channel, where: str):
        super().__init__(logging.WARNING)
        self.channel, self.where = channel, where

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.channel.post.remote(("log", self.where, record.levelname.lower(), record.getMessage()))
        except Exception:  # a log line must never stop training
            pass


class StepPoster:
    """Worker side: this rank's steps and its peers' running losses, posted at most every :data:`POST_EVERY_S`."""

    def __init__(self, channel, rank: int, primary: bool):
        self.channel, self.rank, self.primary = channel, rank, primary
        self.epoch = -1
        self.stage = ""
        self.steps = self.total = 0
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._posted = 0.0

    def up(self, forward_warnings: bool = True) -> None:
        """This worker has started and joined the process group; from now on its warnings go to the driver
        (``forward_warnings``: when Ray does not forward this worker's output itself)."""
        self.channel.post.remote(("up", self.rank))
        if not forward_warnings:
            return
        logging.captureWarnings(True)
        handler = WarningsToChannel(self.channel, f"rank {self.rank}")
        for name in ("", "ray.train"):
            logging.getLogger(name).addHandler(handler)

    def epoch_started(self, epoch: int, stage: str, steps_per_epoch: int) -> None:
        self.epoch, self.stage, self.total, self.steps = epoch, stage, steps_per_epoch, 0
        self.sums, self.counts = {}, {}
        self._posted = 0.0
        self._t0 = time.monotonic()

    def step_done(self, terms: dict[str, dict[str, Any]]) -> None:
        self.steps += 1
        if self.primary:  # a peer's replicas train on shards of one batch: replica 0's loss stands for the peer
            for peer, t in terms.items():
                if "loss" in t:
                    v = t["loss"].detach()
                    self.sums[peer] = v if peer not in self.sums else self.sums[peer] + v
                    self.counts[peer] = self.counts.get(peer, 0) + 1
        now = time.monotonic()
        if self.steps == 1 or now - self._posted >= POST_EVERY_S:
            self._posted = now
            sums = {p: float(v) for p, v in self.sums.items()}
            self.channel.post.remote(("step", self.rank, self.epoch, self.stage, self.steps, self.total,
                                      now - self._t0, sums, dict(self.counts)))


class Relay:
    """Driver side: a thread that takes the channel's messages every :data:`POLL_S` and shows them through
    the run's reporter, while ``trainer.fit()`` blocks the main thread. :meth:`stop` shows what is left."""

    def __init__(self, channel, reporter, workers: int):
        self.channel, self.reporter, self.workers = channel, reporter, workers
        self._up: set[int] = set()
        self._ranks: dict[int, tuple] = {}  # rank -> its latest step message of the current epoch
        self._epoch = -1
        self._next = max((h["epoch"] for h in reporter.history), default=0)  # 0-based index of the next epoch line
        self._held: list[tuple] = []  # steps of the next epoch, shown once the current one's line is
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="online-kd-relay", daemon=True)

    def start(self) -> "Relay":
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            messages = ray.get(self.channel.take.remote(), timeout=30)
        except Exception:  # Ray shutting down, or the actor gone: nothing more to show
            return
        for m in messages:
            getattr(self, f"_on_{m[0]}")(*m[1:])

    def _on_up(self, rank: int) -> None:
        self._up.add(rank)
        if len(self._up) == self.workers:
            self.reporter.phase(f"{self.workers} workers up in {time.monotonic() - self._t0:.0f} s")

    def _on_step(self, rank, epoch, stage, steps, total, elapsed, sums, counts) -> None:
        if epoch < self._next:
            return  # a late post of an epoch whose line is shown
        if epoch > self._next:  # the controller has not sent the line of the epoch before
            self._held.append((rank, epoch, stage, steps, total, elapsed, sums, counts))
            return
        if epoch != self._epoch:
            self._epoch, self._ranks = epoch, {}
            self.reporter.steps_per_epoch = total
            self.reporter.epoch_started(epoch, next(s for s in self.reporter.topology.stages if s.name == stage))
        self._ranks[rank] = (steps, sums, counts)
        from .report import RunningLoss

        loss = RunningLoss()
        for _, (_, s, c) in sorted(self._ranks.items()):  # peers in rank order, whichever posted first
            loss.sums.update(s)
            loss.counts.update(c)
        self.reporter.steps_done(max(s for s, _, _ in self._ranks.values()), loss, elapsed)

    def _on_epoch(self, record: dict) -> None:
        self._next = max(self._next, record["epoch"])
        self.reporter.epoch_line(record)
        held, self._held = self._held, []
        for m in held:
            self._on_step(*m)

    def _on_log(self, where: str, level: str, text: str) -> None:
        self.reporter.phase(f"{where}: {level}: {text}")


def quiet_driver_logs() -> None:
    """The driver's Ray and Ray Train loggers at WARNING: their INFO lines are Ray's, not the run's."""
    for name in ("ray", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
