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
        ["delete", "replace", "add_key", "rename_node", "duplicate_item", "retarget_edge", "copy_value"]))
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
        topo.to_yaml()
        assert plan.shapes.keys() == topo.config.peers.keys()
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
