"""The ray engine's cluster settings without a cluster: engine.storage/placement and peers' node labels in
the schema, their one-line errors, `online-kd plan`, the seating of workers by node labels, data.root per
node, and where a run's Ray Train storage is recorded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from online_kd.data.errors import DataError
from online_kd.data.info import expand_root
from online_kd.engine import checkpoint as ckpt
from online_kd.engine import ray_storage
from online_kd.engine.exchange import label_selectors, placement, seat_workers
from online_kd.engine.ray import scaling_placement
from online_kd.errors import TopologyError
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
DML = ROOT / "topologies" / "quick" / "dml.yaml"


def dml(**overrides):
    return load_topology(yaml.safe_load(DML.read_text()), {"engine.name": "ray", **overrides})


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "online_kd.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


# ------------------------------------------------------------------ schema and its errors
def test_defaults_are_a_single_machine():
    e = dml().config.engine
    assert (e.storage, e.storage_endpoint, e.placement) == (None, None, "pack")
    assert scaling_placement(dml()) == {"placement_strategy": "PACK"}


@pytest.mark.parametrize("overrides, place, words", [
    ({"engine.placement": "scatter"}, "engine.placement", "'pack' or 'spread'"),
    ({"engine.storage_endpoint": "http://127.0.0.1:9000"}, "engine.storage_endpoint", "s3:// URI"),
    ({"engine.storage": "gs://b/x", "engine.storage_endpoint": "http://h:9000"}, "engine.storage_endpoint", "s3://"),
    ({"engine.storage": ""}, "engine.storage", "at least 1"),
    ({"peers.a.node_labels": {"zone": "in(a,b)"}}, "peers.a.node_labels.zone", "no selector operators"),
    ({"peers.a.node_labels": {"zone": "!a"}}, "peers.a.node_labels.zone", "plain Ray node label"),
])
def test_bad_cluster_settings_name_their_place(overrides, place, words):
    with pytest.raises(TopologyError) as err:
        dml(**overrides)
    assert err.value.place == place and words in err.value.message and "\n" not in str(err.value)


def test_colocated_peers_must_agree_on_node_labels():
    with pytest.raises(TopologyError) as err:
        dml(**{"engine.colocate": [["a", "b"]], "peers.a.node_labels": {"zone": "a"},
               "peers.b.node_labels": {"zone": "b"}})
    assert err.value.place == "peers.b.node_labels" and "engine.colocate[0]" in err.value.message
    agreed = dml(**{"engine.colocate": [["a", "b"]], "peers.a.node_labels": {"zone": "a"},
                    "peers.b.node_labels": {"zone": "a"}})
    assert label_selectors(agreed) == [{"zone": "a"}]


def test_label_selectors_follow_placement_and_reach_the_scaling_config():
    topo = dml(**{"peers.a.node_labels": {"zone": "a"}, "peers.b.node_labels": {"zone": "b", "disk": "ssd"},
                  "peers.a.replicas": 2, "peers.b.replicas": 2, "engine.placement": "spread"})
    assert [w.peers for w in placement(topo)] == [("a",), ("a",), ("b",), ("b",)]
    sel = [{"zone": "a"}, {"zone": "a"}, {"zone": "b", "disk": "ssd"}, {"zone": "b", "disk": "ssd"}]
    assert label_selectors(topo) == sel
    assert scaling_placement(topo) == {"placement_strategy": "SPREAD", "label_selector": sel}
    assert label_selectors(dml()) is None  # no labels: Ray may put any worker anywhere


def test_plan_shows_strategy_and_node_labels(tmp_path):
    args = ["plan", DML, "--set", "engine.placement=spread", "--set", "peers.a.node_labels={zone: a}",
            "--set", "peers.b.node_labels={zone: b}"]
    r = cli(*args, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    workers = json.loads(r.stdout)["placement"]
    assert [(w["peers"], w["strategy"], w["node_labels"]) for w in workers] == [
        (["a"], "SPREAD", {"zone": "a"}), (["b"], "SPREAD", {"zone": "b"})]
    text = cli(*args, cwd=tmp_path).stdout
    assert "SPREAD" in text and "zone=a" in text and "zone=b" in text
    plain = cli("plan", DML, cwd=tmp_path).stdout
    assert "PACK" in plain and "any node" in plain


# ------------------------------------------------------------------ seating workers on labelled nodes
def test_workers_take_the_ranks_on_their_labelled_nodes():
    topo = dml(**{"peers.a.node_labels": {"zone": "a"}, "peers.b.node_labels": {"zone": "b"}})
    workers = placement(topo)
    # Ray numbers its workers grouped by node: rank 0 may sit on zone b
    seated = seat_workers(workers, label_selectors(topo), [{"zone": "b"}, {"zone": "a", "ray.io/node-id": "x"}])
    assert [(w.peers, w.rank) for w in seated] == [(("a",), 1), (("b",), 0)]
    same = seat_workers(workers, label_selectors(topo), [{"zone": "a"}, {"zone": "b"}])
    assert [w.rank for w in same] == [0, 1]
    with pytest.raises(TopologyError, match="peers.b.node_labels"):
        seat_workers(workers, label_selectors(topo), [{"zone": "a"}, {"zone": "a"}])


def test_seating_finds_a_matching_where_a_greedy_choice_would_not():
    topo = dml(**{"peers.a.node_labels": {"gpu": "yes"}, "peers.b.node_labels": {"gpu": "yes", "zone": "b"}})
    # rank 0's node fits both; rank 1's only a: b must take rank 0, a rank 1
    seated = seat_workers(placement(topo), label_selectors(topo),
                          [{"gpu": "yes", "zone": "b"}, {"gpu": "yes", "zone": "c"}])
    assert {w.peers[0]: w.rank for w in seated} == {"a": 1, "b": 0}


# ------------------------------------------------------------------ data.root per node
def test_data_root_takes_each_nodes_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("OKD_DATA_TEST", str(tmp_path))
    assert expand_root("${OKD_DATA_TEST:-./data}/cifar") == tmp_path / "cifar"
    monkeypatch.delenv("OKD_DATA_TEST")
    assert expand_root("${OKD_DATA_TEST:-./data}/cifar") == Path("./data/cifar")
    assert expand_root("${OKD_DATA_TEST:-~/d}") == Path("~/d").expanduser()
    monkeypatch.setenv("OKD_DATA_TEST", "")
    assert expand_root("${OKD_DATA_TEST:-/d}") == Path("/d")  # ':-' also replaces an empty value
    assert expand_root("${OKD_DATA_TEST-/d}x") == Path("x")  # '-' only an unset one
    monkeypatch.delenv("OKD_DATA_TEST")
    with pytest.raises(DataError) as err:
        expand_root("$OKD_DATA_TEST/cifar")
    assert err.value.place == "data.root" and "OKD_DATA_TEST" in err.value.message


# ------------------------------------------------------------------ the run's storage
def test_default_storage_is_the_run_directory_and_is_not_recorded(tmp_path):
    where = ray_storage.for_run(tmp_path, None, None)
    assert where.run_config_args() == {"storage_path": str(tmp_path.resolve() / "ray")}
    assert not (tmp_path / ray_storage.RECORD).exists()
    assert ray_storage.of_run(tmp_path).run_root == str(tmp_path.resolve() / "ray" / "ray")


def test_shared_storage_gets_a_folder_per_run_recorded_for_resume(tmp_path):
    shared = tmp_path / "nfs"
    one = ray_storage.for_run(tmp_path / "run", str(shared), None)
    two = ray_storage.for_run(tmp_path / "other" / "run", f"file://{shared}", None)
    assert Path(one.base).parent == Path(two.base).parent == shared.resolve()
    assert one.base != two.base and Path(one.base).name.startswith("run-")  # same directory name, own folders
    # a resume finds the recorded folder whatever the YAML says by then
    assert ray_storage.for_run(tmp_path / "run", str(tmp_path / "elsewhere"), None) == one
    assert ray_storage.of_run(tmp_path / "run") == one


def test_uri_storage_with_an_endpoint_gives_ray_a_filesystem(tmp_path):
    import pyarrow.fs as pafs

    where = ray_storage.for_run(tmp_path, "s3://bucket/okd", "http://127.0.0.1:9")
    assert where.base.startswith("s3://bucket/okd/") and where.is_uri
    args = where.run_config_args()
    assert args["storage_path"].startswith("bucket/okd/") and isinstance(args["storage_filesystem"], pafs.S3FileSystem)
    assert where.where("bucket/okd/x/ray/checkpoint_1") == "s3://bucket/okd/x/ray/checkpoint_1"
    gs = ray_storage.for_run(tmp_path / "g", "gs://bucket/okd", None)
    assert gs.run_config_args() == {"storage_path": gs.base}


def test_storage_uri_reads_through_pyarrow(tmp_path):
    """A file:// base is a local path; the reading path (snapshot, engine.pt) goes through pyarrow either way."""
    import torch

    where = ray_storage.RayStorage(str(tmp_path / "s"))
    (tmp_path / "s" / "ray" / "c1").mkdir(parents=True)
    torch.save({"epoch": 3}, tmp_path / "s" / "ray" / "c1" / "engine.pt")
    assert where.load("c1/engine.pt") == {"epoch": 3} and where.load("c2/engine.pt") is None


