"""Graph patterns the locator looks for, as plain predicates on FX nodes.

Each pattern names the models it was written from. They match the torch-level calls Dynamo
records (F.linear, F.scaled_dot_product_attention, ...), both as functions and as methods.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.fx import Node

_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, "softmax"}
_MATMUL = {torch.matmul, torch.bmm, torch.baddbmm, operator.matmul, "matmul", "bmm", "baddbmm"}
_LINEAR = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_ACTIVATIONS = {
    F.gelu, F.silu, F.relu, F.mish, torch.tanh, torch.sigmoid, F.sigmoid, F.tanh,
    "gelu", "silu", "relu", "tanh", "sigmoid",
}
# Ops allowed between the two Linears of an MLP besides activations (GEGLU splits and
# multiplies; dropout and casts are identities at inference). Ovis's parallel blocks split
# their MLP input with torch.split, which Dynamo records as torch.functional.split.
_MLP_GLUE = {
    F.dropout, operator.getitem, operator.mul, torch.mul, torch.chunk, torch.split,
    torch.functional.split, "chunk", "split", "to", "float", "half", "contiguous", "type_as",
    "mul",
}


# Between the two Linears of a parallel block (Flux single blocks) the MLP half is
# concatenated with the attention output before the shared output projection.
_CAT = {torch.cat, torch.concat, "cat"}


def _matches(node: Node, table: set) -> bool:
    if node.op == "call_function":
        return node.target in table
    if node.op == "call_method":
        return node.target in table
    return False


def is_attention_core(node: Node) -> bool:
    """SDPA (diffusers AttnProcessor2_0, timm), softmax -> matmul (diffusers AttnProcessor), or
    linear attention: (V K^T) Q, a product of two computed tensors one of which is itself
    such a product (Sana's and SanaVideo's ReLU-kernel attention)."""
    if _matches(node, _SDPA):
        return True
    if _matches(node, _SOFTMAX):
        return any(_matches(u, _MATMUL) for u in _skip_identities(node.users))
    if is_token_product(node):
        return any(is_token_product(_skip_views(a)) for a in _operands(node))
    return False


def _operands(node: Node) -> list[Node]:
    return [a for a in node.args[-2:] if isinstance(a, Node)]


def is_token_product(node: Node) -> bool:
    """A matmul of two computed tensors (no weight): how attention mixes tokens. Inside an
    attention module every such product counts as part of its core (SanaVideo normalises by
    1 / (sum(K)^T Q), computed beside the (V K^T) Q chain)."""
    if not _matches(node, _MATMUL):
        return False
    ops = _operands(node)
    return len(ops) == 2 and not any(_is_weight(a) for a in ops)


def _is_weight(node: Node) -> bool:
    """A parameter, or one expert's slice of a stacked one (NucleusMoE's routed experts
    compute `x @ self.gate_up_proj[expert_idx]`)."""
    if is_parameter(node):
        return True
    return (
        _matches(node, {operator.getitem, torch.select, "select"})
        and isinstance(node.args[0], Node)
        and is_parameter(node.args[0])
    )


def _is_weight_product(node: Node) -> bool:
    """x @ W: a projection written as a matmul with a weight (or an expert's slice of one)."""
    if not _matches(node, _MATMUL):
        return False
    ops = _operands(node)
    return len(ops) == 2 and _is_weight(ops[1]) and not _is_weight(ops[0])


_VIEWS = {"transpose", "permute", "float", "to", "contiguous", "reshape", "view", "flatten",
          "unflatten", torch.transpose, torch.permute, torch.reshape, torch.flatten}


def _skip_views(node: Node) -> Node:
    while _matches(node, _VIEWS) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _skip_identities(nodes: Iterable[Node]) -> list[Node]:
    out: list[Node] = []
    for n in nodes:
        if _matches(n, {F.dropout, "to", "float", "half"}):
            out.extend(_skip_identities(n.users))
        else:
            out.append(n)
    return out


def is_linear(node: Node) -> bool:
    return _matches(node, _LINEAR)


def linear_operands(node: Node) -> tuple[object, object, object]:
    """(input, weight, bias) of a `linear` call, positional or keyword."""
    args = list(node.args) + [None] * 3
    weight = args[1] if args[1] is not None else node.kwargs.get("weight")
    bias = args[2] if args[2] is not None else node.kwargs.get("bias")
    return args[0], weight, bias


CASTS = {"to", "float", "half", "type_as"}  # dtype casts, as methods
_IDENTITIES = {F.dropout, "contiguous", *CASTS}  # identities at inference


def is_identity(node: Node) -> bool:
    return _matches(node, _IDENTITIES) and bool(node.args) and isinstance(node.args[0], Node)


def identity_source(node: Node) -> Node:
    """`node` with dropouts and casts (identities at inference) stripped from its front."""
    while is_identity(node):
        node = node.args[0]  # type: ignore[assignment]
    return node


class Projections:
    """What counts as a projection's output, and what it projects: the graph's Linears,
    convolutions and weight products, and the outputs of LoRA-adapted Linears
    (passes/lora.py: `adapted` maps each to its base Linear and its adapters' nodes)."""

    def __init__(self, adapted: dict[Node, tuple[Node, frozenset[Node]]] | None = None):
        self.adapted = adapted or {}
        self.internal = {n for base, parts in self.adapted.values() for n in (base, *parts)}

    def is_projection(self, node: Node) -> bool:
        return node in self.adapted or (is_projection(node) and node not in self.internal)

    def is_linear(self, node: Node) -> bool:
        return node in self.adapted or (is_linear(node) and node not in self.internal)

    def input(self, node: Node) -> object:
        base = self.adapted[node][0] if node in self.adapted else node
        return base.args[0] if base.args else None

    def nodes(self, node: Node) -> set[Node]:
        """The projection's own nodes: itself, or its base Linear and adapters."""
        if node in self.adapted:
            base, parts = self.adapted[node]
            return {node, base, *parts}
        return {node}


PLAIN = Projections()


# Convolutions as an MLP's projections: Sana's GLUMBConv is 1x1 conv -> SiLU -> depthwise 3x3
# conv -> GLU -> 1x1 conv over the token grid.
_CONV = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}


