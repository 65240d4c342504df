"""Mutated topologies either load and dry-run, or fail with one 'place: message' line — never a crash.

Starts from the quick topologies (yaml.safe_load, as a user's file would arrive) and applies
one to three random edits: delete a key or item, replace a value with junk, add an unknown
(or a real but misplaced) key, rename a node (alone or everywhere), duplicate a list item,
point an edge at some name, copy a value from elsewhere in the file.
"""
from __future__ import annotations

import copy
import math
import random
import re
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from online_kd.errors import TopologyError
from online_kd.topology import load_topology
from online_kd.topology.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
QUICK = sorted((ROOT / "topologies" / "quick").glob("*.yaml"))
RAWS = [yaml.safe_load(p.read_text()) for p in QUICK]

#: 'place: message' — a place with no colon, then a message, on one line
PLACE_MESSAGE = re.compile(r"^[^\s:][^:]*: .+")

# Names that mean something somewhere (so mutations sometimes land on valid values) and junk.
NAMES = [
    "a", "b", "c", "teacher", "student", "assistant", "nobody",
    "kd", "kl", "tfkd", "klx", "convnet", "convnet_small", "mlp", "resnet8", "resnet32x", "torchvision:nope",
    "mean", "min_logit", "naive", "linear", "uniform",
    "sgd", "adam", "cosine", "multistep", "all_pairs", "ring", "star", "chain", "linear_warmup", "step",
    "digits", "synthetic", "cifar10", "imagefolder", "fp16", "bf16", "auto", "cpu", "cuda:0", "standard", "none",
    "batchmean", "logits", "stage1", "pool", "module:fc",
    "", " ", "a:b", "x.y", "é", "a\nb", "null", "True", "0", "-1", "1e9", "[x]",
]
# Keys: unknown ones and real schema keys that may be misplaced.
KEYS = [
    "foo", "Name", "temperature", "alpha", "tap", "like", "frozen", "init", "stages", "after", "train", "ensembles",
    "virtual", "members", "combine", "kind", "until_epoch", "schedule", "pattern", "over", "center", "from", "to",
    "model_args", "holdout", "replicas", "colocate", "epochs", "name", "weight", "model", "lr", "milestones",
    "synthetic", "shape", "widths", "hidden", "correct_prob",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.sampled_from([2**31, -(2**63), 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([math.nan, math.inf, -math.inf, -0.5, 0.0, 1e-300])
    | st.sampled_from(NAMES)
    | st.text(max_size=8)
)
keys = st.sampled_from(KEYS) | st.sampled_from(NAMES) | st.text(max_size=6) | st.integers(-3, 3)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)


small = st.integers(-2, 24) | st.sampled_from([0, 1, 2, 3, 4, 7])
model_args = st.dictionaries(
    st.sampled_from(["widths", "strides", "hidden", "input_size", "depth", "width", "foo"]),
    small | st.lists(small, max_size=4) | scalars,
    max_size=3,
)


def node_names(raw):
    return [n for s in ("peers", "ensembles", "virtual") if isinstance(raw.get(s), dict) for n in raw[s]] or ["a"]


def set_field(raw: dict, data) -> str:
    """Set a field the deeper checks (stages, ensembles, dry forward) look at to a plausible wrong value."""
    names = node_names(raw)
    peers = raw.get("peers") if isinstance(raw.get("peers"), dict) else {}
    peer_names = list(peers) or ["a"]
    which = data.draw(st.sampled_from(["model_args", "model", "frozen", "stages", "ensemble", "virtual", "synthetic",
                                       "edge_param", "edge_schedule", "colocate"]))
    sub = st.lists(st.sampled_from(names + ["nobody"]), max_size=3)
    if which in ("model_args", "model", "frozen") and peers:
        peer = pick(data, peer_names)
        if not isinstance(peers[peer], dict):
            return which + " (skipped)"
        if which == "model_args":
            peers[peer]["model_args"] = data.draw(model_args)
        elif which == "model":
            peers[peer]["model"] = data.draw(st.sampled_from(["mlp", "convnet", "convnet_small", "resnet8", "wrn_16_1",
                                                              "vgg8", "resnet", "torchvision:nope", "torchvision:"]))
        else:
            peers[peer]["frozen"] = True
            if data.draw(st.booleans()):
                peers[peer]["init"] = "x.pt"
        return f"{which} peers.{peer} = {peers[peer]!r}"
    if which == "stages":
        stage = st.fixed_dictionaries({"train": sub}, optional={
            "name": st.sampled_from(["s1", "s2", "s3", "teacher"]), "after": st.lists(st.sampled_from(["s1", "s2", "s3", "x"]), max_size=2),
            "epochs": st.integers(-1, 3)})
        raw["stages"] = data.draw(st.lists(stage, max_size=3))
        return f"stages = {raw['stages']!r}"
    if which == "ensemble":
        raw.setdefault("ensembles", {})
        if isinstance(raw["ensembles"], dict):
            raw["ensembles"][data.draw(st.sampled_from(["ens", "teacher", "a"]))] = data.draw(st.fixed_dictionaries(
                {"members": sub}, optional={"combine": st.sampled_from(["mean", "naive", "min_logit", "linear", "nope"]),
                                            "refit_every": small}))
        return f"ensembles = {raw['ensembles']!r}"
    if which == "virtual":
        raw.setdefault("virtual", {})
        if isinstance(raw["virtual"], dict):
            raw["virtual"][data.draw(st.sampled_from(["smooth", "a"]))] = data.draw(st.fixed_dictionaries(
                {"kind": st.sampled_from(["uniform", "tfkd", "nope"])},
                optional={"temperature": scalars, "correct_prob": scalars}))
        return f"virtual = {raw['virtual']!r}"
    if which == "synthetic" and isinstance(raw.get("data"), dict):
        raw["data"]["dataset"] = "synthetic"
        raw["data"]["synthetic"] = data.draw(st.fixed_dictionaries({}, optional={
            "shape": st.lists(st.integers(-1, 40), min_size=2, max_size=4), "num_classes": st.integers(-1, 120),
            "num_train": small, "num_test": small}))
        return f"data = {raw['data']!r}"
    edges = raw.get("edges")
    if which in ("edge_param", "edge_schedule") and isinstance(edges, list) and edges and isinstance(edges[0], dict):
        edge = pick(data, [e for e in edges if isinstance(e, dict)] or [{}])
        if which == "edge_param":
            edge[data.draw(st.sampled_from(["temperature", "alpha", "reduction", "until_epoch", "weight", "tap"]))] = data.draw(scalars)
        else:
            edge["schedule"] = data.draw(st.fixed_dictionaries({}, optional={
                "name": st.sampled_from(["constant", "linear_warmup", "step", "cosine"]), "epochs": small,
                "milestones": st.lists(small, max_size=3), "gamma": scalars}))
        return f"{which} {edge!r}"
    if which == "colocate":
        raw.setdefault("engine", {})
        if isinstance(raw["engine"], dict):
            raw["engine"]["colocate"] = data.draw(st.lists(sub, max_size=2))
        return f"engine = {raw['engine']!r}"
    return which + " (skipped)"


def paths(node, prefix=()):
    """Every path into the raw topology (the root is ())."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths(v, prefix + (i,))


def get(node, path):
    for p in path:
        node = node[p]
    return node


def rename_everywhere(node, old, new):
    """Replace the string ``old`` by ``new`` in every value (not keys) of ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            node[k] = new if v == old and isinstance(v, str) else rename_everywhere(v, old, new)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            node[i] = new if v == old and isinstance(v, str) else rename_everywhere(v, old, new)
    return node


def pick(data, items):
    """One of ``items`` by index (sampled_from would favour the first, e.g. the root's 'name')."""
    return random.Random(data.draw(st.integers(0, 2**32 - 1))).choice(list(items))


def mutate(raw: dict, data) -> str:
    """Apply one random edit in place; returns what it did (for the failure report)."""
    all_paths = list(paths(raw))
    inner = [p for p in all_paths if p]
    containers = [p for p in all_paths if isinstance(get(raw, p), (dict, list))]
    op = data.draw(st.sampled_from(
        ["delete", "replace", "add_key", "rename_node", "duplicate_item", "retarget_edge", "copy_value", "set_field"]))
    if op == "set_field":
        return set_field(raw, data)
    if op == "delete" and inner:
        path = pick(data, inner)
        parent = get(raw, path[:-1])
        del parent[path[-1]]
    elif op == "replace" and inner:
        path = pick(data, inner)
        get(raw, path[:-1])[path[-1]] = data.draw(junk)
    elif op == "add_key":
        dicts = [p for p in containers if isinstance(get(raw, p), dict)]
        path = pick(data, dicts)
        get(raw, path)[data.draw(keys)] = data.draw(junk)
    elif op == "rename_node":
        sections = [s for s in ("peers", "ensembles", "virtual") if isinstance(raw.get(s), dict) and raw[s]]
        if not sections:
            return op + " (no nodes)"
        section = data.draw(st.sampled_from(sections))
        old = pick(data, list(raw[section]))
        new = data.draw(st.sampled_from(NAMES) | st.text(max_size=6))
        nodes = raw[section]
        raw[section] = {(new if k == old else k): v for k, v in nodes.items()}
        if data.draw(st.booleans()):  # rename the references too
            for key in [k for k in raw if k != section]:
                raw[key] = rename_everywhere(raw[key], old, new)
        return f"{op} {section}.{old} → {new!r}"
    elif op == "duplicate_item":
        lists = [p for p in containers if isinstance(get(raw, p), list) and get(raw, p)]
        if not lists:
            return op + " (no lists)"
        path = pick(data, lists)
        items = get(raw, path)
        items.insert(data.draw(st.integers(0, len(items))), copy.deepcopy(pick(data, items)))
    elif op == "retarget_edge":
        edges = raw.get("edges")
        if not isinstance(edges, list) or not edges or not isinstance(edges[0], dict):
            return op + " (no edges)"
        i = data.draw(st.integers(0, len(edges) - 1))
        if not isinstance(edges[i], dict):
            return op + " (edge is not a mapping)"
        field = data.draw(st.sampled_from(["from", "to", "over", "center"]))
        name = data.draw(st.sampled_from(NAMES))
        edges[i][field] = [name, *edges[i].get("over", [])[1:]] if field == "over" and isinstance(
            edges[i].get("over"), list) else name
        return f"{op} edges[{i}].{field} = {name!r}"
    elif op == "copy_value" and inner:
        src = pick(data, inner)
        dst = pick(data, inner)
        value = copy.deepcopy(get(raw, src))
        try:
            get(raw, dst[:-1])[dst[-1]] = value
        except (KeyError, IndexError, TypeError):  # dst vanished inside the copied value
            return op + " (skipped)"
        return f"{op} {src} → {dst}"
    else:
        return op + " (skipped)"
    return f"{op} {path}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_topologies_load_or_fail_with_one_placed_line(data):
    raw = copy.deepcopy(data.draw(st.sampled_from(RAWS), label="topology"))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        note(mutate(raw, data))
    before = repr(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zero-size layers from junk model args warn on init
            topo = load_topology(raw)
            plan = build_plan(topo)
        assert plan.shapes.keys() == topo.config.peers.keys()
        again = load_topology(yaml.safe_load(topo.to_yaml()))  # the topology as run loads again
        assert [e.key for e in again.edges] == [e.key for e in topo.edges]
    except TopologyError as err:
        text = str(err)
        assert "\n" not in text and "\r" not in text, text
        assert PLACE_MESSAGE.match(text), text
        assert err.place and not err.place.startswith("topology:"), text
    assert repr(raw) == before, "load_topology changed its input"


@pytest.mark.parametrize("path", QUICK, ids=[p.stem for p in QUICK])
def test_unmutated_quick_topologies_load(path):
    """The starting points themselves are valid (so the fuzz explores near-valid files)."""
    build_plan(load_topology(yaml.safe_load(path.read_text())))
