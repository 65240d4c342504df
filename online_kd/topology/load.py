"""Read a topology: YAML → overrides → ``like`` → schema → patterns → checks.

Every failure is a :class:`TopologyError` naming its YAML place; nothing else escapes.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import TopologyError
from .graph import Topology
from .patterns import expand_edges
from .schema import TopologyConfig

_INDEX = re.compile(r"^(\w[\w\-]*)?((?:\[\d+\])*)$")


def place(loc: Sequence[Any]) -> str:
    """('edges', 2, 'from') → 'edges[2].from'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def read_yaml(path: str | os.PathLike) -> dict:
    """The YAML file as a mapping, or a TopologyError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise TopologyError(str(path), "no such topology file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise TopologyError(where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise TopologyError(str(path), "a topology is a mapping with name, data, peers, edges, …")
    return data


def _split_path(path: str) -> list[str | int]:
    """'edges[0].temperature' or 'edges.0.temperature' → ['edges', 0, 'temperature']."""
    parts: list[str | int] = []
    for token in path.split("."):
        m = _INDEX.match(token)
        if not token or not m:
            raise TopologyError(f"--set {path}", "a dotted path like peers.a.optimizer.lr or edges[0].temperature")
        if m.group(1) is not None:
            parts.append(int(m.group(1)) if m.group(1).isdigit() else m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    return parts


def set_path(raw: dict, path: str, value: Any) -> None:
    """Set one dotted path in the raw topology (the mechanism behind --set and Tune)."""
    parts = _split_path(path)
    node: Any = raw
    for i, key in enumerate(parts):
        last = i == len(parts) - 1
        here = place(parts[: i + 1])
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise TopologyError(here, f"no such item (the list has {size})")
            if last:
                node[key] = value
            else:
                node = node[key]
        else:
            if not isinstance(node, dict):
                raise TopologyError(here, "cannot set a key inside a value that is not a mapping")
            if last:
                node[key] = value
            else:
                if not isinstance(node.get(key), (dict, list)):
                    node[key] = {}
                node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' with the value read as YAML ('0.1' → 0.1, '[1,2]' → list)."""
    if "=" not in text:
        raise TopologyError(f"--set {text}", "expected PATH=VALUE, e.g. train.epochs=3")
    path, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return path.strip(), parsed


def apply_overrides(raw: dict, overrides: Mapping[str, Any] | Sequence[str]) -> dict:
    """A copy of ``raw`` with overrides applied: a mapping path→value or 'path=value' strings."""
    raw = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, Mapping) else map(parse_override, overrides)
    for path, value in items:
        set_path(raw, path, value)
    return raw


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
        if not isinstance(base, str) or base not in peers:
            raise TopologyError(f"peers.{name}.like", f"unknown peer '{base}' (peers: {', '.join(peers)})")
        if base in chain:
            raise TopologyError(f"peers.{name}.like", "peers copy each other in a circle: " + " → ".join(chain + (base,)))
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


def _allowed_keys(loc: Sequence[Any]) -> list[str] | None:
    """The keys a strict section at ``loc`` accepts, to list them in 'unknown key' errors."""
    model: Any = TopologyConfig
    for part in loc[:-1]:
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(part) or next(
                (f for f in model.model_fields.values() if f.alias == part), None)
            if field is None:
                return None
            model = field.annotation
        else:
            args = getattr(model, "__args__", ())
            model = args[-1] if args else None
        # unwrap Optional[...] / list[...] / dict[str, X]
        while not (isinstance(model, type) and issubclass(model, BaseModel)) and getattr(model, "__args__", None):
            if isinstance(part, int) or getattr(model, "__origin__", None) in (dict,):
                model = model.__args__[-1]
                break
            model = next((a for a in model.__args__ if a is not type(None)), None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return None


def format_validation_error(err: ValidationError) -> TopologyError:
    """The first pydantic error as one 'place: message' line."""
    e = err.errors()[0]
    loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-union")))]
    where = place(loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        msg = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif kind == "missing":
        msg = "required but missing"
    elif kind == "value_error":
        msg = str(e.get("ctx", {}).get("error", e["msg"]))
    else:
        msg = e["msg"]
        if "input" in e and not isinstance(e["input"], (dict, list)):
            msg += f" (got {e['input']!r})"
    return TopologyError(where or "topology", msg)


def load_topology(
    source: str | os.PathLike | Mapping,
    overrides: Mapping[str, Any] | Sequence[str] = (),
    check: bool = True,
) -> Topology:
    """Load, override, expand and check a topology (``check=False`` skips model/loss checks)."""
    raw = read_yaml(source) if not isinstance(source, Mapping) else copy.deepcopy(dict(source))
    raw = apply_overrides(raw, overrides)
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