def is_expert_projection(node: Node) -> bool:
    """x @ W[e]: one expert's projection in a mixture of experts."""
    return _is_weight_product(node) and not is_parameter(_operands(node)[1])


def is_projection(node: Node) -> bool:
    """A Linear, a convolution (an MLP's projection over a token grid), or a matmul with a
    weight (MoE experts)."""
    return _matches(node, _LINEAR) or _matches(node, _CONV) or _is_weight_product(node)


def is_parameter(node: Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"):
        return True
    return isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def attention_qk(core: Node) -> tuple[Node, Node] | None:
    if _matches(core, _SDPA):
        args = list(core.args) + [None, None]
        q = args[0] if args[0] is not None else core.kwargs.get("query")
        k = args[1] if args[1] is not None else core.kwargs.get("key")
    elif is_token_product(core) and not _matches(core, _SOFTMAX):  # linear: (V K^T) Q
        ops = _operands(core)
        inner = [a for a in ops if is_token_product(_skip_views(a))]
        if not inner:
            return None
        q = next((a for a in ops if a is not inner[0]), None)
        k = _operands(_skip_views(inner[0]))[-1]
    else:  # softmax(matmul(q, k^T)) or softmax(baddbmm(bias, q, k^T))
        src = core.args[0]
        while isinstance(src, Node) and not _matches(src, _MATMUL):
            ins = [a for a in src.all_input_nodes if not is_parameter(a)]
            if len(ins) != 1:
                return None
            src = ins[0]
        if not isinstance(src, Node):
            return None
        ops = [a for a in src.args if isinstance(a, Node)]
        q, k = (ops[-2], ops[-1]) if len(ops) >= 2 else (None, None)
    if isinstance(q, Node) and isinstance(k, Node):
        return q, k
    return None


def mlp_chain(
    l2: Node, proj: Projections = PLAIN
) -> tuple[list[Node], set[Node]] | None:
    """(the projections feeding `l2` through activation / glue ops only, those ops and the
    projections' own nodes), or None.

    diffusers FeedForward (proj -> GELU / GEGLU -> dropout -> Linear), timm Mlp (fc1 -> GELU
    -> fc2), Sana's GLUMBConv (convolutions: depthwise conv -> GLU -> 1x1 conv), timestep
    embedders (linear_1 -> SiLU -> linear_2; the locator drops those). A SwiGLU with separate
    gate and value Linears (AuraFlow's `out_projection(silu(linear_1(x)) * linear_2(x))`,
    FIBO 2's `w2(silu(w1(x)) * w3(x))`) has two first projections, which must read one input.
    """
    x = proj.input(l2)
    if not isinstance(x, Node):
        return None
    sources: dict[Node, None] = {}
    saw_activation = False
    todo, seen = [x], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if proj.is_projection(n):
            sources[n] = None
            continue
        if _matches(n, _ACTIVATIONS):
            saw_activation = True
        elif not _matches(n, _MLP_GLUE):
            return None
        todo.extend(a for a in n.all_input_nodes if not is_parameter(a))
        if len(seen) > 16:
            return None
    if not (saw_activation and sources):
        return None
    if len({proj.input(n) for n in sources}) != 1:
        return None  # projections of different inputs: not one MLP
    return list(sources), seen.union(*(proj.nodes(n) for n in [l2, *sources]))


def parallel_chain(
    l2: Node, attention_outputs: Iterable[Node], proj: Projections = PLAIN
) -> tuple[set[Node], Node, set[Node]] | None:
    """A parallel block's fused output projection, or None.

    Flux single blocks: proj_out(cat([attn(x), act_mlp(proj_mlp(x))])) with the gate applied
    outside. Flux 2's single blocks do it all in one attention module: one Linear computes
    QKV and the MLP input, split apart; the attention output (reached from its core through
    views) and the SwiGLU half meet in a cat before `to_out`. Returns (the nodes between the
    attention outputs / first Linear and `l2`, inclusive of both Linears; the first Linear;
    the attention outputs reached).
    """
    outs = set(attention_outputs)
    x = proj.input(l2)
    if not isinstance(x, Node):
        return None
    chain, firsts, reached = {l2}, set(), set()
    saw_cat = saw_activation = False
    todo = [x]
    while todo:
        n = todo.pop()
        if n in chain or n in reached:
            continue
        if n in outs:
            reached.add(n)
            continue
        chain.add(n)
        if proj.is_linear(n):
            firsts.add(n)
            continue
        if _matches(n, _CAT):
            saw_cat = True
        elif _matches(n, _ACTIVATIONS):
            saw_activation = True
        elif not (_matches(n, _MLP_GLUE) or _matches(n, _VIEWS)):
            return None
        todo.extend(a for a in n.all_input_nodes if not is_parameter(a))
        if len(chain) > 24:
            return None
    if saw_cat and saw_activation and len(firsts) == 1 and reached:
        return chain.union(*(proj.nodes(n) for n in [l2, *firsts])), firsts.pop(), reached
    return None
