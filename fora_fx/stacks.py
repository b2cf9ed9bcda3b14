"""Parameter stacks for batched graphs (passes/batch.py).

A batched graph reads the same parameter of G blocks as one [G, *shape] tensor. Stacking
them on every call would copy every weight it touches; keeping a stacked copy would double
the memory of those weights (in diffusers' DiT that is ~300M of its 675M parameters, as each
block has its own embedder). Instead `stack` re-homes the parameters: it copies them once
into one [G, *shape] tensor and makes each parameter's data the view `stacked[i]`. The model
computes exactly as before; a value written into a parameter in place (load_state_dict,
an optimizer step, `p.copy_()`) is seen by the stack; nothing is duplicated.

What breaks the link is giving a parameter new storage (`p.data = t`, `model.to(...)`,
`load_state_dict(assign=True)`). `valid` detects that; the runtime checks before every
refresh step (the first step of each generation is one) and re-stacks. `unstack` gives each
parameter its own storage again (fora_fx.restore does it: safetensors refuses to save
tensors that share storage).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

# parameter -> (the stack it lives in, its index there)
_HOME: WeakIdKeyDictionary = WeakIdKeyDictionary()


def valid(params: Sequence[torch.Tensor], stacked: torch.Tensor) -> bool:
    """True iff params[i] is exactly the storage of stacked[i], for every i."""
    if len(params) != stacked.shape[0]:
        return False
    base, step = stacked.data_ptr(), stacked.stride(0) * stacked.element_size()
    shape = stacked.shape[1:]
    return all(
        p.data_ptr() == base + i * step and p.shape == shape and p.dtype == stacked.dtype
        and p.device == stacked.device and p.is_contiguous()
        for i, p in enumerate(params)
    )


def stack(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The [G, *shape] tensor whose i-th slice is params[i]'s storage (made if needed)."""
    home = _HOME.get(params[0])
    if home is not None and home[1] == 0 and valid(params, home[0]):
        return home[0]
    first = params[0]
    if len({id(p) for p in params}) != len(params) or any(
        p.shape != first.shape or p.dtype != first.dtype or p.device != first.device
        for p in params
    ):
        raise ValueError("fora_fx: cannot stack parameters of different shape, dtype or device")
    with torch.no_grad():
        stacked = torch.stack([p.detach() for p in params])
    for i, p in enumerate(params):
        p.data = stacked[i]
        _HOME[p] = (stacked, i)
    return stacked


def unstack(stacked: Iterable[torch.Tensor]) -> None:
    """Gives every parameter living in one of these stacks its own storage again."""
    ids = {id(s) for s in stacked}
    for p, (home, _) in list(_HOME.items()):
        if id(home) in ids:
            del _HOME[p]
            p.data = p.data.clone()
