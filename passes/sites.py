"""What the locator finds: typed cache sites and the reasons candidates were refused."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Site:
    """One attention / MLP region of the captured graph whose outputs are cached.

    Nodes are named, not held, so a Site stays valid for every clone of the graph.
    """

    name: str  # stable, graph-order name: "attn_0", "cross_attn_3", "mlp_11"
    kind: str  # "attn" | "cross_attn" | "mlp"
    module_path: str  # e.g. "transformer_blocks.3.attn1"
    module_key: str  # the nn_module_stack key of the call that forms the region
    nodes: frozenset[str]  # every node computed inside the region
    outputs: tuple[str, ...]  # region nodes used outside it; one cache buffer each
    shapes: tuple[tuple[int, ...], ...] = ()
    dtypes: tuple[str, ...] = ()
    nbytes: int = 0


@dataclass(frozen=True)
class Refusal:
    """A candidate region that is not cached, and why (shown by fora_fx.explain)."""

    module_path: str
    kind: str
    reason: str


@dataclass
class LocateResult:
    sites: list[Site] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # repeated blocks with no candidate
    # modules of repeated blocks computing on the token stream outside every candidate
    uncached: list[str] = field(default_factory=list)

    @property
    def cache_bytes(self) -> int:
        return sum(s.nbytes for s in self.sites)
