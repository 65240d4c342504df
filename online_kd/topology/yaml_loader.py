"""A safe YAML loader for topologies: bounded nesting and alias expansion, no duplicate keys.

``yaml.safe_load`` recurses once per nesting level (a file of 500 ``[`` raises RecursionError),
expands aliases into shared objects that grow exponentially when walked ("billion laughs"), and
lets a repeated key silently replace the first. :func:`load_yaml` refuses all three with a
:class:`LoaderError` that names the place, and turns any other failure of building a value
(``!!float 'abc'``, a bad timestamp) into one too.
"""
from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

#: deepest nesting of mappings and lists (shipped topologies use 5)
MAX_DEPTH = 32
#: most values a document may hold once its aliases are expanded
MAX_NODES = 100_000

_SAFE_KEY = re.compile(r"[\w\-]+\Z")


class LoaderError(ValueError):
    """A document the loader refuses: ``place`` (a YAML path, may be empty), ``line`` (1-based or None)."""

    def __init__(self, message: str, place: str = "", line: int | None = None, column: int | None = None):
        super().__init__(message)
        self.message, self.place, self.line, self.column = message, place, line, column


def _child_place(parent: str, key: Any) -> str:
    if isinstance(key, int) and not isinstance(key, bool):
        return f"{parent}[{key}]"
    if isinstance(key, str) and _SAFE_KEY.match(key):
        return f"{parent}.{key}" if parent else key
    return f"{parent}[{key!r}]"


def _line(node: Node) -> int | None:
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else None


class TopologyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with a nesting limit, an alias-expansion limit and duplicate-key errors."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._places: dict[int, str] = {}

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LoaderError(f"nested more than {MAX_DEPTH} levels deep", line=self.peek_event().start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (LoaderError, yaml.YAMLError):
            raise
        except Exception as e:  # the constructors of tagged values raise anything: ValueError, AttributeError, …
            # a tagged value that cannot be built, e.g. !!float 'abc' or !!timestamp '2020-13-45'
            raise LoaderError(f"{node.tag.replace('tag:yaml.org,2002:', '!!')} value cannot be built ({type(e).__name__}: {e})",
                              self._places.get(id(node), ""), _line(node)) from None

    def construct_document(self, node):
        self._measure(node)
        return super().construct_document(node)

    def _measure(self, root: Node) -> None:
        """Record each collection's place; refuse recursive aliases and too deep or too large expansions."""
        sizes: dict[int, tuple[int, int]] = {}  # id(node) → (values, depth) once its aliases are expanded
        open_: set[int] = set()

        def walk(node: Node, place: str, depth: int) -> tuple[int, int]:
            key = id(node)
            if depth + sizes.get(key, (0, 0))[1] > MAX_DEPTH:
                raise LoaderError(f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded",
                                  place, _line(node))
            if key in sizes:
                return sizes[key]
            if key in open_:
                raise LoaderError("an alias refers to a value that contains it (a recursive alias)", place, _line(node))
            open_.add(key)
            self._places.setdefault(key, place)
            total, deepest = 1, 0
            if isinstance(node, SequenceNode):
                children = [(_child_place(place, i), child) for i, child in enumerate(node.value)]
            elif isinstance(node, MappingNode):
                children = []
                for k, v in node.value:
                    name = k.value if isinstance(k, ScalarNode) else "?"
                    children += [(place, k), (_child_place(place, name), v)]
            else:
                children = []
            for where, child in children:
                n, d = walk(child, where, depth + 1)
                total, deepest = total + n, max(deepest, d + 1)
                if total > MAX_NODES:
                    raise LoaderError(f"holds more than {MAX_NODES:,} values once its aliases are expanded",
                                      place, _line(node))
            open_.discard(key)
            sizes[key] = (total, deepest)
            return sizes[key]

        walk(root, "", 0)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            first: dict[Any, int | None] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' then overriding keys is YAML's merge, not a repetition
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:
                    continue  # an unhashable key: SafeConstructor reports it
                if seen:
                    where = _child_place(self._places.get(id(node), ""), key)
                    at = f" (line {_line(key_node)}; first on line {first[key]})" if first[key] else ""
                    raise LoaderError(f"duplicate key{at}", where, _line(key_node))
                first[key] = _line(key_node)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str | bytes) -> Any:
    """One YAML document through :class:`TopologyLoader`; every failure is a :class:`LoaderError`."""
    try:
        return yaml.load(text, Loader=TopologyLoader)
    except LoaderError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise LoaderError(f"not valid YAML ({e.problem or e.context or e})", line=mark.line + 1 if mark else None,
                          column=mark.column + 1 if mark else None) from None
    except yaml.YAMLError as e:
        raise LoaderError(f"not valid YAML ({e})") from None
    except (ValueError, TypeError, OverflowError, RecursionError, MemoryError) as e:
        raise LoaderError(f"cannot be built ({type(e).__name__}: {e})") from None
