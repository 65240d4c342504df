"""The ray engine on a real local Ray instance with CPU workers over gloo.

Same numbers as the local engine step by step, replicas equal to a bigger batch, a worker killed
mid-run and the run finishing from its last checkpoint with one unbroken MLflow history.
"""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml
from mlflow.tracking import MlflowClient

from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine
from online_kd.engine.options import RunOptions
from online_kd.engine.ray import RayEngine
from online_kd.engine.raystart import ensure_ray
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """The instance the engine starts itself (loopback only, token auth), started once for the module."""
    ensure_ray(5, log_to_driver=False)
    yield
    ray.shutdown()


def quick(name, **overrides):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    return load_topology(raw, {"train.threads": 1, **overrides})


def run(engine, topo, out, **kw):
    kw = {"tracking": False, "quiet": True, "record_steps": True, **kw}
    return engine(topo, RunOptions(out_dir=Path(out), **kw)).run()


def step_losses(out: Path) -> dict[tuple[int, str], float]:
    losses = {}
    for f in (out / "steps").glob("*.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            losses[(r["step"], r["peer"])] = r["loss"]
    return losses


def final_weights(out: Path, peer: str) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest_checkpoint(out / "checkpoints") / ckpt.peer_file(peer))["model"]


def assert_same_weights(out_a, out_b, peers, tol=1e-5):
    for p in peers:
        a, b = final_weights(out_a, p), final_weights(out_b, p)
        for k in a:
            if a[k].is_floating_point():
                assert (a[k] - b[k]).abs().max().item() <= tol, (p, k)
            else:
                assert torch.equal(a[k], b[k]), (p, k)


