"""The ray engine on a real two-node Ray cluster (``tests/cluster.py``): no shared disk but engine.storage.

Node b runs in its own mount namespace with an empty tmpfs over the parent of the run directories,
so anything a worker wrote into the driver's run directory would land in node b's tmpfs (and be
missing on the driver's side). Quick DML with one peer per node (node labels, ``engine.placement:
spread``) finishes with the local engine's weights at equal ``train.threads``, also as a ``ray job
submit``; a node killed mid-run (``kill -9`` of its raylet) and brought back lets the run finish from
the last checkpoint with one MLflow history and the same weights; without engine.storage a
multi-node cluster is refused (exit 2).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from cluster import NODE_B_SENTINEL, can_unshare, two_node_cluster
from online_kd.engine import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
QUICK = "topologies/quick/dml.yaml"
PEERS = ("a", "b")
STEPS = 4  # train.max_steps_per_epoch
EPOCHS = 2  # the plain runs
LOSS_EPOCHS = 8  # the node-loss run: long enough to lose a node after its first checkpoint
TRAIN_WORKER = "ray::RayTrainWorker"  # a Ray Train worker actor's process title

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("ray") is None or not can_unshare():
        pytest.skip("needs the ray CLI and unshare with mount namespaces (a private tmpfs for the second node)")
    with two_node_cluster() as c:
        yield c


def quick_args(epochs: int, *more: str) -> list[str]:
    """`online-kd run` arguments of the quick DML at one thread per worker, a few steps per epoch."""
    sets = {"train.threads": 1, "train.max_steps_per_epoch": STEPS, "train.epochs": epochs,
            **dict(m.split("=", 1) for m in more)}
    return [QUICK, *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), "--json"]


def cluster_args(cluster, name: str, epochs: int, *more: str) -> list[str]:
    """The same run with peer a on node a, peer b on node b and checkpoints on the shared storage."""
    return quick_args(epochs, "engine.placement=spread", "peers.a.node_labels={okd-node: a}",
                      "peers.b.node_labels={okd-node: b}", f"engine.storage={cluster.storage / name}", *more)


def online_kd(args: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "online_kd.cli", "run", *args], cwd=ROOT, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-5000:]}\n{proc.stdout[-2000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{\n"):])


def last_checkpoint(out: Path) -> Path:
    """The run's latest checkpoint directory, wherever its ``checkpoints/latest`` pointer says it is."""
    pointer = (out / "checkpoints" / "latest").read_text().strip()
    path = (out / "checkpoints" / pointer).resolve()
    assert path.is_dir(), pointer
    return path


def assert_same_weights(out_a: Path, out_b: Path) -> None:
    dir_a, dir_b = last_checkpoint(out_a), last_checkpoint(out_b)
    for p in PEERS:
        a = ckpt.load(dir_a / ckpt.peer_file(p))["model"]
        b = ckpt.load(dir_b / ckpt.peer_file(p))["model"]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), (p, k, (a[k] - b[k]).abs().max())


def assert_nothing_on_node_b(cluster) -> None:
    """Node b's view of the run directories' parent is its own tmpfs, untouched by the run."""
    seen_by_b = sorted(os.listdir(cluster.node_b_view(cluster.private)))
    assert seen_by_b == [NODE_B_SENTINEL], seen_by_b
    assert not (cluster.private / NODE_B_SENTINEL).exists()  # the driver's side is another directory


class TrainWorkerWatch:
    """Samples, while a run goes on, which test node each Ray Train worker process belongs to: ``seen`` and
    ``most`` (most at once) by node name, ``by_marker`` by node process (a restarted node is another one)."""

    def __init__(self, cluster):
        self.cluster, self.seen, self.most, self.by_marker = cluster, {}, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for name, node in list(self.cluster.nodes.items()):
                pids = [p for p in node.pids() if _title(p).startswith(TRAIN_WORKER)]
                self.seen.setdefault(name, set()).update(pids)
                self.by_marker.setdefault(node.marker, set()).update(pids)
                self.most[name] = max(self.most.get(name, 0), len(pids))
            time.sleep(0.2)


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The local engine's runs of the same topology at train.threads=1, by epoch count."""
    done = {}

    def get(epochs: int) -> Path:
        if epochs not in done:
            out = tmp_path_factory.mktemp("local") / "run"
            summary_of(online_kd([*quick_args(epochs), "--engine", "local", "--out", str(out), "--no-tracking"]))
            done[epochs] = out
        return done[epochs]

    return get


