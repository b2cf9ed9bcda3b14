"""The runner the model probes share (examples/video_probe.py, examples/image_probe.py),
and the loop timer of the timing scripts (examples/hook_sites_timing.py, lora_timing.py).

A probe case is a function returning ``(model, kw)``: a tiny random-weight diffusers
transformer and ``kw(timestep, seed) -> dict`` of call arguments. `run` makes every all-zero
parameter random (zero-init gates would hide sites), transforms the model with interval=3,
and compares one refresh and one reuse call with the plain model's. A case passes when the
refresh call is exact and every repeated block holds a cache site (`explain`'s uncovered
blocks would run in full on every reuse step).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

import fora_fx
from fora_fx.bench.timing import Timings, interleave

B = 2  # batch of every case


def g(seed: int = 0) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def rn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def tstep(v: float, scale: float = 1.0) -> torch.Tensor:
    return torch.full((B,), v * scale)


def text_mask(tokens: int) -> torch.Tensor:
    m = torch.ones(B, tokens)
    m[:, -1] = 0
    return m


def finish(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 0 and not bool(p.ne(0).any()):
                p.normal_(0, 0.05)
    return model.float().eval()


def first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out


Case = Callable[[], tuple]


def registry() -> tuple[dict[str, Case], Callable[[Case], Case]]:
    """A probe's case table and the decorator that fills it."""
    cases: dict[str, Case] = {}

    def case(fn: Case) -> Case:
        cases[fn.__name__] = fn
        return fn

    return cases, case


def run(cases: dict[str, Case], name: str, piecewise: bool = False,
        options: Mapping[str, Any] | None = None) -> bool:
    print(f"\n########## {name}" + ("   (piecewise=fora_fx.Piecewise())" if piecewise else "")
          + (f"   {dict(options)}" if options else ""))
    try:
        m, kw = cases[name]()
    except Exception as e:
        print("BUILD FAILED:", type(e).__name__, str(e)[:2000])
        traceback.print_exc(limit=3)
        return False
    m = finish(m)
    nparams = sum(p.numel() for p in m.parameters())
    print(f"params: {nparams}")
    kw0, kw1 = kw(999.0, 1), kw(900.0, 1)
    try:
        with torch.no_grad():
            ref0 = first(m(**kw0))
            ref1 = first(m(**kw1))
    except Exception as e:
        print("PLAIN MODEL FAILED:", type(e).__name__, str(e)[:2000])
        traceback.print_exc(limit=6)
        return False
    fast = fora_fx.transform(m, interval=3, compiler="eager", piecewise=fora_fx.Piecewise(
        **(options or {})) if piecewise else None)
    try:
        with torch.no_grad():
            out0 = first(fast(**kw0))
            out1 = first(fast(**kw1))
    except Exception as e:
        print("FORA FAILED:", type(e).__name__, str(e)[:4000])
        traceback.print_exc(limit=8)
        return False
    d0 = (out0 - ref0).abs().max().item()
    d1 = (out1 - ref1).abs().max().item()
    print(f"step0 max|fast-ref| = {d0:.3e}   (exact: {torch.equal(out0, ref0)})")
    if ref1.shape == ref0.shape:
        moved = (ref1 - ref0).abs().max().item()
        print(f"step1 max|fast-ref(t1)| = {d1:.3e}  (|ref1-ref0| = {moved:.3e})")
    else:  # the second call has other shapes (a prefix KV cache filled by the first): it
        # runs another graph, which recomputes
        print(f"step1 max|fast-ref(t1)| = {d1:.3e}  (output shape {tuple(ref0.shape)} -> "
              f"{tuple(ref1.shape)})")
    explanation = fora_fx.explain(fast)
    print(explanation)
    fora_fx.restore(fast)
    return torch.equal(out0, ref0) and not explanation.uncovered


def main(
    cases: dict[str, Case], expected_failures: set[str], piecewise: Collection[str] = (),
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Runs the cases named on the command line (default: all). `piecewise`: models Dynamo
    cannot capture in one graph; they run with piecewise=fora_fx.Piecewise() and must pass like
    the rest.
    `options`: more ForaConfig fields for some cases."""
    names = sys.argv[1:] or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; valid: {sorted(cases)}")
    results = {}
    for n in names:
        results[n] = run(cases, n, n in piecewise, (options or {}).get(n))
        if n in piecewise:  # Dynamo now skips frames it could not resume in; later cases
            torch._dynamo.reset()  # need them compiled whole (fora_fx.ForaModule says so)
    bad = [n for n, ok in results.items() if not ok and n not in expected_failures]
    # An expected failure that passes is news too: the table in the docs is out of date.
    fixed = [n for n, ok in results.items() if ok and n in expected_failures]
    if fixed:
        print(f"\nPASSED, BUT LISTED IN EXPECTED_FAILURES: {fixed}")
    print("\nOK" if not (bad or fixed) else f"\nFAILED: {bad + fixed}")
    sys.exit(1 if bad or fixed else 0)


def time_variants(variants: Mapping[str, Callable[..., Any]], steps: list[dict],
                  rounds: int = 5) -> tuple[dict[str, float], Timings]:
    """(each variant's first loop in seconds, which compiles; the interleaved timing of the
    next `rounds` loops): one loop calls `fn(**s)` for every step, and a transformed model is
    reset after each, so each loop is one generation. The rounds come from the project's one
    timing helper (fora_fx.bench.timing.interleave): the first variant is the baseline, timed
    twice per round as the control that flags a run too noisy to trust."""
    def loop(fn: Callable[..., Any]) -> Callable[[int], None]:
        def run(r: int) -> None:
            with torch.no_grad():
                for s in steps:
                    fn(**s)
            if isinstance(fn, fora_fx.ForaModule):
                fora_fx.reset(fn)
        return run

    first: dict[str, float] = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        loop(fn)(-1)
        first[name] = time.perf_counter() - start
    timing = interleave({n: loop(f) for n, f in variants.items()}, rounds, next(iter(variants)),
                        repeat_baseline=True)
    return first, timing
