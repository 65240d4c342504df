"""Input the loader cannot build, duplicate keys, sizes that would hang or exhaust memory, non-finite
floats: each is one 'place: message' line (exit 2 from the CLI), reproduced from the defect reports."""
from __future__ import annotations

import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from online_kd.errors import TopologyError
from online_kd.topology import load_topology
from online_kd.topology.graph import Topology
from online_kd.topology.patterns import MAX_EDGES
from online_kd.topology.plan import build_plan, check_input_size
from online_kd.engine.ray import MAX_WORKERS, check_cluster_resources
from online_kd.topology.yaml_loader import MAX_DEPTH, MAX_NODES

ROOT = Path(__file__).resolve().parents[1]
DML = (ROOT / "topologies" / "quick" / "dml.yaml").read_text()


def error(source, overrides=(), plan=False) -> str:
    with pytest.raises(TopologyError) as info:
        topo = load_topology(source, overrides)
        if plan:
            build_plan(topo)
    text = str(info.value)
    assert "\n" not in text, text
    return text


def write(tmp_path, text: str | bytes, name: str = "t.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---------------------------------------------------------------------- 1. YAML the loader cannot build
def test_deep_flow_nesting_is_one_line_naming_the_file(tmp_path):
    path = write(tmp_path, DML + "description: " + "[" * 500 + "]" * 500 + "\n")  # was RecursionError
    assert error(path) == f"{path}:{DML.count(chr(10)) + 1}: nested more than {MAX_DEPTH} levels deep"


def test_deep_block_mapping_is_one_line_naming_the_file(tmp_path):
    block = "".join("  " * i + f"k{i}:\n" for i in range(1000)) + "  " * 1000 + "v: 1\n"
    path = write(tmp_path, DML + block)  # was RecursionError
    assert error(path).startswith(f"{path}:") and error(path).endswith(f"nested more than {MAX_DEPTH} levels deep")


def test_nesting_within_the_limit_still_loads(tmp_path):
    path = write(tmp_path, DML + "description: " + "[" * 30 + "]" * 30 + "\n")
    assert error(path) == "description: Input should be a valid string (got a list)"  # the schema, not the loader


def test_a_tagged_value_that_cannot_be_built(tmp_path):
    path = write(tmp_path, DML + "description: !!float 'abc'\n")  # was ValueError
    assert error(path) == (f"description: !!float value cannot be built (ValueError: could not convert string to "
                           f"float: 'abc') in {path}")
    path = write(tmp_path, DML + "description: !!timestamp '0x1G'\n")  # was AttributeError
    assert error(path).startswith("description: !!timestamp value cannot be built (AttributeError")


def test_python_tags_are_refused(tmp_path):
    path = write(tmp_path, DML + "description: !!python/object/apply:os.system ['true']\n")
    assert "not valid YAML (could not determine a constructor for the tag" in error(path)


def test_billion_laughs_is_refused_before_expanding(tmp_path):
    lines = ["l0: &l0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = write(tmp_path, DML.replace("    model: convnet\n", "    model: convnet\n    model_args: {x: *l9}\n").replace(
        "name: quick-dml", "name: quick-dml\nbombs:\n" + "".join(f"  {line}\n" for line in lines)))
    start = time.perf_counter()
    assert error(path) == f"bombs.l5: holds more than {MAX_NODES:,} values once its aliases are expanded in {path}"
    assert time.perf_counter() - start < 10  # 9^9 values are never built (a generous bound, not a benchmark)


def test_recursive_and_deep_aliases(tmp_path):
    path = write(tmp_path, DML + "description: &r [*r]\n")
    assert error(path) == f"description[0]: an alias refers to a value that contains it (a recursive alias) in {path}"
    chain = "d0: &d0 [[[[[[1]]]]]]\n" + "".join(f"  d{i}: &d{i} [[[[*d{i - 1}]]]]\n" for i in range(1, 10))
    path = write(tmp_path, DML + "description:\n  " + chain)
    assert "nested more than 32 levels deep once its aliases are expanded" in error(path)


def test_bad_bytes(tmp_path):
    path = write(tmp_path, DML.encode() + b"\xff\xfe\x00bad")
    assert error(path).startswith(f"{path}: cannot read the file ('utf-8' codec can't decode byte 0xff")
    path = write(tmp_path, DML.encode().replace(b"tracking", b"track\x00ing"))
    assert error(path).startswith(f"{path}: not valid YAML (")
    path = write(tmp_path, b"\xef\xbb\xbf" + DML.encode())  # a UTF-8 byte-order mark is fine
    assert load_topology(path).name == "quick-dml"


