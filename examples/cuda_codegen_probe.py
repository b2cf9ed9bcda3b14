"""Probe: which CUDA kernels Inductor would generate for fora_fx's graphs, on a machine with no GPU.

Sessions without a lent GPU can still ask Inductor what it would launch on one. The probe
captures a bench model's plain graph and fora_fx's refresh / reuse variants on the CPU (Dynamo,
the passes), then hands each to Inductor's `compile_fx` with fake CUDA tensors as inputs while
the device queries Inductor and Triton make are answered with an H100's properties. Inductor
lowers, fuses and writes the wrapper code that launches every kernel; loading that module needs
a driver and fails, which is where the probe stops. It counts the launches of the wrapper's
`call()`: Triton kernels and extern kernels (cuBLAS GEMMs, the convolution), and lists each
Triton kernel with its number of pointer arguments.

What it can and cannot say:
  * The reuse graph has no attention, so its kernel list is what a GPU compile gives, up to two
    knobs turned off here because they run real kernels while compiling: matmul padding
    (`shape_padding`) and constant folding of the joint graph.
  * Attention is not: fake tensors make SDPA pick its math path (two bmm and a softmax per
    block) where an H100 runs one flash kernel, so plain / refresh counts overstate.
  * No time, no bytes measured. `fora-fx bench` on a GPU says those.

It monkeypatches torch internals (device properties, Triton's driver, two pattern inits), so it
is a developer's probe, not library code. Seen working with torch 2.11.0+cu130 and Triton 3.6
installed on a CPU-only machine (pip install torch==2.11.0: PyPI's CUDA build).

    python examples/cuda_codegen_probe.py [--model dit-xl-2] [--batch 8] [--limit 16|none]
        [--no-batch] [--variants plain,refresh,reuse] [--dump DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import fora_fx
from fora_fx.bench.setup import MODELS, Setup, build

H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3 (probe)", major=9, minor=0, multi_processor_count=132,
    total_memory=80 * 2**30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
    warp_size=32, gcnArchName="", L2_cache_size=50 * 2**20, max_threads_per_block=1024,
    shared_memory_per_block=49152, shared_memory_per_block_optin=232448,
    shared_memory_per_multiprocessor=233472)
CUDA = torch.device("cuda", 0)


class _Captured(Exception):
    """Stops the model call once the graphs are in hand (running DiT-XL on a CPU is slow)."""


def capture_graphs(setup: Setup, limit: int | None,
                   batch_blocks: bool = True) -> dict[str, tuple[Any, list, dict]]:
    """{"plain" | "refresh" | "reuse": (GraphModule, example inputs, Inductor config patches)},
    each exactly as it would reach Inductor."""
    model, inputs = build(setup)
    model = model.to(torch.bfloat16)  # what the GPU bench runs
    inputs = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
              else v for k, v in inputs.items()}
    x = torch.cat([inputs["noise"]] * 2)
    kwargs = {k: v for k, v in inputs.items() if k != "noise"}
    t = torch.full((x.shape[0],), 500)
    graphs: dict[str, tuple[Any, list, dict]] = {}

    def plain(gm: Any, example_inputs: list) -> Any:
        graphs["plain"] = (gm, list(example_inputs), {})
        raise _Captured

    # fora_fx.backend the module (the package exports a function of that name)
    backend = importlib.import_module("fora_fx.backend")
    compile_variant = backend.compile_variant

    def record(gm: Any, example_inputs: Any, config: Any, patches: Any = None) -> Any:
        graphs["reuse" if "refresh" in graphs else "refresh"] = (
            gm, list(example_inputs), dict(patches or {}))
        if "reuse" in graphs:
            raise _Captured
        return gm

    with fora_fx.tuning.patch(reuse_fusion_limit=limit, batch_blocks=batch_blocks):
        fast = fora_fx.transform(model, interval=3)
    for fn in (torch.compile(model, backend=plain, fullgraph=True, dynamic=False), fast):
        backend.compile_variant = record
        try:
            with torch.no_grad():
                fn(x, timestep=t, **kwargs)
        except Exception as e:  # Dynamo wraps the backend's exception
            if "_Captured" not in repr(e) and not isinstance(e, _Captured):
                raise
        finally:
            backend.compile_variant = compile_variant
        torch._dynamo.reset()
    return graphs


@contextlib.contextmanager
def fake_cuda_device(props: Any = H100) -> Iterator[None]:
    """Answers the device queries of Inductor's lowering and Triton's codegen with `props`."""
    import torch._inductor.fx_passes.fuse_attention as fuse_attention
    import torch._inductor.scheduler as scheduler
    import torch._subclasses.fake_tensor as fake_tensor
    from torch._dynamo.device_interface import CudaInterface
    from triton.backends.compiler import GPUTarget

    driver = sys.modules["triton.runtime.driver"].driver

    class Driver:  # Triton's active driver: the target the kernels are written for
        def get_current_target(self) -> Any:
            return GPUTarget("cuda", props.major * 10 + props.minor, props.warp_size)

        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: Any = None) -> int:
            return 0

        def get_active_torch_device(self) -> torch.device:
            return CUDA

        def is_active(self) -> bool:
            return True

    patches: list[tuple[Any, str, Any]] = [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "set_device", lambda d: None),
        (torch.cuda, "get_device_properties", lambda d=None: props),
        (torch.cuda, "get_device_capability", lambda d=None: (props.major, props.minor)),
        (torch.cuda, "get_device_name", lambda d=None: props.name),
        (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
        (torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()),
        (torch.cuda, "_lazy_init", lambda: None),
        (torch.cuda, "get_rng_state", lambda *a, **k: torch.zeros(16, dtype=torch.uint8)),
        (torch.cuda, "set_rng_state", lambda *a, **k: None),
        # a fake CUDA tensor would otherwise allocate a real one to initialise the context
        (fake_tensor, "init_gpu_context", lambda *a, **k: None),
        # SDPA pattern init builds real CUDA constants; the models here call SDPA directly
        (fuse_attention, "_sfdp_init", lambda *a, **k: None),
        (scheduler, "has_triton", lambda: True),
    ]
    for name, value in [
        ("get_device_properties", lambda d=None: props), ("current_device", lambda: 0),
        ("set_device", lambda d: None), ("device_count", lambda: 1),
        ("is_available", lambda: True), ("is_bf16_supported", lambda *a, **k: True),
        ("get_compute_capability", lambda d=None: props.major * 10 + props.minor),
        ("exchange_device", lambda d: 0), ("maybe_exchange_device", lambda d: 0),
        ("raise_if_triton_unavailable", lambda d=None: None),
        ("is_triton_capable", lambda d=None: True),
    ]:
        patches.append((CudaInterface, name, staticmethod(value)))
    patches.append((CudaInterface, "device", lambda *a, **k: contextlib.nullcontext()))
    for name, value in [("get_device_properties", lambda d=None: props),
                        ("current_device", lambda: 0), ("set_device", lambda d: None)]:
        patches.append((CudaInterface.Worker, name, staticmethod(value)))
    saved = [(obj, name, obj.__dict__.get(name, getattr(obj, name))) for obj, name, _ in patches]
    previous_driver = driver._active  # not .active: with no GPU that raises
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        driver.set_active(Driver())
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        driver._active = previous_driver


def _on_cuda(value: Any) -> Any:
    if isinstance(value, torch.device) and value.type == "cpu":
        return CUDA
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cuda(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cuda(v) for k, v in value.items()}
    return value


def codegen(gm: Any, example_inputs: list, patches: dict) -> str:
    """Inductor's wrapper code for `gm` on the fake device ("" if it failed before codegen)."""
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.utils import fresh_cache
    from torch._subclasses.fake_tensor import FakeTensorMode

    for node in gm.graph.nodes:  # captured on the CPU: device constants (arange, ...) say so
        node.args = _on_cuda(node.args)
        node.kwargs = {k: CUDA if k == "device" and v == "cpu" else _on_cuda(v)
                       for k, v in node.kwargs.items()}
    gm.recompile()
    with FakeTensorMode():
        inputs = [torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype,
                                      device=CUDA) if isinstance(v, torch.Tensor) else v
                  for v in example_inputs]
    # Inductor writes the wrapper module into its cache before loading it (which is where
    # the missing driver stops the compile): read it from a cache directory of our own.
    with tempfile.TemporaryDirectory() as where, fresh_cache(dir=where):
        try:
            compile_fx(gm, inputs, config_patches={
                **patches, "compile_threads": 1,
                "shape_padding": False, "joint_graph_constant_folding": False})
            error = None
        except Exception as e:  # expected: loading the module needs a driver
            error = e
        wrappers = [p.read_text() for p in Path(where).rglob("*.py")]
    wrappers = [w for w in wrappers if "def call(" in w]
    if not wrappers and error is not None:
        print(f"  codegen failed: {type(error).__name__}: {str(error)[:300]}", file=sys.stderr)
    return max(wrappers, key=len) if wrappers else ""


