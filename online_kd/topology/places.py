"""pydantic errors as one-line places of the YAML ('edges[2].from: …'), for loading and validation."""
from __future__ import annotations

import difflib
import re
from types import UnionType
from typing import Annotated, Any, Mapping, Sequence, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import TopologyError
from .schema import TopologyConfig

SAFE_KEY = re.compile(r"[\w\-]+\Z")
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
        elif kind == "field" or (isinstance(part, str) and SAFE_KEY.match(part)):
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


def describe_value(value: Any) -> str:
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


def message(e: Mapping[str, Any]) -> str:
    kind = e["type"]
    if kind == "missing":
        return "required but missing"
    if kind == "value_error":
        return str(e.get("ctx", {}).get("error", e["msg"]))
    msg = e["msg"]
    if "input" in e and kind not in ("too_short", "too_long"):
        msg += f" (got {describe_value(e['input'])})"
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
            got = f" (got {describe_value(e['input'])})" if "input" in e else ""
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
    msg = message(e)
    if rest:
        msg = f"key {rest[0]!r}" + "".join(f"[{r}]" if isinstance(r, int) else f".{r}" for r in rest[1:]) + f": {msg}"
    return TopologyError(where or "topology", msg)
