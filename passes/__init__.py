"""Pure graph -> graph passes of fora_fx. They import neither diffusers nor Inductor.

    result = locate(gm)                          # find attention / MLP sites
    refresh = specialize(gm, sites, True)        # compute + fora::store into cache buffers
    reuse = specialize(gm, sites, False)         # fora::load from buffers, dead regions removed
    prune_chunked_linears(reuse)                 # adaLN Linear -> only its live (gate) chunks
    verify(gm, refresh, sites, True); verify(gm, reuse, sites, False)
    batch_blocks(reuse, paths)                   # per-block conditioning -> one vmapped copy
"""

from .batch import Batched, Stack, batch_blocks, stack_names
from .locate import locate
from .paths import normalize_path, outer_block, path_order
from .prune import prune_chunked_linears
from .sites import LocateResult, Refusal, Site
from .specialize import buffer_names, clone, elide_loads, lower_stores, specialize
from .verify import GraphInvariantError, verify

__all__ = [
    "Batched",
    "Stack",
    "batch_blocks",
    "stack_names",
    "GraphInvariantError",
    "LocateResult",
    "Refusal",
    "Site",
    "buffer_names",
    "clone",
    "elide_loads",
    "locate",
    "lower_stores",
    "normalize_path",
    "outer_block",
    "path_order",
    "prune_chunked_linears",
    "specialize",
    "verify",
]
