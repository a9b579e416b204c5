"""YAML loading that remembers where each value came from (file:line), for error messages."""
from __future__ import annotations

import yaml

from ..errors import ProfileError


class PosDict(dict):
    """A mapping with `.line` (its own line) and `.key_lines[key]` (1-based)."""
    line: int = 0
    key_lines: dict


class PosList(list):
    line: int = 0
    item_lines: list


def _convert(node: yaml.Node, loader: yaml.SafeLoader):
    if isinstance(node, yaml.MappingNode):
        out = PosDict()
        out.line, out.key_lines = node.start_mark.line + 1, {}
        for k, v in node.value:
            key = loader.construct_object(k) if isinstance(k, yaml.ScalarNode) else str(k)
            out[key] = _convert(v, loader)
            out.key_lines[key] = k.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = PosList(_convert(v, loader) for v in node.value)
        out.line, out.item_lines = node.start_mark.line + 1, [v.start_mark.line + 1 for v in node.value]
        return out
    return loader.construct_object(node)


def load_yaml(path: str):
    """Parse `path`; syntax errors become ProfileError('file:line: …')."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ProfileError(path, f"cannot read profile: {e.strerror}", "check the path") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _convert(node, loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise ProfileError(f"{path}:{line}", f"YAML syntax error: {e.problem or e.context}",
                           "fix the YAML syntax (indentation, quotes, colons)") from None
    finally:
        loader.dispose()
