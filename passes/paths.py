"""Module paths of graph nodes, from Dynamo's ``nn_module_stack`` metadata."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch.fx import Node

_BLOCK = re.compile(r"^(.*)\.(\d+)$")
_OUTER_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def module_stack(node: Node) -> list[tuple[str, str]]:
    """[(key, path_text)] from outermost to innermost module."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(k, v[0] if isinstance(v, tuple) else str(v)) for k, v in stack.items()]


def module_class(node: Node, key: str) -> str:
    """The class name of the module `key` of the node's stack ("" if unknown)."""
    v = (node.meta.get("nn_module_stack") or {}).get(key)
    cls = v[1] if isinstance(v, tuple) and len(v) > 1 else None
    return getattr(cls, "__name__", None) or str(cls or "").rsplit(".", 1)[-1]


def normalize_path(text: str) -> str:
    """Dynamo's source text of a module -> a dotted path ("transformer_blocks.0.attn1")."""
    text = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\._modules\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\[(\d+)\]", r".\1", text)
    text = re.sub(r"^L\.self\.?|^self\.?", "", text)
    return text.strip(".")


def block_key(node: Node, paths: Mapping[str, str]) -> tuple[str, int, str] | None:
    """(container path, index, stack key) of the outermost numbered module the node runs in."""
    for key, text in module_stack(node):
        base = key.split("@")[0]
        path = paths.get(base) or normalize_path(text)
        m = _BLOCK.match(path)
        if m:
            return m.group(1), int(m.group(2)), key
    return None


def node_path(node: Node, paths: Mapping[str, str]) -> str | None:
    """The path of the innermost module the node runs in, or None outside every module."""
    stack = module_stack(node)
    if not stack:
        return None
    key, text = stack[-1]
    return paths.get(key.split("@")[0]) or normalize_path(text)


def path_order(path: str) -> list[tuple[int, int, str]]:
    """Sort key for module paths in block order: "blocks.2.attn" before "blocks.10.attn"."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def block_path(node: Node, paths: Mapping[str, str]) -> str | None:
    """"<container>.<i>" of the outermost numbered module in the path of the node's innermost
    module. Unlike `block_key`, it names the block also for a graph Dynamo compiled from a
    nested frame (a block's own forward, piecewise), whose stack holds only the frame's
    submodules: `paths` gives their full names ("blocks.3.attn.to_q" -> "blocks.3")."""
    path = node_path(node, paths)
    return None if path is None else outer_block(path)


def outer_block(path: str) -> str | None:
    """The outermost numbered module of a module path: "blocks.3.attn.to_q" -> "blocks.3"."""
    m = _OUTER_BLOCK.match(path + ".")
    return m.group(1) if m else None


def block_of(node: Node, paths: Mapping[str, str]) -> tuple[str, int] | None:
    """(container path, index) of the outermost numbered module the node runs in."""
    found = block_key(node, paths)
    return None if found is None else found[:2]
