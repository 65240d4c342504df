"""RunTracker against real MLflow stores: SQLite in tmp_path, and once a real `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from online_kd.tracking import (  # noqa: E402
    RunTracker,
    default_tracking_uri,
    flatten_params,
    sanitize_key,
)

NODES = {
    "a": {"model": "resnet18", "role": "peer", "optimizer": {"name": "sgd", "lr": 0.1}},
    "b": {"model": "mobilenetv2", "role": "peer", "optimizer": {"name": "sgd", "lr": 0.05}},
    "ens": {"role": "ensemble", "members": ["a", "b"]},
}
PARAMS = {
    "topology": "dml",
    "train": {"epochs": 3, "batch_size": 128},
    "data": {"name": "cifar100", "augment": {"crop": 32, "flip": True}},
    "long": "x" * 10_000,
}


def sqlite_uri(tmp_path: Path) -> str:
    return "sqlite:///" + str((tmp_path / "mlflow.db").resolve())


def epoch_metrics(epoch: int) -> dict[str, dict[str, float]]:
    return {
        "a": {"val/top1": 10.0 + epoch, "train/loss": 2.0 - 0.1 * epoch, "edge/b->a": 0.5 + epoch},
        "b": {"val/top1": 20.0 + epoch, "train/loss": float("nan"), "edge/a->b": 0.25 * epoch},
        "ens": {"val/top1": 30.0 + epoch, "bad": float("inf")},
    }


def run_flow(uri: str, tmp_path: Path, experiment: str = "exp") -> RunTracker:
    """The full tracker flow used by the SQLite and the server tests."""
    tr = RunTracker(uri, experiment, "dml-run", tags={"owner": "tests"})
    tr.start(NODES, PARAMS)
    for epoch in range(3):
        tr.log_epoch(epoch, epoch_metrics(epoch))
    tr.log_summary({"a": {"top1_last": 12.0, "top1_best": 12.5}, "b": {"top1_best": 22.0}})
    art = tmp_path / "topology.yaml"
    art.write_text("peers: [a, b]\n")
    tr.log_artifact(art)
    tr.log_artifact(art, artifact_path="configs")
    tr.log_text("hello", "notes/readme.txt")
    tr.finish()
    return tr


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def check_flow(client: MlflowClient, tr: RunTracker, *, check_params: bool = True) -> None:
    exp = client.get_experiment_by_name("exp")
    assert exp is not None and exp.experiment_id == tr.experiment_id
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert len(runs) == 4
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [tr.parent_run_id]
    assert len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == tr.parent_run_id for c in children)
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"a", "b", "ens"}
    assert {n: r.info.run_id for n, r in by_name.items()} == tr.child_run_ids
    for name, run in by_name.items():
        assert run.data.tags["online_kd.node"] == name
        assert run.data.tags["owner"] == "tests"
        assert run.info.status == "FINISHED"
        assert run.info.end_time is not None
    assert by_name["a"].data.tags["online_kd.role"] == "peer"
    assert by_name["ens"].data.tags["online_kd.role"] == "ensemble"

    parent = client.get_run(tr.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "dml-run"
    if check_params:
        p = parent.data.params
        assert p["topology"] == "dml"
        assert p["train.epochs"] == "3"
        assert p["data.augment.flip"] == "True"
        assert p["long"] == "x" * 6000  # truncated to MLflow's limit
        a = by_name["a"].data.params
        assert a["model"] == "resnet18" and a["optimizer.lr"] == "0.1"
        assert by_name["ens"].data.params["members"] == "['a', 'b']"

    # metric histories: steps 0..2, exact values; '->' sanitised; non-finite skipped
    a, b, ens = (tr.child_run_ids[n] for n in ("a", "b", "ens"))
    assert history(client, a, "val/top1") == [(0, 10.0), (1, 11.0), (2, 12.0)]
    assert history(client, a, "edge/b_to_a") == [(0, 0.5), (1, 1.5), (2, 2.5)]
    assert history(client, b, "edge/a_to_b") == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [s for s, _ in history(client, a, "train/loss")] == [0, 1, 2]
    assert history(client, b, "train/loss") == []
    assert history(client, ens, "val/top1") == [(0, 30.0), (1, 31.0), (2, 32.0)]
    assert "bad" not in client.get_run(ens).data.metrics
    # summary on children and, prefixed, on the parent
    assert client.get_run(a).data.metrics["top1_best"] == 12.5
    assert parent.data.metrics["a.top1_best"] == 12.5
    assert parent.data.metrics["a.top1_last"] == 12.0
    assert parent.data.metrics["b.top1_best"] == 22.0

    top = {f.path for f in client.list_artifacts(tr.parent_run_id)}
    assert {"topology.yaml", "configs", "notes"} <= top
    assert [f.path for f in client.list_artifacts(tr.parent_run_id, "configs")] == [
        "configs/topology.yaml"
    ]


def test_sqlite_full_flow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the cwd except what we ask for
    uri = sqlite_uri(tmp_path)
    tr = run_flow(uri, tmp_path)
    client = MlflowClient(tracking_uri=uri)  # fresh client, reads the store back
    check_flow(client, tr)
    # artifacts live beside the db, not in ./mlruns
    assert not (tmp_path / "mlruns").exists()
    files = list((tmp_path / "mlartifacts").rglob("readme.txt"))
    assert len(files) == 1 and files[0].read_text() == "hello"
    # a second tracker reuses the experiment
    tr2 = RunTracker(uri, "exp", "again")
    tr2.start({"x": {"model": "m"}}, {})
    tr2.finish("KILLED")
    assert tr2.experiment_id == tr.experiment_id
    assert client.get_run(tr2.parent_run_id).info.status == "KILLED"
    assert client.get_run(tr2.child_run_ids["x"]).info.status == "KILLED"


def test_resume_continues_same_runs(tmp_path):
    uri = sqlite_uri(tmp_path)
    tr = RunTracker(uri, "exp", "resumable")
    tr.start({"a": {"role": "peer"}, "b": {"role": "peer"}}, {"epochs": 4})

    def metrics(e):
        return {"a": {"val/top1": float(e)}, "b": {"val/top1": 100.0 + e, "edge/a->b": e / 10}}

    for e in range(2):
        tr.log_epoch(e, metrics(e))
    import json

    state = json.loads(json.dumps(tr.state()))  # must be JSON-able (goes into a checkpoint)
    ids = (tr.parent_run_id, dict(tr.child_run_ids))
    del tr  # the process "crashes": runs stay RUNNING

    tr = RunTracker.resume(state)
    assert (tr.parent_run_id, tr.child_run_ids) == ids
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(tr.parent_run_id).info.status == "RUNNING"
    for e in range(2, 4):
        tr.log_epoch(e, metrics(e))
    tr.finish()

    exp = client.get_experiment_by_name("exp")
    assert len(client.search_runs([exp.experiment_id])) == 3  # nothing re-created
    for node, off in (("a", 0.0), ("b", 100.0)):
        run_id = tr.child_run_ids[node]
        assert history(client, run_id, "val/top1") == [(e, off + e) for e in range(4)]
        assert client.get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in history(client, tr.child_run_ids["b"], "edge/a_to_b")] == [0, 1, 2, 3]
    assert client.get_run(tr.parent_run_id).data.params == {"epochs": "4"}


def test_resume_never_logs_a_step_the_store_already_holds(tmp_path):
    """A kill between logging an epoch and checkpointing it: the resumed run logs that epoch again."""
    uri = sqlite_uri(tmp_path)
    tr = RunTracker(uri, "exp", "killed")
    tr.start({"a": {}, "b": {}}, {})
    for e in range(2):
        tr.log_epoch(e, {"a": {"top1": float(e), "loss": 1.0 - e / 10}, "b": {"top1": 50.0 + e}})
    tr.log_epoch(2, {"a": {"top1": 2.0}})  # killed part-way: a's epoch 2 top1 logged, a's loss and b's not
    state = tr.state()
    tr2 = RunTracker.resume(state)  # the checkpoint held epochs 0 and 1: epoch 2 runs again
    for e in range(2, 4):
        tr2.log_epoch(e, {"a": {"top1": float(e), "loss": 1.0 - e / 10}, "b": {"top1": 50.0 + e}})
    tr2.finish()
    client = MlflowClient(tracking_uri=uri)
    assert history(client, state["child_run_ids"]["a"], "top1") == [(e, float(e)) for e in range(4)]
    assert history(client, state["child_run_ids"]["a"], "loss") == [(e, 1.0 - e / 10) for e in range(4)]
    assert history(client, state["child_run_ids"]["b"], "top1") == [(e, 50.0 + e) for e in range(4)]


def test_resume_after_finish_sets_running(tmp_path):
    uri = sqlite_uri(tmp_path)
    tr = RunTracker(uri, "exp", "r")
    tr.start({"a": {}}, {})
    tr.log_epoch(0, {"a": {"m": 1.0}})
    state = tr.state()
    tr.finish("FAILED")
    tr2 = RunTracker.resume(state)
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(state["child_run_ids"]["a"]).info.status == "RUNNING"
    tr2.log_epoch(1, {"a": {"m": 2.0}, RunTracker.PARENT: {"lr": 0.1}})
    tr2.finish()
    assert history(client, state["child_run_ids"]["a"], "m") == [(0, 1.0), (1, 2.0)]
    assert history(client, state["parent_run_id"], "lr") == [(1, 0.1)]
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"


def test_context_manager_marks_failed_and_unknown_node(tmp_path):
    uri = sqlite_uri(tmp_path)
    tr = RunTracker(uri, "exp", "ctx")
    with pytest.raises(KeyError, match="unknown node"):
        with tr:
            tr.start({"a": {}}, {})
            tr.log_epoch(0, {"zzz": {"m": 1.0}})
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(tr.parent_run_id).info.status == "FAILED"
    assert client.get_run(tr.child_run_ids["a"]).info.status == "FAILED"
    with pytest.raises(ValueError):
        tr.finish("DONE")


def test_not_started_raises():
    tr = RunTracker("sqlite:////nonexistent/never.db", "e", "r")
    with pytest.raises(RuntimeError):
        tr.log_epoch(0, {})
    tr.finish()  # no-op before start


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri(tmp_path)
    assert uri == "sqlite:///" + str(tmp_path.resolve() / "mlflow.db")
    assert uri.startswith("sqlite:////")
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == uri
    assert default_tracking_uri(".") == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert default_tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_sanitize_and_flatten():
    assert sanitize_key("edge/a->b") == "edge/a_to_b"
    assert sanitize_key("edge/a<-b") == "edge/a_from_b"
    assert sanitize_key("x:y@z") == "x_y_z"
    assert sanitize_key("/lead//double/") == "lead/double"
    assert sanitize_key("a/../b/./c") == "a/__/b/_/c"
    assert sanitize_key("") == "_"
    assert len(sanitize_key("k" * 1000)) == 250
    from mlflow.utils.validation import _validate_metric_name

    for k in ["edge/a->b", "/x//y/", "..", "a b.c-d_e/f", "é→ß"]:
        _validate_metric_name(sanitize_key(k))
    flat = flatten_params({"a": {"b": {"c": 1}}, "l": [1, 2], "e": {}, "n": None})
    assert flat == {"a.b.c": "1", "l": "[1, 2]", "e": "{}", "n": "None"}


# ------------------------------------------------------------------------------ mlflow server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            out.append(int(d))
    return out


def _stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    pgid = proc.pid  # start_new_session=True: the server leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc.poll() is None or _group_members(pgid)):
        time.sleep(0.2)
    if proc.poll() is None or _group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and _group_members(pgid):
            time.sleep(0.1)


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    srv = tmp_path / "srv"
    srv.mkdir()
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    # No huey job workers (not needed for tracking); the whole group is killed anyway.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", "sqlite:///" + str((srv / "srv.db").resolve()),
        "--artifacts-destination", str((srv / "artifacts").resolve()),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(srv / "server.log", "wb")
    proc = subprocess.Popen(
        cmd, cwd=srv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    pgid = proc.pid
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(srv / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200 and r.read().decode().strip() == "OK":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                tail = (srv / "server.log").read_text()[-3000:]
                pytest.fail(f"mlflow server not healthy after 60 s: {tail}")
            time.sleep(0.5)
        assert pgid in _group_members(pgid)  # the group check below is not vacuous
        yield url, srv
    finally:
        _stop_group(proc)
        log.close()
        assert _group_members(pgid) == [], "processes of the server's group survived"


@pytest.mark.slow
def test_against_mlflow_server(mlflow_server, tmp_path):
    url, srv = mlflow_server
    tr = run_flow(url, tmp_path)
    client = MlflowClient(tracking_uri=url)  # REST client
    check_flow(client, tr)
    # proxied artifacts landed under --artifacts-destination
    files = list((srv / "artifacts").rglob("readme.txt"))
    assert len(files) == 1 and files[0].read_text() == "hello"
    # and resume works over REST too
    tr2 = RunTracker.resume(tr.state())
    tr2.log_epoch(3, {"a": {"val/top1": 13.0}})
    tr2.finish()
    assert history(client, tr.child_run_ids["a"], "val/top1")[-1] == (3, 13.0)
    assert client.get_run(tr.parent_run_id).info.status == "FINISHED"
