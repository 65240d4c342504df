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


def test_version_and_help_say_what_they_should(tmp_path):
    from importlib.metadata import version

    r = cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"online-kd {version('online_kd')}"
    r = cli("run", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "train.epochs is per stage" in " ".join(r.stdout.split())


@pytest.mark.parametrize("word, hint", [("rn", "did you mean run?"), ("valdate", "did you mean validate?"),
                                        ("zzz", "known: compare, plan, plot, run, tune, validate")])
def test_mistyped_command_is_one_line_exit_2(tmp_path, word, hint):
    r = cli(word, ROOT / "topologies/quick/dml.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: unknown command '{word}' ({hint})", r.stderr


@pytest.mark.parametrize("args", [["run", "nofile.yaml"], ["validate", "nofile.yaml", "--engine", "ray"],
                                  ["tune", "nofile.yaml", "--space", "s.yaml"]])
def test_missing_file_is_reported_before_heavy_imports(tmp_path, args):
    """Answered without importing torch, Ray or MLflow (what made it take seconds): -X importtime lists every import."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "online_kd.cli", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines[-1] == "error: nofile.yaml: no such topology file"
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in lines if ln.startswith("import time:")}
    assert "online_kd" in imported and not imported & {"torch", "ray", "mlflow", "matplotlib"}


def test_piped_run_is_plain_with_progress_one_epoch_numbering_and_where_results_are(tmp_path):
    """stdout/stderr piped: no ANSI codes (even with FORCE_COLOR), a periodic progress line, epochs numbered from 1
    alike on the console, metrics.jsonl, summary.json, MLflow and checkpoint folders, and where the results are."""
    import os
    import re

    env = {**os.environ, "ONLINE_KD_PROGRESS_EVERY": "0", "FORCE_COLOR": "1", "COLUMNS": "40"}
    r = cli("run", ROOT / "topologies/quick/dml.yaml", "--set", "train.epochs=2",
            "--set", "train.max_steps_per_epoch=3", "--out", "r", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stderr + r.stdout
    progress = [ln for ln in r.stderr.splitlines() if re.fullmatch(
        r"epoch [12]/2: step [123]/3, [\d.]+ steps/s, loss a \d+\.\d{3} · b \d+\.\d{3} \(\d+s\)", ln)]
    assert len(progress) == 6, r.stderr  # every step, with a 0 s period; one line each: no wrapping at 40 columns
    assert [ln.split()[1] for ln in r.stderr.splitlines() if re.match(r"epoch \d/2  ", ln)] == ["1/2", "2/2"]

    out = tmp_path / "r"
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and {p["last_epoch"] for p in summary["peers"].values()} == {2}
    assert (out / "checkpoints" / "latest").read_text().strip() == "epoch-0002"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    (parent,) = [x for x in client.search_runs([client.get_experiment_by_name("quick").experiment_id])
                 if "mlflow.parentRunId" not in x.data.tags]
    child = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")[0]
    assert sorted(m.step for m in client.get_metric_history(child.info.run_id, "top1")) == [1, 2]
    assert summary["mlflow"] == {"tracking_uri": uri, "experiment": "quick", "run_id": parent.info.run_id}

    assert r.stderr.splitlines()[-3:] == [
        f"run directory: {out.resolve()}",
        f"MLflow: {uri}  experiment 'quick'  run {parent.info.run_id}",
        f"browse: mlflow ui --backend-store-uri {uri}"]
