"""Locate pass: find FORA's cache sites in a Dynamo-captured graph, model-agnostically.

A site is the region of one module call (nodes sharing an nn_module_stack key) that is
  * an attention: the innermost module around an attention core (SDPA, or softmax fed into
    a matmul), classed "cross_attn" when its keys come from other inputs than its queries;
  * an MLP: the innermost module around Linear -> activation -> Linear operating on the token
    stream (downstream of some attention), which excludes timestep / caption embedders.
The module boundary is FORA's cache point: in DiT-style blocks the gate multiply and the
residual add sit outside the attention / MLP module (DESIGN.md section 3).

A candidate is refused (with a reason) when caching it would not be FORA: its output can be
reached from its inputs without passing the core (a residual added inside the module), the
region is not convex, it has side effects, or its shapes are symbolic.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .sites import LocateResult, Refusal, Site

_SDPA = {F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax, "softmax"}
_MATMUL = {torch.matmul, torch.bmm, torch.baddbmm, operator.matmul, "matmul", "bmm", "baddbmm"}
_LINEAR = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
_ACTIVATIONS = {
    F.gelu, F.silu, F.relu, F.mish, torch.tanh, torch.sigmoid, F.sigmoid, F.tanh,
    "gelu", "silu", "relu", "tanh", "sigmoid",
}
# Ops allowed between the two Linears of an MLP besides activations (GEGLU splits and
# multiplies; dropout and casts are identities at inference).
_MLP_GLUE = {
    F.dropout, operator.getitem, operator.mul, torch.mul, torch.chunk,
    "chunk", "to", "float", "half", "contiguous", "type_as", "mul",
}


def _target(node: Node) -> object:
    return node.target


def _matches(node: Node, table: set) -> bool:
    if node.op == "call_function":
        return node.target in table
    if node.op == "call_method":
        return node.target in table
    return False


def is_attention_core(node: Node) -> bool:
    if _matches(node, _SDPA):
        return True
    if _matches(node, _SOFTMAX):
        return any(_matches(u, _MATMUL) for u in _skip_identities(node.users))
    return False


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


def is_parameter(node: Node) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    if node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"):
        return True
    return isinstance(node.meta.get("example_value"), torch.nn.Parameter)


def _stack(node: Node) -> list[tuple[str, str]]:
    """[(key, path_text)] from outermost to innermost module."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(k, v[0] if isinstance(v, tuple) else str(v)) for k, v in stack.items()]


def normalize_path(text: str) -> str:
    """Dynamo's source text of a module -> a dotted path ("transformer_blocks.0.attn1")."""
    text = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\._modules\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\['([^']+)'\]", r".\1", text)
    text = re.sub(r"\[(\d+)\]", r".\1", text)
    text = re.sub(r"^L\.self\.?|^self\.?", "", text)
    return text.strip(".")


class _Graph:
    """Per-graph indexes the locator needs: order, module regions, stream reachability."""

    def __init__(self, gm: GraphModule, paths: Mapping[str, str] | None):
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.regions: dict[str, list[Node]] = {}
        self.path_text: dict[str, str] = {}
        for n in self.nodes:
            if n.op not in ("call_function", "call_method", "call_module"):
                continue
            for key, text in _stack(n):
                self.regions.setdefault(key, []).append(n)
                self.path_text.setdefault(key, text)
        self.paths = paths or {}

    def path(self, key: str) -> str:
        base = key.split("@")[0]
        if base in self.paths:
            path = self.paths[base]
        else:
            path = normalize_path(self.path_text.get(key, key))
        return path + (f"@{key.split('@')[1]}" if "@" in key else "")

    def innermost_key(self, node: Node) -> str | None:
        stack = _stack(node)
        return stack[-1][0] if stack else None

    def lca_key(self, a: Node, b: Node) -> str | None:
        common = None
        for (ka, _), (kb, _) in zip(_stack(a), _stack(b), strict=False):
            if ka != kb:
                break
            common = ka
        return common