def launches(code: str) -> dict[str, Any]:
    """Kernel launches in the wrapper's call(): Triton kernels (name, pointer arguments) and
    extern kernels by name."""
    start = code.find("def call(")
    body = code[start:code.find("\ndef get_args", start)]
    names = re.findall(r"(triton_\w+)\.run\(", body)
    pointers = {m.group(1): m.group(2).count("ptr")
                for m in re.finditer(r"def (triton_\w+)\(([^)]*)\)", code)}
    return {"triton": [(n, pointers.get(n, 0)) for n in names],
            "extern": Counter(re.findall(r"extern_kernels\.(\w+)\(", body))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="dit-xl-2", choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=8, help="images; the model sees 2x (CFG)")
    ap.add_argument("--limit", default="16", help="reuse_fusion_limit, or 'none'")
    ap.add_argument("--variants", default="plain,refresh,reuse")
    ap.add_argument("--no-batch", action="store_true", help="without the batch pass")
    ap.add_argument("--dump", type=Path, help="write each wrapper's code here")
    args = ap.parse_args(argv)
    limit = None if args.limit == "none" else int(args.limit)
    setup = Setup(model=args.model, batch=args.batch, device="cpu")
    graphs = capture_graphs(setup, limit, batch_blocks=not args.no_batch)
    print(f"{args.model}, B={2 * args.batch}, bf16, reuse_fusion_limit={limit}, "
          f"batch_blocks={not args.no_batch}, "
          f"torch {torch.__version__}, fake {H100.name}")
    print("| graph | Triton kernels | extern kernels | launches |\n|---|---|---|---|")
    details = []
    for variant in args.variants.split(","):
        gm, example_inputs, patches = graphs[variant]
        with fake_cuda_device():
            code = codegen(gm, example_inputs, patches)
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            (args.dump / f"{variant}.py").write_text(code)
        found = launches(code)
        extern = ", ".join(f"{k} {v}" for k, v in sorted(found["extern"].items()))
        total = len(found["triton"]) + sum(found["extern"].values())
        print(f"| {variant} | {len(found['triton'])} | {extern} | {total} |")
        details.append((variant, found["triton"]))
    for variant, kernels in details:
        if len(kernels) <= 40:
            print(f"\n{variant}: Triton kernels (pointer arguments)")
            for name, ptrs in kernels:
                print(f"  {ptrs:3d}  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
