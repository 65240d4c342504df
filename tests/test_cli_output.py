"""What a user sees from the README's main command on the ray engine, with stdout and stderr piped:
online-kd's own lines only (no Ray noise, no colour codes), progress inside an epoch, and where the
run went at the end; ``--verbose`` lets Ray's own lines through."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: lines of Ray's and Ray Train's own output that must not reach a default run's output
RAY_NOISE = [
    re.compile(r"pid=\d+"),                      # (TrainController pid=…) / (RayTrainWorker pid=…) prefixes
    re.compile(r"core_worker"),                  # core_worker.cc … PreemptionWatcher
    re.compile(r"Ray Train"),                    # "Ray Train … worker group", "Ray Train run …" banners
    re.compile(r"\[RayTrainWorker"),
    re.compile(r"(?i)auth(entication)? token|token auth"),
    re.compile(r"(?i)worker group|world_rank|Started a local Ray instance|Started distributed worker processes"),
    re.compile(r"\b(INFO|DEBUG)\b"),             # a logger's INFO/DEBUG line from any process
]
ANSI = re.compile(r"\x1b\[")
PROGRESS = re.compile(r"^epoch \d+/\d+: step \d+/\d+, [\d.]+ steps/s, loss a [\d.]+ · b [\d.]+ \(\d+s\)$")


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONLINE_KD_PROGRESS_EVERY": "0", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "online_kd.cli", "run", str(ROOT / "topologies/quick/dml.yaml"), "--engine", "ray",
           "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=20", "--set", "train.threads=1",
           "--tracking-uri", uri, "--out", str(tmp_path / "run"), *extra]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_ray_run_output_is_online_kds_own(tmp_path):
    r = _run(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    noise = [ln for ln in lines if any(p.search(ln) for p in RAY_NOISE)]
    assert not noise, "Ray's own lines in the output:\n" + "\n".join(noise)
    assert not [ln for ln in lines if ANSI.search(ln)], "colour codes in piped output"
    assert "starting Ray…" in lines
    assert any(re.fullmatch(r"2 workers up in \d+ s", ln) for ln in lines), lines
    assert any(PROGRESS.match(ln) for ln in lines), "no progress line inside an epoch:\n" + "\n".join(lines)
    epochs = [ln for ln in lines if re.match(r"epoch [12]/2  ", ln)]
    assert [e.split()[1] for e in epochs] == ["1/2", "2/2"], lines
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tail = "\n".join(lines[-4:])
    assert f"MLflow: {uri}" in tail and f"mlflow ui --backend-store-uri {uri}" in tail, tail
    assert f"run directory: {tmp_path / 'run'}" in tail, tail


@pytest.mark.slow
def test_verbose_ray_run_shows_rays_lines(tmp_path):
    r = _run(tmp_path, "--verbose", "--no-tracking")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert re.search(r"\((RayTrainWorker|TrainController) pid=\d+", out), out[-3000:]


def test_relay_merges_each_workers_steps_and_losses_into_one_progress_line(tmp_path, capsys, monkeypatch):
    """The driver side of the ray engine's progress: each worker posts its own peers' running sums; the
    relay shows one line per update with every peer, then the epoch's line, and drops late posts."""
    from online_kd.engine.options import RunOptions
    from online_kd.engine.ray_progress import Relay
    from online_kd.engine.report import Reporter
    from online_kd.topology import load_topology

    monkeypatch.setenv("ONLINE_KD_PROGRESS_EVERY", "0")
    topo = load_topology(str(ROOT / "topologies/quick/dml.yaml"))
    reporter = Reporter(topo, RunOptions(out_dir=tmp_path, tracking=False))
    reporter.start(None, 0, 0)
    relay = Relay(None, reporter, workers=2)
    stage = topo.stages[0].name
    relay._on_up(1)
    relay._on_up(0)
    relay._on_step(0, 0, stage, 1, 3, 0.5, {"a": 2.0}, {"a": 1})
    relay._on_step(1, 0, stage, 2, 3, 1.0, {"b": 6.0}, {"b": 2})
    relay._on_step(1, 1, stage, 1, 3, 0.25, {"b": 1.0}, {"b": 1})  # the next epoch, before this one's line
    relay._on_epoch({"epoch": 1, "stage": stage, "seconds": 1.5, "nodes": {"a": {"top1": 50.0}, "b": {"top1": 25.0}}})
    relay._on_step(0, 0, stage, 3, 3, 1.5, {"a": 9.0}, {"a": 3})  # posted before the epoch ended, arrived after
    lines = capsys.readouterr().err.splitlines()[1:]
    assert re.fullmatch(r"2 workers up in \d+ s", lines[0]), lines
    assert lines[1:] == ["epoch 1/12: step 1/3, 2.0 steps/s, loss a 2.000 (0s)",
                         "epoch 1/12: step 2/3, 2.0 steps/s, loss a 2.000 · b 3.000 (1s)",
                         "epoch 1/12  a 50.0% · b 25.0%  (1.5s)",
                         "epoch 2/12: step 1/3, 4.0 steps/s, loss b 1.000 (0s)"]