def test_one_peer_per_node_matches_local(cluster, local_runs):
    out = cluster.private / "spread"
    env = cluster.client_env()
    with TrainWorkerWatch(cluster) as watch:
        summary = summary_of(online_kd([*cluster_args(cluster, "spread", EPOCHS), "--engine", "ray", "--out", str(out),
                                        "--no-tracking"], env))
    assert summary["finished"] and summary["epochs"] == EPOCHS
    assert watch.most == {"a": 1, "b": 1}, (watch.most, watch.seen)  # one worker on each node
    ranks = [int((out / "pids" / f"rank{r}.pid").read_text()) for r in range(2)]  # written on the driver's node
    assert sorted(n for pid in ranks for n, pids in watch.seen.items() if pid in pids) == ["a", "b"], (ranks, watch.seen)
    assert_same_weights(out, local_runs(EPOCHS))
    assert_nothing_on_node_b(cluster)
    assert list(cluster.storage.glob(f"spread/**/{ckpt.peer_file('b')}")), "no checkpoint on the shared storage"


def test_job_submit_to_the_cluster(cluster, local_runs):
    out = cluster.private / "job"
    uri = f"sqlite:///{cluster.private / 'job.db'}"
    job_id = f"okd-multinode-{secrets.token_hex(4)}"
    env = {**cluster.client_env(), "RAY_ADDRESS": cluster.dashboard, "MLFLOW_TRACKING_URI": uri,
           "OKD_SUBMIT_ARGS": f"--submission-id {job_id} --log-style record --log-color false"}
    sub = subprocess.run([str(ROOT / "launch" / "submit.sh"), *cluster_args(cluster, "job", EPOCHS), "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    info = cluster.api(f"/api/jobs/{job_id}")
    assert sub.returncode == 0 and info["status"] == "SUCCEEDED", (info, sub.stderr[-3000:], sub.stdout[-5000:])
    assert_same_weights(out, local_runs(EPOCHS))
    assert_nothing_on_node_b(cluster)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("quick").experiment_id])
    assert sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags) == list(PEERS)


def test_refuses_two_nodes_without_storage(cluster, tmp_path):
    proc = online_kd([*quick_args(1), "--engine", "ray", "--out", str(cluster.private / "refused"), "--no-tracking"],
                     cluster.client_env(), timeout=120)
    named = [line for line in proc.stderr.splitlines() if "engine.storage" in line]
    assert proc.returncode == 2 and len(named) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (cluster.private / "refused" / "checkpoints" / "latest").exists()


def test_node_lost_mid_run_resumes_from_last_checkpoint(cluster, local_runs):
    """Runs last: it kills node b and starts a new one."""
    out = cluster.private / "loss"
    uri = f"sqlite:///{cluster.private / 'loss.db'}"
    args = [*cluster_args(cluster, "loss", LOSS_EPOCHS, "engine.max_failures=2"), "--engine", "ray",
            "--out", str(out), "--tracking-uri", uri]
    lost = cluster.nodes["b"].marker
    proc = subprocess.Popen([sys.executable, "-m", "online_kd.cli", "run", *args], cwd=ROOT, env=cluster.client_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with TrainWorkerWatch(cluster) as watch:
            metrics = out / "metrics.jsonl"
            deadline = time.time() + 150
            while not ((out / "checkpoints" / "latest").is_file() and metrics.is_file() and metrics.read_text().strip()):
                assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended or timed out"
                time.sleep(0.05)
            cluster.kill_node_b_raylet()
            epochs_before = len(metrics.read_text().splitlines())
            cluster.start_node_b()
            stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"node b lost after {epochs_before} of {LOSS_EPOCHS} epochs")
    assert epochs_before < LOSS_EPOCHS, "the node was lost after the run's last epoch"
    summary = summary_of(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    assert summary["finished"] and summary["epochs"] == LOSS_EPOCHS, summary
    # a train worker ran on node b, then one on the node that replaced it
    assert watch.by_marker.get(lost) and watch.by_marker.get(cluster.nodes["b"].marker), (watch.by_marker,
                                                                                           stderr[-3000:])
    assert_same_weights(out, local_runs(LOSS_EPOCHS))
    assert_nothing_on_node_b(cluster)

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("quick").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert sorted(children) == list(PEERS)
    for run in children.values():
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "top1"))
        assert steps == list(range(1, LOSS_EPOCHS + 1)), steps  # each epoch logged once, none missing
        assert run.info.status == "FINISHED"
