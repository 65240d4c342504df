"""The command line as a user runs it: real processes, a real MLflow SQLite store, real files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "online_kd.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=env)


def test_run_json_logs_parent_and_child_runs_to_sqlite(tmp_path):
    r = cli("run", ROOT / "topologies/quick/kd.yaml", "--set", "train.epochs=3", "--json", "--out", "run1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary["peers"]) == {"teacher", "student"}
    assert summary["epochs"] == 6 and summary["finished"]
    for peer in summary["peers"].values():
        assert {"top1_last", "top1_best", "best_epoch", "top5_last"} <= set(peer)
    assert "epoch 6/6 [student]" in r.stderr  # per-epoch progress with the stage

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("quick")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"teacher", "student"}
    student = children["student"]
    assert student.data.params["model"] == "convnet_small" and student.data.params["role"] == "student"
    top1 = client.get_metric_history(student.info.run_id, "top1")
    assert sorted(m.step for m in top1) == [4, 5, 6]  # evaluated once it has been trained; epochs from 1
    teacher_top1 = client.get_metric_history(children["teacher"].info.run_id, "top1")
    assert sorted(m.step for m in teacher_top1) == [1, 2, 3, 4, 5, 6]
    edge = client.get_metric_history(student.info.run_id, "edge/kd_from_teacher")
    assert sorted(m.step for m in edge) == [4, 5, 6]  # the edge is active in the student stage only
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"topology.yaml", "topology.png", "summary.json", "accuracy.png"} <= arts
    assert parents[0].info.status == "FINISHED"


def test_resume_from_the_command_line(tmp_path):
    topo = ROOT / "topologies/quick/dml.yaml"
    r = cli("run", topo, "--set", "train.epochs=3", "--no-tracking", "--stop-after-epochs", "1", "--out", "r", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    again = cli("run", topo, "--set", "train.epochs=3", "--no-tracking", "--out", "r", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    r = cli("run", topo, "--set", "train.epochs=3", "--no-tracking", "--resume", "--out", "r", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resuming at epoch 2" in r.stderr
    assert json.loads(r.stdout)["epochs"] == 3


@pytest.mark.parametrize("args, place", [
    (["--set", "edges[0].loss=kdd"], "edges[0].loss: unknown loss 'kdd' (did you mean kd"),
    (["--set", "peers.a.model=resnet33"], "peers.a.model: unknown model 'resnet33' (did you mean"),
    (["--set", "train.precision=fp8"], "train.precision: "),
    (["--set", "edges[3].loss=kl"], "edges[3]: no such item"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, place):
    r = cli("validate", ROOT / "topologies/quick/dml.yaml", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {place}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_plan_shows_taps_and_bytes(tmp_path):
    r = cli("plan", ROOT / "topologies/cifar100/dml.yaml", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert [(e["from"], e["to"]) for e in plan["edges"]] == [("a", "b"), ("b", "a")]
    stage = plan["stages"][0]
    assert stage["taps"] == {"a": ["logits"], "b": ["logits"]}
    assert stage["bytes_per_step"] == 2 * 64 * 100 * 4  # two logit tensors of batch 64 × 100 classes, fp32
    ofd = json.loads(cli("plan", ROOT / "topologies/quick/ofd.yaml", "--json", cwd=tmp_path).stdout)
    student = ofd["stages"][-1]  # teacher and student share a worker: the taps are read in place
    assert student["transfers"] and all(t["route"] == "same worker (no copy)" for t in student["transfers"])
    assert student["bytes_per_step"] == 0 and all(t["wire_bytes"] == 0 for t in student["transfers"])
    text = cli("plan", ROOT / "topologies/cifar100/kd.yaml", cwd=tmp_path)
    assert text.returncode == 0 and "bytes/step" in text.stdout and "resnet" not in text.stderr


def test_plot_draws_the_graph(tmp_path):
    r = cli("plot", ROOT / "topologies/quick/kdcl.yaml", "-o", tmp_path / "g.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_init_checkpoint_is_reported_before_training(tmp_path):
    r = cli("run", ROOT / "topologies/cifar100/kd.yaml", "--no-tracking", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("error: peers.teacher.init: no such checkpoint file"), r.stderr
