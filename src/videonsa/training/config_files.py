"""Reading training config files (YAML or JSON) safely: size-capped, alias bombs and recursion refused.

YAML is read with PyYAML's safe loader (no Python objects) plus two limits, because a config may come from
someone else: the file must be at most `MAX_CONFIG_BYTES`, and its aliases may not expand the document beyond
`MAX_YAML_NODES` values (the "billion laughs" file: ten levels of ten aliases is 10**10 strings, which any later
copy, comparison or JSON dump of the config would try to write out). See docs/training.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from videonsa.errors import UserError

MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_YAML_NODES = 100_000

# YAML 1.1 reads 1e-6 (no dot) as a string; people mean the number.
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$")


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, reading ``1e-6`` as a float. Plain integers still resolve to int (that resolver comes
    first)."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _NUMBER, list("-+0123456789."))


class YamlTooLarge(yaml.YAMLError):
    """The document expands (through aliases) beyond `MAX_YAML_NODES` values, or refers to itself."""


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely; raises `yaml.YAMLError` (`YamlTooLarge` for bombs and cycles)."""
    loader = _ConfigLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expanded_size(node)
            return loader.construct_document(node)
        except RecursionError:
            raise YamlTooLarge("it is nested too deeply") from None
    finally:
        loader.dispose()


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or JSON file holding a mapping; any problem is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise UserError(f"config file {path} is {size:,} bytes; a training config is a few kilobytes "
                        f"(limit {MAX_CONFIG_BYTES:,})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text") from None
    parse = _parse_yaml_file if path.suffix.lower() in (".yaml", ".yml") else _parse_json_file
    value = parse(path, text)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"config file {path} must hold a mapping of settings, not {type(value).__name__}")
    return value


def _parse_yaml_file(path: Path, text: str) -> Any:
    try:
        return load_yaml(text)
    except YamlTooLarge as error:
        raise UserError(f"config file {path} is refused: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None


def _parse_json_file(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"config file {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    except RecursionError:
        raise UserError(f"config file {path} is refused: it is nested too deeply") from None


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values `root` stands for once every alias is written out (shared nodes counted each time they
    are used), without expanding anything: each node's count is computed once, children first."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            in_progress.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_YAML_NODES:
                raise YamlTooLarge(f"its aliases expand to more than {MAX_YAML_NODES:,} values")
            continue
        if key in sizes:
            continue
        if key in in_progress:  # an alias to one of its own enclosing nodes
            raise YamlTooLarge("an alias refers to a value that contains it")
        in_progress.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