def test_set_values_go_through_the_same_loader():
    assert error(DML_RAW(), ["description=" + "[" * 100 + "]" * 100]) == f"--set description: nested more than {MAX_DEPTH} levels deep"
    assert load_topology(DML_RAW(), ["description=a: b: c"]).config.description == "a: b: c"  # not YAML: a string


def DML_RAW() -> dict:
    return yaml.safe_load(DML)


# ---------------------------------------------------------------------- 2. duplicate keys
def test_duplicate_keys_name_the_key_and_its_lines(tmp_path):
    path = write(tmp_path, DML.replace("train: {epochs: 12, seed: 0}", "train: {epochs: 1, epochs: 999}"))  # last won
    assert error(path) == f"train.epochs: duplicate key (line 5; first on line 5) in {path}"
    path = write(tmp_path, DML.replace("    schedule: {name: cosine}\n", "    schedule: {name: cosine}\n    model: mlp\n"))
    assert error(path) == f"peers.a.model: duplicate key (line 11; first on line 8) in {path}"
    path = write(tmp_path, DML.replace("edges:", "edges: []\nedges:"))
    assert error(path).startswith("edges: duplicate key (line 13; first on line 12)")


def test_merge_keys_may_override(tmp_path):
    text = DML.replace("  a:\n", "  a: &base\n").replace("  b: {like: a}", "  b:\n    <<: *base\n    model: mlp")
    topo = load_topology(write(tmp_path, text))
    assert topo.config.peers["b"].model == "mlp" and topo.config.peers["b"].optimizer.lr == 0.05


# ---------------------------------------------------------------------- 3. sizes checked before expanding
def test_a_huge_pattern_is_refused_before_expanding():
    raw = DML_RAW()
    raw["edges"][0]["over"] = [f"n{i}" for i in range(2000)]  # ~4M edges, >2 GB, minutes
    start = time.perf_counter()
    assert error(raw) == f"edges[0].over: 'all_pairs' over 2000 nodes brings the topology to 3,998,000 edges; at most {MAX_EDGES:,}"
    assert time.perf_counter() - start < 10
    raw["edges"][0] = {"from": "a", "to": [f"n{i}" for i in range(MAX_EDGES + 1)], "loss": "kl"}
    assert error(raw).startswith(f"edges[0].to: {MAX_EDGES + 1} targets brings the topology to")


def test_absurd_replica_counts():
    assert error(DML_RAW(), ["peers.b.replicas=1000000000"]) == \
        "peers.b.replicas: Input should be less than or equal to 1024 (got 1000000000)"
    msg = error(DML_RAW(), ["engine.name=ray", "peers.a.replicas=600", "peers.b.replicas=600"])
    assert msg == f"peers.a.replicas: the ray engine would start 1,200 workers (2 peer group(s) × 600 replicas); at most {MAX_WORKERS:,}"


def test_cluster_resources_check():
    topo = load_topology(DML_RAW(), ["engine.name=ray", "peers.a.replicas=2", "peers.b.replicas=2"])
    check_cluster_resources(topo, {"CPU": 4.0})
    with pytest.raises(TopologyError) as info:
        check_cluster_resources(topo, {"CPU": 3.0})
    assert str(info.value) == ("peers.a.replicas: the ray engine starts 4 workers (2 peer group(s) × 2 replica(s)) of 1 CPU "
                               "each: 4 CPU in all, but the Ray cluster has 3")
    topo = load_topology(DML_RAW(), ["engine.name=ray", "engine.resources_per_worker={GPU: 1}"])
    with pytest.raises(TopologyError, match=r"^engine.resources_per_worker: .* 2 GPU in all, but the Ray cluster has 0$"):
        check_cluster_resources(topo, {"CPU": 16.0})