def test_latest_pointer_may_name_the_recorded_shared_storage_only(tmp_path):
    run = tmp_path / "run"
    where = ray_storage.for_run(run, str(tmp_path / "nfs"), None)
    target = Path(where.run_root) / "checkpoint_000001"
    target.mkdir(parents=True)
    ckpt.atomic_write_text(str(target), run / "checkpoints" / "latest")
    assert ckpt.latest_checkpoint(run / "checkpoints") == target.resolve()
    ckpt.atomic_write_text(str(tmp_path), run / "checkpoints" / "latest")
    with pytest.raises(TopologyError, match="points outside the run directory"):
        ckpt.latest_checkpoint(run / "checkpoints")


def test_several_nodes_need_a_storage():
    with pytest.raises(TopologyError) as err:
        ray_storage.check_shared(None, 2)
    assert err.value.place == "engine.storage" and "every node" in err.value.message
    ray_storage.check_shared(None, 1)
    ray_storage.check_shared("/mnt/nfs/okd", 2)


def test_restore_point_on_a_uri_storage_reads_the_snapshot_through_pyarrow(tmp_path):
    """An object-store storage (here a file:// URI, which pyarrow serves like s3://): the latest checkpoint's
    engine.pt, read without a local path; the pointer in the run directory names it by URI."""
    import torch

    from online_kd.engine import ray_checkpoint

    run = tmp_path / "run"
    where = ray_storage.RayStorage(f"file://{tmp_path / 'bucket' / 'run-0a1b2c3d'}")
    where.save(run)
    root = tmp_path / "bucket" / "run-0a1b2c3d" / "ray"
    assert ray_checkpoint.restore_point(run) == (None, None)  # nothing reported yet
    for epoch in (1, 2):
        (root / f"checkpoint_{epoch}").mkdir(parents=True)
        torch.save({"epoch": epoch, "history": [{"epoch": e} for e in range(1, epoch + 1)]},
                   root / f"checkpoint_{epoch}" / "engine.pt")
    results = [{"checkpoint_dir_name": f"checkpoint_{e}"} for e in (1, 2)]
    (root / ray_checkpoint.SNAPSHOT).write_text(json.dumps({"checkpoint_results": results,
                                                           "latest_checkpoint_result": results[-1]}))
    directory, state = ray_checkpoint.restore_point(run)
    assert directory == f"{where.base}/ray/checkpoint_2" and state["epoch"] == 2
    assert ray_checkpoint.kept_words(run).endswith(f"{where.base}/ray/checkpoint_2, after epoch 2")
    ckpt.atomic_write_text(directory, run / "checkpoints" / "latest")
    assert ckpt.latest_checkpoint(run / "checkpoints") is None  # an object store has no local directory
