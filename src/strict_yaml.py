"""YAML read strictly: a key given twice in one mapping, at any depth, is an error naming both lines.

Plain `yaml.safe_load` keeps the last of two equal keys, so a second `train:` section appended to
params.yaml silently replaces the first (and every key only the first one set falls back to its
default). Everything else reads exactly as `yaml.safe_load` does.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice; `line`s are 1-based, as editors show them."""

    def __init__(self, key: Any, first_line: int, second_line: int, path: str) -> None:
        self.key, self.first_line, self.second_line, self.path = key, first_line, second_line, path
        where = f"'{path}.{key}'" if path else f"'{key}'"
        super().__init__(None, None, f"key {where} appears twice (lines {first_line} and {second_line}); "
                                     "keep one of them")

    def __str__(self) -> str:
        return str(self.problem)


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges another mapping: its keys may be overridden, as YAML says
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], line, _path_of(self, node))
                seen[key] = line
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error says so below
        return super().construct_mapping(node, deep=deep)


def _path_of(loader: _StrictLoader, node: yaml.MappingNode) -> str:
    """The dotted keys leading to `node` from the document's root (best effort; '' at the top)."""
    def walk(current: yaml.Node, prefix: list[str]) -> list[str] | None:
        if current is node:
            return prefix
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                found = walk(value_node, [*prefix, str(getattr(key_node, "value", "?"))])
                if found is not None:
                    return found
        elif isinstance(current, yaml.SequenceNode):
            for i, item in enumerate(current.value):
                found = walk(item, [*prefix, str(i)])
                if found is not None:
                    return found
        return None

    root = getattr(loader, "_root", None)
    return ".".join(walk(root, []) or []) if root is not None else ""


def strict_load(text: str) -> Any:
    """`yaml.safe_load(text)`, but a duplicated key raises DuplicateKeyError (a yaml.YAMLError)."""
    loader = _StrictLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        loader._root = root
        return loader.construct_document(root)
    finally:
        loader.dispose()