@pytest.mark.slow
def test_ray_engine_refuses_resources_the_cluster_lacks(tmp_path):
    """A real local Ray instance on this machine (no GPU): asking a GPU per worker exits 2 instead of waiting."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = subprocess.run([sys.executable, "-m", "online_kd.cli", "run",
                          str(ROOT / "topologies" / "quick" / "dml.yaml"), "--engine", "ray", "--out", str(tmp_path / "run"),
                          "--set", "engine.resources_per_worker={GPU: 1}", "--set", "tracking.enabled=false"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == ("error: engine.resources_per_worker: the ray engine starts 2 workers "
                                                   "(2 peer group(s) × 1 replica(s)) of 1 GPU each: 2 GPU in all, but "
                                                   "the Ray cluster has 0")


# ---------------------------------------------------------------------- 4. inputs that cannot be allocated
def test_an_image_shape_that_cannot_be_allocated():
    raw = DML_RAW()
    raw["data"] = {"dataset": "synthetic", "synthetic": {"shape": [3, 100000, 100000]}}  # was exit 1 (alloc failure)
    msg = error(raw, plan=True)
    assert msg.startswith("data.synthetic.shape: one 3×100000×100000 sample takes 120,000,000,000 bytes (111.8 GiB): "
                          "the dry forward's batch of 2 needs more than half of this machine's ")


def test_input_size_estimates_in_bytes():
    topo = load_topology(DML_RAW(), ["data.batch_size=64"], check=False)
    from online_kd.data import dataset_info

    info = dataset_info(topo.config.data)  # digits: 1×8×8
    check_input_size(topo, info, rows=64, memory=2 * 64 * 256)
    with pytest.raises(TopologyError) as e:
        check_input_size(topo, info, rows=64, memory=2 * 64 * 256 - 2)
    assert str(e.value).startswith("data.batch_size: a batch of 64 samples of 1×8×8 floats takes 16,384 bytes (0.0 GiB) "
                                   "for its input alone, more than half of this machine's 32,766 bytes")
    topo = load_topology(DML_RAW(), ["data.dataset=synthetic", "data.synthetic.num_train=1000000000000"])
    with pytest.raises(TopologyError, match=r"^data.synthetic.num_train: 1,000,000,000,000 \+ 128 samples take "
                                            r"16,000,000,002,048 bytes"):
        check_input_size(topo, dataset_info(topo.config.data), rows=64, memory=2**35)


# ---------------------------------------------------------------------- 5. every float finite
@pytest.mark.parametrize("value", ["inf", "'1e999'", "-.inf", ".nan"])
def test_non_finite_edge_parameters_from_set(value):
    assert error(DML_RAW(), [f"edges[0].temperature={value}"]).startswith(
        "edges[0].temperature: Input should be a finite number")


def _is_float(ann) -> bool:
    """float itself, maybe Annotated or Optional (floats inside lists or tuples are checked by the schema tests)."""
    if typing.get_origin(ann) is typing.Annotated:
        return _is_float(typing.get_args(ann)[0])
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return any(_is_float(a) for a in typing.get_args(ann))
    return ann is float


def _models_in(ann):
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        yield ann
    elif typing.get_origin(ann) in (typing.Union, types.UnionType, typing.Annotated):
        for a in typing.get_args(ann):
            yield from _models_in(a)


def _float_fields(model: type[BaseModel], prefix=()):
    """(path, field) of every float field in ``model`` and the models nested in it."""
    for name, f in model.model_fields.items():
        path = prefix + (f.alias or name,)
        if _is_float(f.annotation):
            yield path, f
        for sub in _models_in(f.annotation):
            yield from _float_fields(sub, path)


def _all_params_models():
    from online_kd.losses import COMBINERS, LOSSES, VIRTUAL_TEACHERS
    from online_kd.stages import STAGE_KINDS
    from online_kd.topology.schema import TopologyConfig

    yield "topology", TopologyConfig
    for kind, registry in (("loss", LOSSES), ("combiner", COMBINERS), ("virtual", VIRTUAL_TEACHERS),
                           ("stage kind", STAGE_KINDS)):
        for name, cls in sorted(registry.items()):
            yield f"{kind} {name}", cls.Params


def test_every_float_of_every_params_model_must_be_finite():
    """Generic: all schema sections and registered Params models refuse '1e999' in every float field."""
    checked = 0
    for what, model in _all_params_models():
        for path, f in _float_fields(model):
            if any(getattr(m, "allow_inf_nan", None) for m in f.metadata):  # a field that opts in
                continue
            value: object = "1e999"
            for key in reversed(path):
                value = {key: value}
            with pytest.raises(ValidationError) as info:
                model.model_validate(value)
            kinds = {e["type"] for e in info.value.errors() if tuple(e["loc"][:len(path)]) == path}
            assert "finite_number" in kinds, f"{what}: {'.'.join(path)} accepts 1e999 ({kinds})"
            checked += 1
    assert checked > 40  # the walk reaches the loss parameters, not just a few schema fields
