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

from ..compare import SEED_PATH
from .space import Space, SpaceConfig, check_space, load_space, metric_epochs, parse_seeds
from .sweep import TrialOutcome, print_sweep, run_sweep

__all__ = ["SEED_PATH", "Space", "SpaceConfig", "TrialOutcome", "check_space", "load_space", "metric_epochs",
           "parse_seeds", "print_sweep", "run_sweep"]
