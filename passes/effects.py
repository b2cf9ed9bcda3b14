"""What a node of a Dynamo graph reads and writes, beyond its FX edges.

FX edges say which nodes a node takes as arguments, not which of them it reads values from,
and not what it writes. The locator needs both:

  * metadata-only arguments: `out.type_as(query)` reads only query's dtype and
    `torch.empty_like(x)` only x's shape, so neither carries x's values (a value-level
    dependency on a module input is how the locator spots a residual added inside a module);
  * in-place writes: Wan's rotary embedding (diffusers `WanAttnProcessor`) fills a fresh
    `torch.empty_like` buffer with `out[..., 0::2] = ...`. Such a write stays inside the
    module and is safe to drop together with it on a reuse step; a write to anything that
    may alias a tensor from outside the module is not.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

# Ops whose first argument contributes only its shape / dtype / device.
_META_SELF = {
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
    "new_empty", "new_zeros", "new_ones", "new_full",
}
# Methods whose second argument contributes only its metadata.
_META_OTHER = {"type_as", "expand_as", "view_as", "reshape_as"}

# `t += v` on a tensor writes t in place (Dynamo records the operator).
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor,
}
# Ops that always return new memory not aliasing any argument: factories, and the compute
# ops whose outputs attention processors write into (CogVideoX applies its rotary embedding
# with `query[:, :, text_len:] = ...` to the output of norm_q).
_ALLOCATIONS = _META_SELF | {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.clone, "clone",
    F.linear, torch._C._nn.linear, torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm",
    F.layer_norm, F.rms_norm, F.group_norm, F.scaled_dot_product_attention,
    torch.cat, torch.concat, torch.stack,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, "add", "sub", "mul", "div",
}
# Ops whose result may share memory with their first argument: views, and casts or layout
# changes that return `self` when there is nothing to do.
_ALIASES = {
    operator.getitem, torch.narrow, torch.select, torch.transpose, torch.permute,
    torch.unsqueeze, torch.squeeze, torch.flatten, torch.reshape, torch.unbind, torch.chunk,
    torch.split, torch.movedim, torch.diagonal,
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "unflatten",
    "flatten", "unsqueeze", "squeeze", "narrow", "select", "expand", "expand_as", "unbind",
    "chunk", "split", "movedim", "diagonal", "as_strided", "contiguous", "to", "type_as",
    "float", "half", "bfloat16", "type", "detach", "__getitem__",
}


def _is(node: Node, table: set) -> bool:
    return node.op in ("call_function", "call_method") and node.target in table


# Runtime checks Dynamo inserts on data-dependent sizes (Mochi's attention gathers the
# unmasked prompt tokens with nonzero): they have no effect beyond raising.
_ASSERTS = {
    torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range.default,
    torch.ops.aten.sym_constrain_range_for_size.default, torch._check, torch._check_is_size,
}


def is_local_assert(node: Node, region: set[Node]) -> bool:
    """A runtime check that reads only values computed inside `region`: it belongs to the
    region and goes with it on a reuse step."""
    return node.op == "call_function" and node.target in _ASSERTS and all(
        a in region for a in node.all_input_nodes
    )


def _is_size(node: Node) -> bool:
    return isinstance(node.meta.get("example_value"), (torch.SymInt, torch.SymBool))


def data_inputs(node: Node) -> list[Node]:
    """The argument nodes whose values (not just metadata) flow into `node`'s result.

    Sizes do not count either: a data-dependent size (Mochi pads each prompt's attention
    output by the count of its masked tokens) shapes the result but adds no input values to
    it, which is what the locator's residual check is after.
    """
    return [a for a in _value_args(node) if not _is_size(a)]


def _value_args(node: Node) -> list[Node]:
    meta: Node | None = None
    if _is(node, _META_SELF) and node.args and isinstance(node.args[0], Node):
        meta = node.args[0]
    elif _is(node, _META_OTHER) and len(node.args) > 1 and isinstance(node.args[1], Node):
        meta = node.args[1]
    ins = node.all_input_nodes
    if meta is None:
        return list(ins)
    # A node passed twice (x.type_as(x)) still carries values through its other slot.
    rest = [a for a in node.args if a is meta] + [v for v in node.kwargs.values() if v is meta]
    return [a for a in ins if a is not meta or len(rest) > 1]


def mutated_arg(node: Node) -> Node | None:
    """The tensor `node` writes in place, if it is an in-place write Dynamo records as such.

    `t[idx] = v` (operator.setitem), `t += v`, in-place tensor methods (`t.add_(v)`),
    `torch.relu_(t)` style functions, functionals called with `inplace=True` and `out=t`.
    """
    first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    out = node.kwargs.get("out")
    if isinstance(out, Node):  # torch.add(a, b, out=t)
        return out
    if node.op == "call_function":
        if node.target is operator.setitem or node.target in _INPLACE_OPERATORS:
            return first
        name = getattr(node.target, "__name__", "")
        # operator.and_ / or_ are `a & b` / `a | b`, not writes (HunyuanVideo 1.5's mask)
        trailing = name.endswith("_") and not name.endswith("__") and not _is_operator(node)
        if node.kwargs.get("inplace") is True or trailing:
            return first
    elif node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and name != "requires_grad_":
            return first
    return None


def _is_operator(node: Node) -> bool:
    return getattr(operator, getattr(node.target, "__name__", ""), None) is node.target


def fresh_base(node: Node) -> Node | None:
    """The allocation `node` is (a view of), or None when it may alias anything else."""
    seen = 0
    while isinstance(node, Node) and seen < 64:
        if _is(node, _ALLOCATIONS):
            return node
        if not _is(node, _ALIASES) or not node.args or not isinstance(node.args[0], Node):
            return None
        node = node.args[0]
        seen += 1
    return None


def aliases_of(base: Node, region: set[Node]) -> set[Node]:
    """`base` and every region node that may share its memory through view-like ops."""
    out, todo = {base}, [base]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in region and u not in out and _is(u, _ALIASES) and u.args and u.args[0] is n:
                out.add(u)
                todo.append(u)
    return out


def has_effect(node: Node) -> bool:
    """Whether dropping `node` could change the program although its result is unused.

    FX's `Node.is_impure` misses in-place writes Dynamo records as tensor methods:
    NucleusMoE's router sums its scores with `sums.scatter_add_(0, idx, scores)` and never
    reads the method's result, so a plain `eliminate_dead_code` dropped the write and the
    refresh step divided by zero sums."""
    return node.is_impure() or mutated_arg(node) is not None


def eliminate_dead_code(graph: Graph, removable: Collection[str] = ()) -> None:
    """`graph.eliminate_dead_code` that keeps every node with an effect (`has_effect`),
    except those named in `removable` (a reused site's own nodes, writes included)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.name not in removable and has_effect(n))


def written_allocations(nodes: Iterable[Node]) -> set[Node]:
    """The fresh allocations among `nodes`' arguments that some node of `nodes` writes in place
    (and their views): such a buffer must stay one per writer."""
    out: set[Node] = set()
    pool = set(nodes)
    for n in pool:
        target = mutated_arg(n)
        base = fresh_base(target) if target is not None else None
        if base is not None:
            out |= aliases_of(base, pool | {base})
    return out


__all__ = [
    "aliases_of",
    "data_inputs",
    "eliminate_dead_code",
    "fresh_base",
    "has_effect",
    "is_local_assert",
    "mutated_arg",
    "written_allocations",
]
