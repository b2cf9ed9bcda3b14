"""The fora:: custom ops that the rewrite inserts.

`fora::store(cache, value)` writes a site output into its persistent cache buffer in place;
`fora::load(cache)` reads it back. Both are real torch.library ops with fake implementations,
so Dynamo, AOTAutograd and Inductor see them as ordinary, shape-checked operators (and
`torch.library.opcheck` can check them). Before a reuse variant is compiled, loads whose
result does not escape the graph are replaced by the buffer itself (see passes/specialize.py),
so the compiled reuse step reads the cache without a copy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_same(cache: Tensor, value: Tensor) -> None:
    # Never broadcast or cast into a cache: a mismatch means the cache belongs to other inputs.
    if cache.shape != value.shape or cache.dtype != value.dtype:
        raise RuntimeError(
            f"fora::store: cache buffer is {tuple(cache.shape)} {cache.dtype} but the site "
            f"output is {tuple(value.shape)} {value.dtype}"
        )


@torch.library.custom_op("fora::store", mutates_args=("cache",))
def store(cache: Tensor, value: Tensor) -> None:
    _check_same(cache, value)
    cache.copy_(value)


@store.register_fake
def _store_fake(cache: Tensor, value: Tensor) -> None:
    _check_same(cache, value)


@torch.library.custom_op("fora::load", mutates_args=())
def load(cache: Tensor) -> Tensor:
    return cache.clone()


@load.register_fake
def _load_fake(cache: Tensor) -> Tensor:
    return torch.empty_like(cache)


STORE = torch.ops.fora.store.default
LOAD = torch.ops.fora.load.default