def _downstream(start: Iterable[Node]) -> set[Node]:
    seen: set[Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def _region_sources(node: Node, region: set[Node]) -> set[Node]:
    """Non-parameter region inputs that `node` depends on through the region."""
    found: set[Node] = set()
    seen: set[Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in region:
                todo.append(a)
            elif not is_parameter(a):
                found.add(a)
    return found


def _attention_qk(core: Node) -> tuple[Node, Node] | None:
    if _matches(core, _SDPA):
        args = list(core.args) + [None, None]
        q = args[0] if args[0] is not None else core.kwargs.get("query")
        k = args[1] if args[1] is not None else core.kwargs.get("key")
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


def _mlp_first_linear(l2: Node) -> Node | None:
    """The Linear feeding `l2` through activation / glue ops only, or None."""
    x = l2.args[0] if l2.args else None
    if not isinstance(x, Node):
        return None
    sources: set[Node] = set()
    saw_activation = False
    todo, seen = [x], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_linear(n):
            sources.add(n)
            continue
        if _matches(n, _ACTIVATIONS):
            saw_activation = True
        elif not _matches(n, _MLP_GLUE):
            return None
        todo.extend(a for a in n.all_input_nodes if not is_parameter(a))
        if len(seen) > 16:
            return None
    if saw_activation and len(sources) == 1:
        return sources.pop()
    return None


def _check_region(g: _Graph, region: set[Node], cores: set[Node]) -> tuple[list[Node], str | None]:
    """Returns the region's outputs, or a reason why it cannot be cached."""
    outputs = sorted(
        (n for n in region if any(u not in region for u in n.users)), key=g.order.__getitem__
    )
    if not outputs:
        return outputs, "the region has no output used outside it"
    for n in region:
        if n.is_impure():
            return outputs, f"node {n.name} has side effects"
    for n in outputs:
        val = n.meta.get("example_value")
        if not isinstance(val, torch.Tensor):
            return outputs, f"output {n.name} is not a single tensor"
        if not all(isinstance(s, int) for s in val.shape):
            return outputs, (
                f"output {n.name} has a symbolic shape {tuple(val.shape)}; "
                "compile with dynamic=False"
            )
    # Bypass: an output reachable from a region input without passing a core means the
    # module adds its input back in (residual inside the module); caching it would freeze
    # the residual stream on reuse steps.
    bypass: set[Node] = set()
    for n in sorted(region, key=g.order.__getitem__):
        if n in cores:
            continue
        if any((a not in region and not is_parameter(a)) or a in bypass for a in n.all_input_nodes):
            bypass.add(n)
    leaked = [n.name for n in outputs if n in bypass]
    if leaked:
        return outputs, (
            f"output {leaked[0]} depends on the module input outside the attention/MLP core "
            "(a residual added inside the module?)"
        )
    # Convexity: nothing outside the region may sit between two region nodes.
    first = min(g.order[n] for n in region)
    last = max(g.order[n] for n in region)
    after: set[Node] = set()
    for n in g.nodes[first : last + 1]:
        if n in region:
            continue
        if any(a in region or a in after for a in n.all_input_nodes):
            after.add(n)
            if any(u in region for u in n.users):
                return outputs, f"node {n.name} outside the region both reads and feeds it"
    return outputs, None


def _site_meta(outputs: list[Node]) -> tuple[tuple, tuple, int]:
    shapes, dtypes, nbytes = [], [], 0
    for n in outputs:
        val = n.meta["example_value"]
        shapes.append(tuple(int(s) for s in val.shape))
        dtypes.append(str(val.dtype).replace("torch.", ""))
        nbytes += math.prod(val.shape) * val.element_size()
    return tuple(shapes), tuple(dtypes), nbytes


def locate(gm: GraphModule, paths: Mapping[str, str] | None = None) -> LocateResult:
    """Finds cache sites in `gm`. `paths` maps str(id(module)) -> qualified name, if known."""
    g = _Graph(gm, paths)
    result = LocateResult()
    candidates: dict[str, tuple[str, set[Node]]] = {}  # key -> (kind, cores)

    attn_cores = [n for n in g.nodes if is_attention_core(n)]
    for core in attn_cores:
        key = g.innermost_key(core)
        if key is None:
            result.refused.append(Refusal("<top level>", "attn", "attention outside any module"))
            continue
        region = set(g.regions[key])
        kind = "attn"
        qk = _attention_qk(core)
        if qk is not None:
            q_src, k_src = _region_sources(qk[0], region), _region_sources(qk[1], region)
            if q_src and k_src and not (q_src & k_src):
                kind = "cross_attn"
        prev = candidates.get(key)
        candidates[key] = (prev[0] if prev else kind, (prev[1] if prev else set()) | {core})

    stream = _downstream(attn_cores)
    for l2 in g.nodes:
        if not is_linear(l2):
            continue
        l1 = _mlp_first_linear(l2)
        if l1 is None or l1 not in stream:
            continue
        key = g.lca_key(l1, l2)
        if key is None:
            continue
        if key in candidates and candidates[key][0] != "mlp":
            result.refused.append(
                Refusal(g.path(key), "mlp", "MLP fused with attention in one module")
            )
            continue
        prev = candidates.get(key)
        candidates[key] = ("mlp", (prev[1] if prev else set()) | {l1, l2})

    accepted: list[tuple[str, str, set[Node], list[Node]]] = []
    for key, (kind, cores) in candidates.items():
        region = set(g.regions[key])
        outputs, reason = _check_region(g, region, cores)
        if reason is not None:
            result.refused.append(Refusal(g.path(key), kind, reason))
            continue
        accepted.append((key, kind, region, outputs))

    # A region inside another accepted region is cached by the outer one; keep the inner
    # (smaller) one only if the outer was refused. Overlap between accepted sites is a bug.
    accepted.sort(key=lambda c: g.order[c[3][0]])
    kept: list[tuple[str, str, set[Node], list[Node]]] = []
    for cand in accepted:
        clash = [k for k in kept if k[2] & cand[2]]
        if clash:
            result.refused.append(
                Refusal(g.path(cand[0]), cand[1], f"overlaps site {g.path(clash[0][0])}")
            )
            continue
        kept.append(cand)

    counters: dict[str, int] = {}
    for key, kind, region, outputs in kept:
        idx = counters.get(kind, 0)
        counters[kind] = idx + 1
        shapes, dtypes, nbytes = _site_meta(outputs)
        result.sites.append(
            Site(
                name=f"{kind}_{idx}",
                kind=kind,
                module_path=g.path(key),
                module_key=key,
                nodes=frozenset(n.name for n in region),
                outputs=tuple(n.name for n in outputs),
                shapes=shapes,
                dtypes=dtypes,
                nbytes=nbytes,
            )
        )
    return result
