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
    # Each capture is a new backend, so it adds an entry to the Dynamo cache of the forward's
    # code object (and of diffusers' `wrapper`, which every diffusers model's forward shares),
    # and Dynamo refuses a code object's ninth: a process that inspects several models would
    # fail there. The entry is never hit again; the limit is raised for this call only.
    limit = max(torch._dynamo.config.recompile_limit, CAPTURE_RECOMPILE_LIMIT)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=limit):
        compiled(*args, **kwargs)
    return graphs[0]


CAPTURE_RECOMPILE_LIMIT = 1024
