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
    with torch.no_grad():
        compiled(*args, **kwargs)
    return graphs[0]
