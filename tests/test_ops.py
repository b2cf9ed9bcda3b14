"""The fora:: custom ops: schema, fake kernels and their checks."""

from __future__ import annotations

import pytest
import torch

from fora_fx import ops


def test_opcheck_store_and_load():
    cache = torch.zeros(2, 3, 4)
    value = torch.randn(2, 3, 4)
    torch.library.opcheck(ops.store, (cache, value))
    torch.library.opcheck(ops.load, (cache,))


def test_store_writes_in_place_and_load_copies():
    cache = torch.zeros(2, 3)
    ptr = cache.data_ptr()
    value = torch.randn(2, 3)
    torch.ops.fora.store(cache, value)
    assert cache.data_ptr() == ptr and torch.equal(cache, value)
    out = torch.ops.fora.load(cache)
    assert torch.equal(out, value) and out.data_ptr() != ptr


@pytest.mark.parametrize("value", [torch.randn(2, 4), torch.randn(2, 3).double()])
def test_store_never_broadcasts_or_casts(value):
    with pytest.raises(RuntimeError, match="cache buffer is"):
        torch.ops.fora.store(torch.zeros(2, 3), value)
