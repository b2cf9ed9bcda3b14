"""`fora-fx bench`: FORA against eager, torch.compile and the peers, one run, one device.

    fora-fx bench [--model dit-xl-2|pixart-512|tiny] [--batch 2] [--steps 50] [--json PATH]
    fora-fx bench --quick          # tiny config on CPU: keeps the harness from rotting in CI

Each method samples the same 50-step DDIM loop with classifier-free guidance batched
(batch images + batch uncond) on its own copy of one random-weight model. A row: loop time
(median of --repeats loops, device-synchronized, after one warm-up loop), timed interleaved
with the eager model's loops round by round (timing.paired); speedup over eager (the median
of per-round ratios, with their range) and over compiled (the ratio of the two rows' medians);
compile warm-up (the first loop), cudagraph skips, Dynamo graphs compiled,
peak memory, cache bytes, max deviation from the official-style eager FORA at the same
interval, and the device's name.
"""

from __future__ import annotations

from .report import markdown, targets, write_json
from .run import run
from .setup import MODELS, Row, Setup, build, device_name, sample
from .timing import Timings, interleave, kernel_profile, measure, step_times

__all__ = [
    "MODELS",
    "Row",
    "Setup",
    "Timings",
    "build",
    "device_name",
    "interleave",
    "kernel_profile",
    "markdown",
    "measure",
    "run",
    "sample",
    "step_times",
    "targets",
    "write_json",
]
