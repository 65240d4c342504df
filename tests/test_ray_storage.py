"""The ray engine's cluster path on a real local Ray instance (CPU workers over gloo): checkpoints on a shared
storage outside the run directory, workers' files written by the controller, a restart bit-exact with
dropout (each worker's random state in the checkpoint), a worker without its data named in one line."""
import json
from pathlib import Path

import pytest
import ray
import torch
import yaml

from online_kd.cli import main
from online_kd.engine import checkpoint as ckpt
from online_kd.engine import ray_checkpoint, ray_storage
from online_kd.engine.options import RunOptions
from online_kd.engine.ray import RayEngine
from online_kd.engine.raystart import ensure_ray
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
DML = ROOT / "topologies" / "quick" / "dml.yaml"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def node_id():
    """The one node of the local instance the engine runs on (started here once for the module)."""
    started = ensure_ray(4, log_to_driver=False)
    yield ray.get_runtime_context().get_node_id()
    if started:
        ray.shutdown()


def dropout_dml(**overrides):
    """Quick DML where peer a draws dropout masks from its worker's global random state every step."""
    raw = yaml.safe_load(DML.read_text())
    raw["peers"]["a"].update(model="wrn_16_1", model_args={"drop_rate": 0.3})
    return load_topology(raw, {"train.epochs": 3, "train.max_steps_per_epoch": 3, "train.threads": 1, **overrides})


def run(topo, out, **kw):
    return RayEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True, record_steps=True, **kw)).run()


def weights(out: Path) -> dict:
    last = ckpt.latest_checkpoint(out / "checkpoints")
    return {p: ckpt.load(last / ckpt.peer_file(p))["model"] for p in ("a", "b")}


def test_stopped_and_resumed_on_shared_storage_is_bit_exact_with_dropout(tmp_path):
    whole = tmp_path / "whole"
    run(dropout_dml(), whole)
    shared = tmp_path / "shared"
    out = tmp_path / "parts" / "run"
    topo = dropout_dml(**{"engine.storage": str(shared)})
    assert run(topo, out, stop_after_epochs=1)["finished"] is False
    where = ray_storage.of_run(out)
    assert Path(where.base).parent == shared and (out / ray_storage.RECORD).is_file()
    assert not (out / "ray").exists()  # Ray Train kept nothing in the run directory
    directory, state = ray_checkpoint.restore_point(out)
    assert Path(directory).is_relative_to(shared) and state["epoch"] == 1
    assert {f"rng_worker{i}.pt" for i in (0, 1)} <= {p.name for p in Path(directory).iterdir()}

    resumed = run(topo, out, resume=True)
    assert resumed["finished"] and resumed["epochs"] == 3
    assert ckpt.latest_checkpoint(out / "checkpoints").is_relative_to(shared)
    a, b = weights(whole), weights(out)
    for p in a:
        for k, v in a[p].items():
            assert torch.equal(v, b[p][k]), (p, k)  # the resumed workers drew the masks the whole run drew
    # the controller wrote what workers used to: pids and every step's losses, each step once per peer
    assert all(int((out / "pids" / f"rank{r}.pid").read_text()) > 0 for r in (0, 1))
    lines = [json.loads(x) for r in (0, 1) for x in (out / "steps" / f"rank{r}.jsonl").read_text().splitlines()]
    whole_lines = [json.loads(x) for r in (0, 1) for x in (whole / "steps" / f"rank{r}.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 3 * 2 and sorted(map(json.dumps, lines)) == sorted(map(json.dumps, whole_lines))


def test_worker_without_its_data_fails_in_one_line_naming_its_node(tmp_path, capsys, node_id):
    missing = tmp_path / "nowhere"
    code = main(["run", str(DML), "--engine", "ray", "--out", str(tmp_path / "run"), "--no-tracking", "--quiet",
                 "--set", "data.dataset=cifar10", "--set", f"data.root=${{OKD_TEST_NO_DATA:-{missing}}}",
                 "--set", "engine.max_failures=0", "--set", "train.threads=1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "data.root" in lines[0] and str(missing) in lines[0] and f"Ray node {node_id}" in lines[0], lines[0]