def test_ray_engine_expands_rotations_and_exchanges_aux_taps_as_local(tmp_path):
    """HSAKD online: 4B rotated rows per shard and stacked aux heads travel between workers."""
    topo = quick("hsakd_online", **{"train.epochs": 1, "train.max_steps_per_epoch": 3})
    run(LocalEngine, topo, tmp_path / "local")
    run(RayEngine, topo, tmp_path / "ray")
    a, b = step_losses(tmp_path / "local"), step_losses(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 3 * 2
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5


@pytest.mark.parametrize("name", ["dml", "kdcl", "afd"])  # logits all_gather/p2p, ensemble, feature maps + 2nd update
def test_ray_engine_matches_local_step_by_step(tmp_path, name):
    topo = quick(name, **{"train.epochs": 2})
    local = run(LocalEngine, topo, tmp_path / "local")
    distributed = run(RayEngine, topo, tmp_path / "ray")
    a, b = step_losses(tmp_path / "local"), step_losses(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 2 * 23 * len(topo.config.peers)
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= 1e-5, worst
    assert_same_weights(tmp_path / "local", tmp_path / "ray", topo.config.peers)
    for p in topo.config.peers:
        assert local["peers"][p]["top1_last"] == distributed["peers"][p]["top1_last"]
    if name == "kdcl":
        assert distributed["ensembles"]["teacher"]["top1_last"] == local["ensembles"]["teacher"]["top1_last"]


FEATURE_MAP_METHODS = ["at", "fitnet", "fsp", "ofd", "sp", "rkd", "crd", "reviewkd", "infoflow"]


@pytest.mark.parametrize("name", FEATURE_MAP_METHODS)
def test_feature_map_methods_match_local_on_ray(tmp_path, name):
    """Each feature-level quick topology, every stage for 3 steps: ray's per-step losses and final weights
    are local's (feature maps, embeddings and relations cross workers; OFD's pair shares one worker)."""
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    overrides = {"train.epochs": 1, "train.max_steps_per_epoch": 3}
    overrides.update({f"stages[{i}].epochs": 1 for i, s in enumerate(raw.get("stages", [])) if "epochs" in s})
    topo = load_topology(raw, {"train.threads": 1, **overrides})
    run(LocalEngine, topo, tmp_path / "local")
    run(RayEngine, topo, tmp_path / "ray")
    a, b = step_losses(tmp_path / "local"), step_losses(tmp_path / "ray")
    trained_steps = sum(3 * len(s.train) for s in topo.stages)
    assert a.keys() == b.keys() and len(a) == trained_steps, (sorted(a), sorted(b))
    worst = max(abs(a[k] - b[k]) for k in a)
    assert worst <= 1e-5, worst
    assert_same_weights(tmp_path / "local", tmp_path / "ray", {p for s in topo.stages for p in s.train})


def test_best_epoch_hand_over_and_per_step_warmup_match_local(tmp_path):
    """Tf-KD self with the teacher's best epoch handed on and a per-iteration warm-up: same steps, same weights."""
    topo = quick("tfkd_self", **{"train.epochs": 3, "train.max_steps_per_epoch": 3, "peers.teacher.optimizer.lr": 1.0,
                                 "peers.teacher.schedule.warmup_epochs": 1, "peers.teacher.schedule.warmup_per": "step"})
    local = run(LocalEngine, topo, tmp_path / "local")
    distributed = run(RayEngine, topo, tmp_path / "ray")
    a, b = step_losses(tmp_path / "local"), step_losses(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 3
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5
    assert_same_weights(tmp_path / "local", tmp_path / "ray", ["teacher", "student"])
    assert local["peers"] == distributed["peers"]


def test_two_replicas_match_one_with_the_whole_batch(tmp_path):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / "dml.yaml").read_text())
    raw["peers"]["a"]["model"] = "mlp"  # no BatchNorm: replicas see half-batch statistics otherwise
    raw["train"].update(epochs=1, threads=1)
    raw["data"]["batch_size"] = 64
    one = load_topology(raw)
    raw["peers"]["a"]["replicas"] = 2
    raw["peers"]["b"]["replicas"] = 2
    two = load_topology(raw)
    run(LocalEngine, one, tmp_path / "one")
    summary = run(RayEngine, two, tmp_path / "two")
    assert set(summary["peers"]) == {"a", "b"}
    assert_same_weights(tmp_path / "one", tmp_path / "two", ["a", "b"], tol=1e-5)


def rank_step_losses(out: Path, rank: int) -> dict[tuple[int, str], float]:
    rows = (json.loads(line) for line in (out / "steps" / f"rank{rank}.jsonl").read_text().splitlines())
    return {(r["step"], r["peer"]): r["loss"] for r in rows}


@pytest.mark.parametrize("name", ["sp", "crd"])
def test_batch_relational_losses_with_two_replicas_match_one_worker(tmp_path, name):
    """SP's Gram matrices and CRD's banks see the whole batch through the replicas' gather: 2 replicas
    (shards of 32 and 31 samples) give one worker's per-step losses, final weights and CRD banks."""
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    for peer in raw["peers"].values():
        peer["model"] = "mlp"  # no BatchNorm: replicas see half-batch statistics otherwise
    raw["edges"][0].update(tap="stage2", source_tap="stage2") if name == "sp" else None
    raw["train"].update(epochs=1, threads=1, max_steps_per_epoch=3)
    raw["data"]["batch_size"] = 63  # unequal shards: the gradient of each shard's slice is scaled by N/n_r
    one = load_topology(raw)
    for peer in raw["peers"].values():
        peer["replicas"] = 2
    raw["engine"] = {"name": "ray", "colocate": [list(raw["peers"])]}  # two workers, each a replica of both
    two = load_topology(raw)
    run(LocalEngine, one, tmp_path / "one")
    run(RayEngine, two, tmp_path / "two")
    whole = step_losses(tmp_path / "one")
    r0, r1 = rank_step_losses(tmp_path / "two", 0), rank_step_losses(tmp_path / "two", 1)
    assert whole.keys() == r0.keys() == r1.keys() and len(whole) == 6
    # each replica's total is CE of its shard + the whole batch's edge loss: their shard-weighted mean is one worker's
    worst = max(abs(whole[k] - (32 * r0[k] + 31 * r1[k]) / 63) for k in whole)
    assert worst <= 1e-5, worst
    assert_same_weights(tmp_path / "one", tmp_path / "two", list(raw["peers"]), tol=1e-5)
    edges_one = ckpt.load(ckpt.latest_checkpoint(tmp_path / "one" / "checkpoints") / ckpt.peer_file("student"))["edges"]
    edges_two = ckpt.load(ckpt.latest_checkpoint(tmp_path / "two" / "checkpoints") / ckpt.peer_file("student"))["edges"]
    for key, state in edges_one.items():  # CRD: embeddings, banks, Z and step counter as one worker's
        for k, v in state.items():
            assert torch.allclose(v.float(), edges_two[key][k].float(), atol=1e-5), (key, k)


def test_killed_worker_resumes_from_checkpoint_with_one_unbroken_history(tmp_path):
    epochs = 12
    topo = quick("dml", **{"train.epochs": epochs, "engine.max_failures": 1})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "ray"
    killed = {}

    def kill_rank1_mid_run():
        deadline = time.time() + 240
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                pid = int((out / "pids" / "rank1.pid").read_text())
                os.kill(pid, signal.SIGKILL)  # a real worker death, not an exception of ours
                killed["pid"], killed["after"] = pid, len(metrics.read_text().splitlines())
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_rank1_mid_run, daemon=True)
    watcher.start()
    summary = run(RayEngine, topo, out, tracking=True, tracking_uri=uri, record_steps=False)
    watcher.join(timeout=5)
    assert killed and killed["after"] < epochs, "the worker was not killed mid-run"
    assert int((out / "pids" / "rank1.pid").read_text()) != killed["pid"]  # a new worker took over
    reference = run(LocalEngine, topo, tmp_path / "local", record_steps=False)
    assert summary["finished"] and summary["epochs"] == epochs
    for p in ("a", "b"):
        assert summary["peers"][p]["top1_last"] == reference["peers"][p]["top1_last"]
    assert_same_weights(out, tmp_path / "local", ["a", "b"])

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("quick")
    runs = client.search_runs([exp.experiment_id])
    peers = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(peers) == {"a", "b"}
    for run_ in peers.values():
        steps = sorted(m.step for m in client.get_metric_history(run_.info.run_id, "top1"))
        assert steps == list(range(1, epochs + 1))  # no duplicated or missing epochs (numbered from 1)
        assert run_.info.status == "FINISHED"


