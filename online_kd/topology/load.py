"""Read a topology: YAML → overrides → ``like`` → schema → patterns → checks.

Every failure is a :class:`TopologyError` naming its YAML place; nothing else escapes.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Mapping, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import TopologyError, suggest
from .graph import Topology
from .patterns import expand_edges
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
                                f"cannot set '{place(parts[i:])}' inside {_got(node)}, which is not a mapping or list")
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
            raise TopologyError(where, f"takes the name of another peer (got {_got(base)}; peers: {', '.join(map(str, peers))})")
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


# ---------------------------------------------------------------------- pydantic errors as places
_SAFE_KEY = re.compile(r"[\w\-]+\Z")
_WRAPPER_TAGS = ("function-", "tagged-union", "json-or-python", "lax-or-strict", "chain[", "nullable[")


def _strip(ann: Any) -> Any:
    """Annotated[X, …] → X; Optional[X] → X (a real union stays a union)."""
    while True:
        if get_origin(ann) is Annotated:
            ann = get_args(ann)[0]
            continue
        if get_origin(ann) in (Union, UnionType):
            args = [a for a in get_args(ann) if a is not type(None)]
            if len(args) == 1:
                ann = args[0]
                continue
        return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _branch_tag(ann: Any) -> str:
    ann = _strip(ann)
    return ann.__name__ if isinstance(ann, type) and not get_args(ann) else repr(ann).replace("typing.", "")


def _walk(loc: Sequence[Any]) -> tuple[list[tuple[Any, str, Any]], int | None]:
    """pydantic's loc as (part, kind, annotation of the container) without branch tags.

    kind is 'field' (a schema key), 'index' (a list item) or 'key' (a mapping's own key).
    Also returns where a union's branch tag was dropped (None if none was).
    """
    ann: Any = TopologyConfig
    out: list[tuple[Any, str, Any]] = []
    tag_at = None
    for part in loc:
        if isinstance(part, str) and part.startswith(_WRAPPER_TAGS):
            continue
        a = _strip(ann)
        if get_origin(a) in (Union, UnionType) and isinstance(part, str):  # pydantic names the branch it tried
            tag_at = len(out) if tag_at is None else tag_at
            ann = next((x for x in get_args(a) if _branch_tag(x) == part), None)
            continue
        origin = get_origin(a)
        if _is_model(a):
            f = (a.model_fields.get(part) or next((f for f in a.model_fields.values() if f.alias == part), None)
                 if isinstance(part, str) else None)
            out.append((part, "field" if f is not None else "key", a))
            ann = f.annotation if f is not None else None
        elif origin in (list, tuple, set, frozenset) and isinstance(part, int):
            args = [x for x in get_args(a) if x is not Ellipsis]
            out.append((part, "index", a))
            ann = (args[part] if origin is tuple and len(args) > 1 and part < len(args) else args[0]) if args else None
        elif origin is dict:
            out.append((part, "key", a))
            ann = get_args(a)[-1] if get_args(a) else None
        else:
            out.append((part, "index" if isinstance(part, int) else "key", a))
            ann = None
    return out, tag_at


def _render(parts: Sequence[tuple[Any, str, Any]]) -> tuple[str, list]:
    """The place of ``parts`` up to the first key a place cannot show, and the parts left over."""
    out = ""
    for i, (part, kind, _) in enumerate(parts):
        if kind == "index" and isinstance(part, int):
            out += f"[{part}]"
        elif kind == "field" or (isinstance(part, str) and _SAFE_KEY.match(part)):
            out += ("." if out else "") + part
        else:
            return out, [p for p, _, _ in parts[i:]]
    return out, []


def place(loc: Sequence[Any]) -> str:
    """('edges', 2, 'from') → 'edges[2].from'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _got(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _allowed_keys(loc: Sequence[Any]) -> list[str] | None:
    """The keys a strict section at ``loc`` accepts, to list them in 'unknown key' errors."""
    parts, _ = _walk([*loc[:-1], "\0"])
    container = _strip(parts[-1][2]) if parts else None
    if _is_model(container):
        return [f.alias or n for n, f in container.model_fields.items()]
    return None


def _message(e: Mapping[str, Any]) -> str:
    kind = e["type"]
    if kind == "missing":
        return "required but missing"
    if kind == "value_error":
        return str(e.get("ctx", {}).get("error", e["msg"]))
    msg = e["msg"]
    if "input" in e and kind not in ("too_short", "too_long"):
        msg += f" (got {_got(e['input'])})"
    if kind == "literal_error" and isinstance(e.get("input"), str):
        allowed = re.findall(r"'([^']*)'", str(e.get("ctx", {}).get("expected", "")))
        close = difflib.get_close_matches(e["input"], allowed, n=1, cutoff=0.5)
        if close:
            msg += f", did you mean '{close[0]}'?"
    return msg


def format_validation_error(err: ValidationError) -> TopologyError:
    """The first pydantic error as one 'place: message' line."""
    errors = err.errors()
    e = errors[0]
    parts, tag_at = _walk(e["loc"])
    if tag_at is not None:
        # a union (e.g. 'to: name or list'): show the branch that got furthest, or both messages
        same = [(x, _walk(x["loc"])[0]) for x in errors]
        same = [(x, p) for x, p in same if _walk(x["loc"])[1] == tag_at and [q[0] for q in p[:tag_at]] == [q[0] for q in parts[:tag_at]]]
        deepest = max(len(p) for _, p in same)
        if deepest > tag_at:
            e, parts = next((x, p) for x, p in same if len(p) == deepest)
        else:
            msgs = list(dict.fromkeys(x["msg"] for x, _ in same))
            merged = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
            got = f" (got {_got(e['input'])})" if "input" in e else ""
            where, _ = _render(parts[:tag_at])
            return TopologyError(where or "topology", merged + got)
    key_error = (bool(e["loc"]) and e["loc"][-1] == "[key]") or e["type"] == "invalid_key"
    if key_error:
        parts = [p for p in parts if p[0] != "[key]"]
        where, _ = _render(parts[:-1])
        return TopologyError(where or "topology", f"the key {parts[-1][0]!r} must be a string (quote it)")
    where, rest = _render(parts)
    if e["type"] == "extra_forbidden":
        key = parts[-1][0] if parts else None
        allowed = _allowed_keys([p for p, _, _ in parts]) or []
        msg = "unknown key" if not rest else f"unknown key {key!r}"
        if allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            msg += (f", did you mean '{close[0]}'?" if close else "") + f" (allowed: {', '.join(allowed)})"
        if len(rest) > 1:
            msg = f"key {rest[0]!r}: {msg}"
        return TopologyError(where or "topology", msg)
    msg = _message(e)
    if rest:
        msg = f"key {rest[0]!r}" + "".join(f"[{r}]" if isinstance(r, int) else f".{r}" for r in rest[1:]) + f": {msg}"
    return TopologyError(where or "topology", msg)


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
        raise TopologyError("topology", f"expected a YAML file or a mapping (got {_got(source)})")
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
