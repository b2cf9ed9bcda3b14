"""fora_fx: FORA (Fast-FORward CAching, arXiv 2407.01425) as a torch.compile graph pass.

    fast = fora_fx.transform(model, interval=3)
    torch.compile(model, backend="fora", options={"interval": 3})

Stages, one module each: config -> (Dynamo capture) -> backend (passes.locate, the
passes.rewrite pipeline, compile) -> runtime. README's architecture table maps the tree.
"""

import importlib.util as _util
import os as _os
import sys as _sys

if _util.find_spec(__name__ + ".passes") is None:
    # A plain checkout: passes/ sits beside fora_fx/ (an install maps it to fora_fx.passes).
    _root = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "passes")
    _spec = _util.spec_from_file_location(__name__ + ".passes", _os.path.join(
        _root, "__init__.py"), submodule_search_locations=[_root])
    if _spec is not None and _spec.loader is not None:
        _sys.modules[_spec.name] = passes = _util.module_from_spec(_spec)
        _spec.loader.exec_module(passes)

from . import ops, tuning  # noqa: E402 - ops registers the fora:: ops before any pass runs
from .api import ForaModule, reset, restore, stats, transform  # noqa: E402
from .backend import ForaBackend, backend, fora_backend, register  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .capture import capture  # noqa: E402
from .config import ForaConfig, Piecewise  # noqa: E402
from .explain import Explanation, explain  # noqa: E402
from .runtime import NoSitesError, Stats  # noqa: E402
from .schedule import Schedule  # noqa: E402

register()

__all__ = [
    "Explanation",
    "ForaBackend",
    "ForaConfig",
    "ForaModule",
    "NoSitesError",
    "Piecewise",
    "Schedule",
    "Stats",
    "backend",
    "calibrate",
    "capture",
    "explain",
    "fora_backend",
    "ops",
    "reset",
    "restore",
    "stats",
    "transform",
    "tuning",
]
__version__ = "0.1.0"
