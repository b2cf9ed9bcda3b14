"""fora_fx: FORA (Fast-FORward CAching, arXiv 2407.01425) as a torch.compile graph pass.

    fast = fora_fx.transform(model, interval=3)
    torch.compile(model, backend="fora", options={"interval": 3})

Stages, one module each: config -> (Dynamo capture) -> passes.locate -> passes.specialize ->
passes.verify -> compile -> runtime. backend.build_pair strings them together.
"""

from . import ops  # registers the fora:: custom ops before any pass builds a graph
from .api import ForaModule, reset, restore, transform
from .backend import ForaBackend, NoSitesError, backend, fora_backend, register
from .capture import capture
from .config import ForaConfig
from .explain import Explanation, explain

register()

__all__ = [
    "Explanation",
    "ForaBackend",
    "ForaConfig",
    "ForaModule",
    "NoSitesError",
    "backend",
    "capture",
    "explain",
    "fora_backend",
    "ops",
    "reset",
    "restore",
    "transform",
]
__version__ = "0.1.0"
