"""What a node of a Dynamo graph reads and writes, beyond its FX edges.

FX edges say which nodes a node takes as arguments, not which of them it reads values from,
nor which memory it shares or writes. The passes need all three:

  * metadata-only arguments: `out.type_as(query)` reads only query's dtype and
    `torch.empty_like(x)` only x's shape, so neither carries x's values (a value-level
    dependency on a module input is how the locator spots a residual added inside a module);
  * shared memory: which nodes' values live in the same storage. This is read off the fake
    tensors Dynamo traced with (`example_value`): two values alias exactly when their
    storages are one, as they were when the graph was traced. No op list is involved, so a
    fresh table from `torch.arange` is as fresh as one from `torch.empty`;
  * in-place writes: which argument a node writes. Read from the ATen schema of the op the
    node calls (`Tensor(a!)` annotations, `out=`), from Python's own in-place operators
    (`t[i] = v`, `t += v`), and, for an op with no schema, conservatively: a result that
    shares memory with an argument is taken to be a write into it. The fake tensors' version
    counters then say, per storage, whether the trace wrote it at all; a storage written
    more often than the writes found is marked `unexplained`, and the passes treat anything
    touching it as unsafe.

Wan's rotary embedding (diffusers `WanAttnProcessor`) fills a fresh `torch.empty_like`
buffer with `out[..., 0::2] = ...`; a rotary table built per call (`inv = torch.arange(..);
inv /= d`) is the same pattern. Such writes stay inside the module and go with it on a reuse
step; a write to memory from outside the module does not. The batch pass merges or moves
only values that nothing in the graph writes (`Memory.stable`).
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable

import torch
from torch.fx import Graph, Node
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_leaves

# Ops whose first argument contributes only its shape / dtype / device.
_META_SELF = {
    torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
    "new_empty", "new_zeros", "new_ones", "new_full",
}
# Methods whose second argument contributes only its metadata.
_META_OTHER = {"type_as", "expand_as", "view_as", "reshape_as"}

# Python's in-place operators: on a tensor, `t += v` writes t (Dynamo records the operator).
_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor,
    operator.imatmul, operator.ilshift, operator.irshift, operator.setitem, operator.delitem,
}
# Tensor methods with no ATen op of their own that at most return `self` (a cast to the
# dtype a tensor already has). Anything else without a schema is treated as unknown.
_PYTHON_ALIASES = {"float", "half", "bfloat16", "double", "int", "long", "bool", "type",
                   "cpu", "cuda", "__getitem__"}
# In-place methods that change only autograd flags, never values.
_FLAG_WRITES = {"requires_grad_", "retain_grad"}


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


def _functional_collective(target: object) -> bool:
    op = getattr(target, "default", target)  # Dynamo records the packet, AOT the overload
    return getattr(op, "namespace", None) == "_c10d_functional"


def is_local_wait(node: Node, region: set[Node]) -> bool:
    """The wait of a functional collective issued inside `region` (diffusers' context
    parallelism: Ulysses' all-to-alls around an attention core). FX counts `wait_tensor` as
    a side effect so that DCE keeps it while its collective is in flight; the collective and
    its wait are one exchange of the region's own values and go with the region on a reuse
    step. Every rank must then skip the same exchanges: all ranks run the same variant
    (fora_fx/parallel.py checks it before every run)."""
    return (node.op == "call_function" and _functional_collective(node.target)
            and getattr(getattr(node.target, "default", node.target), "_opname", None)
            == "wait_tensor"
            and all(a in region and _functional_collective(a.target)
                    for a in node.all_input_nodes))


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


# ---------------------------------------------------------------------------------------
# Writes, from schemas


def _schemas(node: Node) -> list[torch.FunctionSchema] | None:
    """The ATen schemas the node's op may dispatch to, or None when it has none (a Python
    function, an operator-module function, a method ATen does not define)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return [target._schema]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, o)._schema for o in target.overloads()]
    if node.op == "call_method":
        name = str(target)
    elif node.op == "call_function" and not _is_operator(node):
        name = getattr(target, "__name__", "")
    else:
        return None
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None
    return [getattr(packet, o)._schema for o in packet.overloads()]


def _argument(node: Node, index: int, arg: torch.Argument) -> object:
    if arg.kwarg_only:
        return node.kwargs.get(arg.name)
    return node.args[index] if index < len(node.args) else node.kwargs.get(arg.name)


def _is_operator(node: Node) -> bool:
    """`a + b`, `a & b`, `a[i]`: a function of Python's operator module."""
    return getattr(operator, getattr(node.target, "__name__", ""), None) is node.target


