"""Pure graph -> graph passes of fora_fx. They import neither diffusers nor Inductor.

    result = locate(gm)                          # find attention / MLP sites
    refresh = rewrite(gm, sites, refresh=True)   # compute + fora::store into cache buffers
    reuse = rewrite(gm, sites, refresh=False)    # fora::load from buffers, dead regions removed

`rewrite` (passes/pipeline.py) runs the passes in order (specialize, forecast, prune, batch,
lowering) with `verify` after every one.
"""

from .batch import Batched, Stack, batch_blocks, stack_names
from .forecast import CLOCK, forecast, forecast_buffers
from .locate import locate
from .paths import normalize_path, outer_block, path_order
from .pipeline import Variant, rewrite
from .prune import prune_chunked_linears
from .sites import LocateResult, Refusal, Site
from .specialize import buffer_names, clone, elide_loads, lower_stores, specialize
from .verify import GraphInvariantError, verify

__all__ = [
    "Batched",
    "Stack",
    "batch_blocks",
    "stack_names",
    "CLOCK",
    "forecast",
    "forecast_buffers",
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
    "rewrite",
    "specialize",
    "verify",
    "Variant",
]
