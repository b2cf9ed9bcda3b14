"""`fora-fx bench`'s outputs: the markdown table, issue 5's target checks, the JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch

from .setup import Row, Setup
from .timing import drift


def targets(rows: list[Row], setup: Setup) -> list[str]:
    """Issue 5's targets, checked against this run's rows: "PASS ..." / "MISS ..." lines."""
    def row(method: str, n: int | None) -> Row | None:
        return next((r for r in rows if r.method == method and r.interval == n and r.loop_s),
                    None)

    comp, n3, n6 = row("compiled", None), row("fora_fx", 3), row("fora_fx", 6)
    # The first fora_fx row compiled cold; later intervals reuse its graphs from Inductor's
    # FX-graph cache (the two variants do not depend on N), so only it says what compiling
    # costs.
    first = next((r for r in rows if r.method == "fora_fx" and r.loop_s), None)
    out: list[str] = []

    def check(ok: bool, text: str) -> None:
        out.append(f"{'PASS' if ok else 'MISS'} {text}")

    for r, goal in ((n3, 2.5), (n6, 4.0)):
        if r is not None and r.speedup_vs_compiled is not None:
            check(r.speedup_vs_compiled >= goal,
                  f"N={r.interval}: {r.speedup_vs_compiled:.2f}x over compiled (target {goal}x)")
    if n3 is not None and n3.refresh_ms and n3.reuse_ms:
        ratio = n3.reuse_ms / n3.refresh_ms
        check(ratio <= 0.15, f"reuse step {n3.reuse_ms:.2f} ms = {ratio:.1%} of a refresh step "
                             f"{n3.refresh_ms:.2f} ms (target <= 15%)")
    fora = [r for r in rows if r.method.startswith("fora_fx") and r.loop_s]
    if fora:
        skips = sum(r.cudagraph_skips or 0 for r in fora)
        recompiles = sum(r.recompiles or 0 for r in fora)
        check(skips == 0 and recompiles == 0,
              f"fora_fx rows: {skips} cudagraph skips, {recompiles} recompiles after warm-up")
    if comp is not None and first is not None and comp.warmup_s and first.warmup_s:
        ratio = first.warmup_s / comp.warmup_s
        check(ratio <= 1.6, f"warm-up {first.warmup_s:.1f} s = {ratio:.2f}x the plain "
                            f"compile's (target <= 1.6x)")
    devs = [r.max_dev_vs_hook_fora for r in fora if r.max_dev_vs_hook_fora is not None]
    if comp is not None and comp.max_dev_vs_eager is not None and devs:
        dev, tol = max(devs), 2 * comp.max_dev_vs_eager
        check(dev <= tol, f"max deviation from the eager FORA {dev:.2e} (tolerance: 2x what "
                          f"compiling alone changes, {tol:.2e})")
    elif fora:
        out.append("(no eager FORA output to compare with: deviation not checked)")
    if comp is not None and n3 is not None and comp.peak_mem_mib and n3.peak_mem_mib:
        bound = (comp.peak_mem_mib + (n3.cache_mib or 0)) * 1.10
        check(n3.peak_mem_mib <= bound,
              f"peak {n3.peak_mem_mib:.0f} MiB (bound: compiled {comp.peak_mem_mib:.0f} "
              f"+ cache {n3.cache_mib or 0:.0f}, +10%)")
    if setup.device != "cuda":
        out.append("(the targets are for an H100 in bf16; this run is on CPU)")
    return out


def reliability(rows: list[Row]) -> dict[str, Any]:
    """The run's timing check: each row's own (fewer than 3 rounds, the eager row's second
    timing off 1x beyond the noise) and the eager baseline drifting from row to row."""
    reasons = [f"{r.method} N={r.interval or '-'}: {why}" for r in rows if r.timing
               for why in r.timing["reasons"]]
    groups = {f"{r.method} N={r.interval or '-'}": r.timing["times_s"][r.timing["baseline"]]
              for r in rows if r.timing}
    reasons += drift(groups)
    return {"unreliable": bool(reasons), "reasons": reasons}


def markdown(rows: list[Row], setup: Setup) -> str:
    head = (f"`fora-fx bench` — {setup.model}, {setup.batch} image(s) + {setup.batch} uncond "
            f"(B={2 * setup.batch}), {setup.steps} DDIM steps, {setup.dtype}, "
            f"torch {torch.__version__}\n\n")
    cols = ["method", "N", "loop s", "× eager", "× compiled", "unguarded s", "warm-up s",
            "cg skips",
            "graphs", "recompiles", "peak MiB", "cache MiB", "max dev", "refresh ms",
            "reuse ms", "device", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(v: Any, spec: str = ".3f") -> str:
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    for r in rows:
        lines.append("| " + " | ".join([
            r.method, f(r.interval), f(r.loop_s, ".4f"), _spread(r),
            f(r.speedup_vs_compiled, ".2f"), f(r.loop_s_unguarded, ".4f"),
            f(r.warmup_s, ".1f"), f(r.cudagraph_skips),
            f(r.graphs_compiled), f(r.recompiles), f(r.peak_mem_mib, ".0f"), f(r.cache_mib, ".1f"),
            f(r.max_dev_vs_hook_fora if r.max_dev_vs_eager is None else r.max_dev_vs_eager,
              ".2e"), f(r.refresh_ms, ".2f"), f(r.reuse_ms, ".2f"),
            r.device, _note(r)]) + " |")
    check = reliability(rows)
    verdict = ("UNRELIABLE timing: " + "; ".join(check["reasons"]) if check["unreliable"] else
               f"timing ok: each row interleaved with eager over {setup.repeats} rounds, the "
               "eager baseline steady from row to row")
    text = (head + "\n".join(lines) + "\n\n" + verdict + "\n\n"
            + "\n".join(f"- {t}" for t in targets(rows, setup)))
    for r in rows:
        for variant, p in (r.profile or {}).items():
            what = "kernels" if setup.device == "cuda" else "CPU ops"
            text += (f"\n\n{r.method} N={r.interval}, one {variant} step: {p['kernels']} "
                     f"{what}, {p['device_us'] / 1e3:.2f} ms\n\n"
                     f"| {what[:-1]} | calls | us |\n|---|---|---|\n")
            text += "\n".join(f"| `{name}` | {c} | {us} |" for name, c, us in p["top"])
    return text


def _spread(r: Row) -> str:
    """The median speedup over eager and the range of its per-round values."""
    if r.speedup_vs_eager is None:
        return ""
    if r.speedup_vs_eager_lo is None:
        return f"{r.speedup_vs_eager:.2f}"
    return f"{r.speedup_vs_eager:.2f} ({r.speedup_vs_eager_lo:.2f}–{r.speedup_vs_eager_hi:.2f})"


def _note(r: Row) -> str:
    if r.direct_share is None:
        return r.note
    return f"{r.note}; direct calls {r.direct_share:.0%}".lstrip("; ")


def write_json(rows: list[Row], setup: Setup, path: str) -> None:
    payload = {"setup": {**asdict(setup), "dtype": str(setup.dtype),
                         "torch": torch.__version__}, "timing": reliability(rows),
               "rows": [asdict(r) for r in rows]}
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
