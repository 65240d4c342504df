"""Read a topology: YAML → overrides → ``like`` → schema → patterns → checks.

Every failure is a :class:`TopologyError` naming its YAML place; nothing else escapes.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from ..errors import TopologyError, suggest
from .graph import Topology
from .patterns import expand_edges
from .places import describe_value, format_validation_error, place
from .schema import TopologyConfig
from .yaml_loader import LoaderError, load_yaml

_INDEX = re.compile(r"^(\w[\w\-]*)?((?:\[\d+\])*)$")


def read_yaml(path: str | os.PathLike) -> dict:
    """The YAML file as a mapping, or a TopologyError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise TopologyError(str(path), "no such topology file")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(str(path), f"cannot read the file ({e})") from None
    try:
        data = load_yaml(text)
    except LoaderError as e:
        at = f"{path}:{e.line}" + (f":{e.column}" if e.column else "") if e.line else str(path)
        if e.place:
            raise TopologyError(e.place, f"{e.message} in {path}") from None
        raise TopologyError(at, e.message) from None
    if not isinstance(data, dict):
        raise TopologyError(str(path), "a topology is a mapping with name, data, peers, edges, …")
    return data


_EXAMPLE_PATH = "a dotted path like peers.a.optimizer.lr or edges[0].temperature"


def _split_path(path: str) -> list[str | int]:
    """'edges[0].temperature' or 'edges.0.temperature' → ['edges', 0, 'temperature']."""
    if not isinstance(path, str):
        raise TopologyError("--set", f"{path!r} is not {_EXAMPLE_PATH}")
    parts: list[str | int] = []
    for token in path.split("."):
        m = _INDEX.match(token)
        if not token or not m:
            raise TopologyError("--set", f"'{path}' is not {_EXAMPLE_PATH}")
        if m.group(1) is not None:
            parts.append(int(m.group(1)) if m.group(1).isdigit() else m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set one dotted path in the raw topology (the mechanism behind --set and Tune).

    Missing mappings on the way are created; a list item must exist already.
    """
    parts = _split_path(path)
    node: Any = raw
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        here = place(parts[: i + 1])
        if isinstance(node, list):
            if not isinstance(key, int):
                raise TopologyError(place(parts[:i]) or "topology", f"a list: name an item by its index, e.g. [0] (not '{key}')")
            if key >= len(node):
                raise TopologyError(here, f"no such item (the list has {len(node)})")
        elif isinstance(node, dict):
            if isinstance(key, int) and key not in node:
                key = str(key)  # 'model_args.0' names the key '0' of a mapping
        else:
            raise TopologyError(place(parts[:i]) or "topology",
                                f"cannot set '{place(parts[i:])}' inside {describe_value(node)}, which is not a mapping or list")
        if last:
            node[key] = value
            return
        child = node[key] if isinstance(node, list) else node.get(key)
        if child is None:
            child = node[key] = {}
        node = child


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' with the value read as YAML ('0.1' → 0.1, '[1,2]' → list)."""
    if not isinstance(text, str) or "=" not in text:
        raise TopologyError("--set", f"expected PATH=VALUE, e.g. train.epochs=3 (got {text!r})")
    path, value = text.split("=", 1)
    try:
        parsed = load_yaml(value) if value.strip() else ""
    except LoaderError as e:
        if e.message.startswith("not valid YAML"):
            parsed = value  # a plain string that YAML cannot read, e.g. 'a: b: c'
        else:
            raise TopologyError(f"--set {path.strip()}", e.message) from None
    return path.strip(), parsed


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | Sequence[str]) -> dict:
    """A copy of ``raw`` with overrides applied: a mapping path→value or 'path=value' strings."""
    raw = copy.deepcopy(raw)
    if isinstance(overrides, str):
        overrides = [overrides]
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides or ())
    for path, value in items:
        set_path(raw, path, value)
    return raw


_NODE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_NODE_SECTIONS = ("peers", "ensembles", "virtual")


def check_node_names(raw: Mapping) -> None:
    """Node names become places, metric keys and module names: letters, digits, '_' and '-'."""
    for section in _NODE_SECTIONS:
        nodes = raw.get(section)
        if isinstance(nodes, Mapping):
            for name in nodes:
                if not isinstance(name, str) or not _NODE_NAME.match(name):
                    raise TopologyError(section, f"node name {name!r} is not allowed (use letters, digits, '_' and '-', "
                                                 "starting with a letter or '_')")


def resolve_like(raw: dict) -> dict:
    """Peers written ``{like: a, …}`` take a's spec, then their own keys on top."""
    peers = raw.get("peers")
    if not isinstance(peers, dict):
        return raw
    resolved: dict[str, Any] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> Any:
        if name in resolved:
            return resolved[name]
        spec = peers[name]
        if not isinstance(spec, dict) or "like" not in spec:
            resolved[name] = spec
            return spec
        base = spec["like"]
        where = f"peers.{name}.like"
        if not isinstance(base, str):
            raise TopologyError(where, f"takes the name of another peer (got {describe_value(base)}; peers: {', '.join(map(str, peers))})")
        if base not in peers:
            raise TopologyError(where, suggest(base, map(str, peers), "peer"))
        if base == name or base in chain:
            cycle = (*chain[chain.index(base):], name, base) if base in chain else (name, base)
            raise TopologyError(where, "peers copy each other in a circle: " + " → ".join(cycle))
        merged = _deep_merge(copy.deepcopy(resolve(base, chain + (name,))), {k: v for k, v in spec.items() if k != "like"})
        resolved[name] = merged
        return merged

    raw = dict(raw)
    raw["peers"] = {name: resolve(name, ()) for name in peers}
    return raw


def _deep_merge(base: Any, top: Mapping) -> Any:
    if not isinstance(base, dict):
        return dict(top)
    for k, v in top.items():
        base[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def load_topology(
    source: str | os.PathLike | Mapping,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    check: bool = True,
) -> Topology:
    """Load, override, expand and check a topology (``check=False`` skips model/loss checks)."""
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
    elif isinstance(source, (str, os.PathLike)):
        raw = read_yaml(source)
    else:
        raise TopologyError("topology", f"expected a YAML file or a mapping (got {describe_value(source)})")
    raw = apply_overrides(raw, overrides)
    check_node_names(raw)
    raw = resolve_like(raw)
    try:
        config = TopologyConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err) from None
    edges = expand_edges(config)
    topology = Topology(config=config, edges=edges, raw=raw)
    if check:
        from .validate import check_topology

        check_topology(topology)
    return topology
