"""Resume after faults: a kill -9 at each point of the checkpoint write path, damaged or tampered
checkpoints, a run killed before its first checkpoint.

The kills are real: ``ONLINE_KD_FAULT=<point>[:N]`` makes the CLI process (or, on the ray engine,
the Ray Train controller) SIGKILL itself at that point of the real code, the N-th time it gets
there. A resumed run must end as an uninterrupted one: the same summary.json, final weights,
metrics.jsonl and MLflow metric histories (real SQLite store), no epoch repeated or lost.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from online_kd.cli import main
from online_kd.engine import checkpoint as ckpt
from online_kd.engine import ray_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DML = ROOT / "topologies" / "quick" / "dml.yaml"
EPOCHS = 3
SETS = [f"train.epochs={EPOCHS}", "train.max_steps_per_epoch=3", "train.threads=1"]
LOCAL_POINTS = ["metrics-line", "epoch-logged", "checkpoint-files", "checkpoint-renamed", "checkpoint-latest"]


def args(out, engine="local", uri=None, *extra):
    sets = [a for s in SETS for a in ("--set", s)]
    track = ["--tracking-uri", uri] if uri else ["--no-tracking"]
    return ["run", str(DML), "--out", str(out), "--engine", engine, "--quiet", *sets, *track, *extra]


def cli(out, engine="local", uri=None, *extra, fault=None):
    env = {k: v for k, v in os.environ.items() if k != ckpt.FAULT_ENV}
    if fault:
        env[ckpt.FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-m", "online_kd.cli", *args(out, engine, uri, *extra)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)


def outcome(out: Path, uri: str | None = None) -> dict:
    """What a finished run leaves: summary, per-epoch records (wall times aside), weights, MLflow histories."""
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("out")
    summary.pop("mlflow", None)  # the store and run id of this run, which differ between runs
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        r.pop("seconds")
    last = ckpt.latest_checkpoint(out / "checkpoints")
    weights = {p: ckpt.load(last / ckpt.peer_file(p))["model"] for p in ("a", "b")}
    got = {"summary": summary, "records": records, "weights": weights}
    if uri:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("quick")
        children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
        got["mlflow"] = {r.info.run_name: {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k))
                                           for k in r.data.metrics} for r in children}
        got["mlflow_status"] = sorted(r.info.status for r in children)
    return got


def assert_same(a: dict, b: dict) -> None:
    assert [r["epoch"] for r in b["records"]] == list(range(1, EPOCHS + 1))
    assert a["summary"] == b["summary"] and a["records"] == b["records"]
    for p in a["weights"]:
        for k, v in a["weights"][p].items():
            assert torch.equal(v, b["weights"][p][k]), (p, k)
    if "mlflow" in a:
        assert a["mlflow"] == b["mlflow"]  # every epoch once, the same values
        assert [s for s, _ in b["mlflow"]["a"]["top1"]] == list(range(1, EPOCHS + 1))
        assert b["mlflow_status"] == ["FINISHED", "FINISHED"]


def uninterrupted(tmp_path_factory, engine: str) -> dict:
    """The outcome of the run uninterrupted on ``engine``: what every resumed run must equal."""
    base = tmp_path_factory.mktemp(f"{engine}_reference")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    r = cli(base / "run", engine, uri)
    assert r.returncode == 0, r.stderr
    return outcome(base / "run", uri)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, "local")


@pytest.mark.parametrize("point", LOCAL_POINTS)
def test_kill_at_each_write_point_resumes_as_if_uninterrupted(tmp_path, reference, point):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = cli(tmp_path / "run", "local", uri, fault=f"{point}:2")  # in the second epoch
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli(tmp_path / "run", "local", uri, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(reference, outcome(tmp_path / "run", uri))


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_from_epoch_0(tmp_path, reference):
    killed = cli(tmp_path / "run", fault="checkpoint-files")
    assert killed.returncode == -signal.SIGKILL and not ckpt.epoch_dirs(tmp_path / "run" / "checkpoints")
    resumed = cli(tmp_path / "run", "local", None, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "no checkpoint under" in resumed.stderr and "starting from epoch 1" in resumed.stderr
    got = outcome(tmp_path / "run")
    assert_same({k: reference[k] for k in ("summary", "records", "weights")}, got)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after 2 of its 3 epochs: epoch-0001 and epoch-0002 on disk, to damage and resume."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(args(out, "local", None, "--stop-after-epochs", "2")) == 0
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("damage,file", [(truncate, "peer_a.pt"), (zero, "engine.pt")])
def test_damaged_newest_checkpoint_falls_back_to_the_older_intact_one(tmp_path, capsys, stopped, reference,
                                                                     damage, file):
    out = copy_of(stopped, tmp_path)
    damage(out / "checkpoints" / "epoch-0002" / file)
    assert main(args(out, "local", None, "--resume")) == 0
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "is damaged" in ln]
    assert len(notes) == 1 and f"epoch-0002/{file}" in notes[0] and notes[0].endswith("epoch-0001"), err
    assert_same({k: reference[k] for k in ("summary", "records", "weights")}, outcome(out))


def test_no_intact_checkpoint_is_exit_2_naming_the_damaged_file(tmp_path, capsys, stopped):
    out = copy_of(stopped, tmp_path)
    truncate(out / "checkpoints" / "epoch-0002" / "peer_b.pt")
    zero(out / "checkpoints" / "epoch-0001" / "engine.pt")
    assert main(args(out, "local", None, "--resume")) == 2
    line = error_line(capsys)
    assert "epoch-0002/peer_b.pt is damaged" in line and "no older checkpoint is intact" in line


class _Code:
    def __reduce__(self):
        return (os.getpid, ())


def test_checkpoint_with_code_is_refused_in_one_line_exit_2(tmp_path, capsys, stopped):
    out = copy_of(stopped, tmp_path)
    bad = out / "checkpoints" / "epoch-0002" / "peer_a.pt"
    torch.save({"model": {}, "payload": _Code()}, bad)
    assert main(args(out, "local", None, "--resume")) == 2
    line = error_line(capsys)
    assert str(bad) in line and "weights_only" in line


@pytest.mark.parametrize("target", ["/etc", "../../elsewhere", ""])
def test_latest_pointer_outside_the_run_directory_is_refused(tmp_path, capsys, stopped, target):
    out = copy_of(stopped, tmp_path)
    (out / "checkpoints" / "latest").write_text(target)
    assert main(args(out, "local", None, "--resume")) == 2
    assert "checkpoints/latest: points outside the run directory" in error_line(capsys)
    with pytest.raises(ValueError):
        ckpt.latest_checkpoint(out / "checkpoints")


# ---------------------------------------------------------------------------------------------- ray
@pytest.fixture(scope="module")
def ray_reference(tmp_path_factory):
    return uninterrupted(tmp_path_factory, "ray")


@pytest.mark.slow
def test_ray_controller_killed_after_ray_committed_an_epoch_resumes_as_if_uninterrupted(tmp_path, ray_reference):
    """Ray Train has committed epoch 1's checkpoint and the controller dies before any record of ours
    (pointer, metrics.jsonl, MLflow): the resume must not lose that epoch. The newest Ray checkpoint
    is damaged too, so the resume also falls back to the older one, in one line.
    (Each ray run starts a Ray instance: one variant here; the local engine covers every point.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    killed = cli(out, "ray", uri, fault="ray-reported:2")
    assert killed.returncode != 0 and not (out / "summary.json").is_file()
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    directory, state = ray_checkpoint.restore_point(out)
    assert state["epoch"] == 2 and [h["epoch"] for h in state["history"]] == [1, 2]  # committed, not logged
    truncate(directory / ckpt.peer_file("a"))
    resumed = cli(out, "ray", uri, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    notes = [ln for ln in resumed.stderr.splitlines() if "is damaged" in ln]
    assert len(notes) == 1 and "newest intact checkpoint" in notes[0], resumed.stderr
    assert_same(ray_reference, outcome(out, uri))


@pytest.mark.slow
def test_ray_controller_killed_between_the_metrics_line_and_mlflow_resumes_as_if_uninterrupted(tmp_path,
                                                                                              ray_reference):
    """The controller wrote epoch 2's line to metrics.jsonl and dies before MLflow has it: the resume
    rewrites metrics.jsonl from the checkpoint and MLflow gets epoch 2 exactly once."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    killed = cli(out, "ray", uri, fault="metrics-line:2")
    assert killed.returncode != 0 and not (out / "summary.json").is_file()
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    resumed = cli(out, "ray", uri, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(ray_reference, outcome(out, uri))