def test_deepspeed_zero2_replicas_match_local_and_resume(tmp_path):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / "dml.yaml").read_text())
    raw["peers"]["a"]["model"] = "mlp"
    raw["train"].update(epochs=2, threads=1, max_steps_per_epoch=22)  # full batches: equal shards
    local = load_topology(raw)
    raw["peers"]["a"].update(replicas=2, deepspeed={"config": str(ROOT / "configs/deepspeed/zero2.json")})
    raw["peers"]["b"]["replicas"] = 2
    zero = load_topology(raw)
    run(LocalEngine, local, tmp_path / "local")
    first = run(RayEngine, zero, tmp_path / "zero", stop_after_epochs=1)
    assert first["finished"] is False
    # the second fit resumes from the checkpoint, each replica reloading every ZeRO partition
    second = run(RayEngine, zero, tmp_path / "zero", resume=True)
    assert second["finished"] and second["epochs"] == 2
    files = {p.name for p in ckpt.latest_checkpoint(tmp_path / "zero" / "checkpoints").iterdir()}
    assert {"peer_a.pt", "peer_a.zero0.pt", "peer_a.zero1.pt", "peer_b.pt", "engine.pt"} <= files
    assert_same_weights(tmp_path / "local", tmp_path / "zero", ["a", "b"], tol=1e-5)



def test_loader_workers_inside_ray_workers_give_the_same_steps(tmp_path):
    """data.workers forks loader processes inside each Ray Train worker: the local engine's losses when every
    peer has one worker, the loader-less ray run's when a peer's replicas load shards; every run ends."""
    base = {"train.epochs": 2, "train.max_steps_per_epoch": 3}
    run(LocalEngine, quick("dml", **base), tmp_path / "local")
    run(RayEngine, quick("dml", **base, **{"data.workers": 1}), tmp_path / "ray")
    a, b = step_losses(tmp_path / "local"), step_losses(tmp_path / "ray")
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 2
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-5
    shards = {**base, "peers.a.replicas": 2}
    run(RayEngine, quick("dml", **shards), tmp_path / "replicas0")
    run(RayEngine, quick("dml", **shards, **{"data.workers": 2}), tmp_path / "replicas2")
    a, b = step_losses(tmp_path / "replicas0"), step_losses(tmp_path / "replicas2")
    assert a.keys() == b.keys() and len(a) == 2 * 3 * 2 and a == b
