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
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ProfileError(f"{path}:{line}", f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})",
                           "a profile is a YAML text file saved as UTF-8") from None
    bad = next((i for i, ch in enumerate(text) if ch < " " and ch not in "\t\n\r"), None)
    if bad is not None:   # YAML refuses control characters (a binary file that happens to decode as UTF-8)
        raise ProfileError(f"{path}:{text[:bad].count(chr(10)) + 1}", f"control character 0x{ord(text[bad]):02x} in the "
                           "profile: not a text file", "a profile is a YAML text file saved as UTF-8")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return None if node is None else _convert(node, loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise ProfileError(f"{path}:{line}", f"YAML syntax error: {e.problem or e.context}",
                           "fix the YAML syntax (indentation, quotes, colons)") from None
    except yaml.YAMLError as e:       # e.g. characters YAML does not accept
        raise ProfileError(path, f"not readable as YAML: {str(e).splitlines()[0]}",
                           "a profile is a YAML text file saved as UTF-8") from None
    finally:
        loader.dispose()