def _tensors(value: object) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _storages(node: Node) -> frozenset:
    """The storages of the tensors `node` produced while Dynamo traced it (empty when the
    node has no traced tensor value)."""
    value = node.meta.get("example_value", node.meta.get("val"))
    out = set()
    for t in _tensors(value):
        try:
            out.add(StorageWeakRef(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            continue
    return frozenset(out)


def writes(node: Node) -> list[Node]:
    """The tensors `node` writes in place (argument nodes).

    From Python's in-place operators and `inplace=True`, else from the ATen schemas of the
    op (every overload's `Tensor(a!)` argument the call passes, `out=` included). An op with
    no schema counts as writing every argument its traced result shares memory with, and an
    unknown method named like an in-place one (`t.foo_(...)`) as writing `t`.
    """
    if node.op not in ("call_function", "call_method"):
        return []
    first = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return [first] if first is not None else []
    if node.op == "call_method" and node.target in _FLAG_WRITES:
        return []
    schemas = _schemas(node)
    if schemas is not None:
        out: dict[Node, None] = {}
        for schema in schemas:
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = _argument(node, i, arg)
                    out.update(dict.fromkeys(
                        v for v in tree_leaves(value) if isinstance(v, Node)))
        return list(out)
    if node.op == "call_function" and _is_operator(node):
        return []  # `a & b`, `a[i]`, `a + b`: Python's operators are functional on tensors
    if node.op == "call_method" and node.target in _PYTHON_ALIASES:
        return []
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and first is not None:
        return [first]
    mine = _storages(node)
    return [a for a in node.all_input_nodes if mine & _storages(a)]


def has_effect(node: Node) -> bool:
    """Whether dropping `node` could change the program although its result is unused.

    FX's `Node.is_impure` misses in-place writes Dynamo records as tensor methods:
    NucleusMoE's router sums its scores with `sums.scatter_add_(0, idx, scores)` and never
    reads the method's result, so a plain `eliminate_dead_code` dropped the write and the
    refresh step divided by zero sums."""
    return node.is_impure() or bool(writes(node))


def eliminate_dead_code(graph: Graph, removable: Collection[str] = ()) -> None:
    """`graph.eliminate_dead_code` that keeps every node with an effect (`has_effect`),
    except those named in `removable` (a reused site's own nodes, writes included)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.name not in removable and has_effect(n))


# ---------------------------------------------------------------------------------------
# Memory: which nodes share storage, who allocated it, and whether anything writes it


def _version(node: Node) -> int:
    value = node.meta.get("example_value", node.meta.get("val"))
    best = 0
    for t in _tensors(value):
        try:
            best = max(best, t._version)
        except RuntimeError:  # inference tensors keep no version counter
            continue
    return best


class Memory:
    """Storage sharing and in-place writes among the nodes of one graph, as traced.

    `owner(n)`: the node that allocated n's memory, or None when the memory came from outside
    the graph (an input, a parameter, a constant) or cannot be told. `writes[n]`: the nodes n
    writes. A storage is `written` when some node writes it or the trace's version counter
    shows a write; `unexplained` when the counter shows more writes than were found.
    """

    def __init__(self, nodes: Iterable[Node]):
        self.nodes = list(nodes)
        self.storages = {n: _storages(n) for n in self.nodes}
        self._owner: dict[StorageWeakRef, Node] = {}
        self._users: dict[StorageWeakRef, list[Node]] = {}
        for n in self.nodes:
            for s in self.storages[n]:
                self._owner.setdefault(s, n)
                self._users.setdefault(s, []).append(n)
        self.writes = {n: w for n in self.nodes if (w := writes(n))}
        found: dict[StorageWeakRef, int] = {}
        self.written: set[StorageWeakRef] = set()
        self.blind = False  # a write into memory whose storage was never traced
        for targets in self.writes.values():
            for t in targets:
                if not self.storages.get(t):
                    self.blind = True
                for s in self.storages.get(t, ()):
                    found[s] = found.get(s, 0) + 1
                    self.written.add(s)
        self.unexplained: set[StorageWeakRef] = set()
        for s, users in self._users.items():
            version = max(_version(n) for n in users)
            if version:
                self.written.add(s)
            if version > found.get(s, 0):
                self.unexplained.add(s)

    def owner(self, node: Node) -> Node | None:
        """The graph node that allocated `node`'s memory (itself, for a fresh result)."""
        mem = self.storages.get(node)
        if not mem:
            return None
        owners = {self._owner[s] for s in mem}
        if len(owners) != 1:
            return None
        (first,) = owners
        return first if first.op in ("call_function", "call_method") else None

    def aliases(self, node: Node, among: Iterable[Node]) -> set[Node]:
        """The nodes of `among` whose values share memory with `node`'s, and `node`."""
        mem = self.storages.get(node, frozenset())
        return {node} | {n for n in among if mem & self.storages.get(n, frozenset())}

    def is_written(self, node: Node) -> bool:
        return bool(self.storages.get(node, frozenset()) & self.written)

    def stable(self, node: Node) -> bool:
        """Whether `node` computes the same value wherever it runs in the graph, and its result
        may be shared: nothing in the graph writes its memory or any tensor it reads."""
        if self.blind or node in self.writes:
            return False
        return not any(self.is_written(a) for a in (node, *node.all_input_nodes))


__all__ = [
    "Memory",
    "data_inputs",
    "eliminate_dead_code",
    "has_effect",
    "is_local_assert",
    "is_local_wait",
    "writes",
]
