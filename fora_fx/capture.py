"""Capture stage: Dynamo turns a model's forward into one FX graph.

`transform` and the "fora" backend get the graph from Dynamo directly (torch.compile hands it
to the backend). `capture` is the same step on its own, for inspecting what the passes see.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule


def module_paths(model: torch.nn.Module) -> dict[str, str]:
    """str(id(module)) -> qualified name: how nn_module_stack keys map back to modules.

    (The source text in nn_module_stack differs between diffusers and plain modules; ids
    do not.)
    """
    return {str(id(m)): name for name, m in model.named_modules()}


def capture(model: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[GraphModule, list[Any]]:
    """Returns Dynamo's graph of `model(*args, **kwargs)` and its example inputs."""
    graphs: list[tuple[GraphModule, list[Any]]] = []

    def record(gm: GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
    # Each capture is a new backend, so it adds an entry that is never hit again: a process
    # that inspects many models needs more than the usual headroom.
    with torch.no_grad(), recompile_headroom(1024):
        compiled(*args, **kwargs)
    return graphs[0]


def recompile_headroom(limit: int = 64) -> Any:
    """Dynamo's recompile limit raised to at least `limit`, for one call (a config patch).

    Dynamo keeps one cache per code object: every model of a class (every input shape, every
    backend; diffusers' peft `wrapper` for every diffusers model class) compiled in a process
    counts toward recompile_limit (8), though one model needs an entry per input shape. At
    the limit a fullgraph compile raises and any other runs the frame uncompiled."""
    return torch._dynamo.config.patch(
        recompile_limit=max(torch._dynamo.config.recompile_limit, limit))
