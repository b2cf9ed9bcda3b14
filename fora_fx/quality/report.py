"""`fora-fx eval`'s outputs: the markdown table, the merged report of several runs, the
quality-vs-speedup plot and the sample grid."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch


def paired_fid_delta(report: dict[str, Any], row: dict[str, Any]) -> tuple[float, float] | None:
    """Mean and spread over seeds of (row's FID - the baseline's FID) on the same seed. The
    seeds' shared variation cancels, so this separates methods that the ± column cannot.
    None for reports written before per-seed FIDs were kept."""
    base = [r for r in report["rows"] if r["method"] == "baseline"
            and (r["sampler"], r["steps"]) == (row["sampler"], row["steps"])]
    if row["method"] == "baseline" or not base or "fid_seeds" not in row \
            or "fid_seeds" not in base[0]:
        return None
    diffs = [a - b for a, b in zip(row["fid_seeds"], base[0]["fid_seeds"], strict=True)]
    return statistics.mean(diffs), statistics.pstdev(diffs)


def markdown(report: dict[str, Any]) -> str:
    cols = ["sampler", "method", "N", "FID", "± (seeds)", "ΔFID paired", "IS", "precision",
            "recall", "class acc", "PSNR dB", "speedup", "vs eager", "skipped"]
    lines = [f"Held-out real FID (floor): {report['fid_floor_heldout']:.2f}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in report["rows"]:
        delta = paired_fid_delta(report, r)
        lines.append("| " + " | ".join([
            f"{r['sampler']}-{r['steps']}", r["method"], str(r["interval"] or ""),
            f"{r['fid']:.2f}", f"{r['fid_std']:.2f}",
            "" if delta is None else f"{delta[0]:+.2f} ± {delta[1]:.2f}",
            f"{r['is_']:.2f}",
            f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['class_acc']:.3f}",
            "" if r["psnr"] is None else f"{r['psnr']:.1f}",
            _speedup(r),
            f"{r['speedup_eager']:.2f}×",
            f"{r['skipped']:.0%}"]) + " |")
    for sampler, t in report.get("timing", {}).items():  # runs before issue 19 have none
        lines += ["", f"{sampler} timing: {t['rounds']} interleaved rounds, " + (
            "UNRELIABLE: " + "; ".join(t["reasons"]) if t["unreliable"] else
            f"controls ({', '.join(t['controls'])}) within ±{t['band']:.0%} of 1.00×")]
    return "\n".join(lines)


def _speedup(r: dict[str, Any]) -> str:
    """The median speedup and, where the run kept it, the range of its per-round speedups."""
    if r["speedup"] is None:
        return ""
    if r.get("speedup_lo") is None or r["method"] == "baseline":
        return f"{r['speedup']:.2f}×"
    return f"{r['speedup']:.2f}× ({r['speedup_lo']:.2f}–{r['speedup_hi']:.2f})"


def write_outputs(report: dict[str, Any], json_path: str | None, out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grids = report.pop("grids")
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
    render(report, out_dir)
    write_grid(grids, out / "samples.png")


def merge(paths: list[str]) -> dict[str, Any]:
    """One report from the JSON files of several runs (e.g. the optional cache-dit rows run
    later): every method row of each file, with the speedups of its own run; the baseline row
    of the first file only. Refuses runs whose sample settings differ, because then the
    baselines' samples, and so PSNR and FID, would not be comparable."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    keys = ("samples", "seeds", "samplers", "cfg", "batch", "compile")
    first = reports[0]
    for p, r in zip(paths[1:], reports[1:], strict=True):
        diff = [k for k in keys if r["setup"][k] != first["setup"][k]]
        if diff:
            raise ValueError(f"{p} was run with other settings than {paths[0]}: {diff}")
    rows = list(first["rows"]) + [row for r in reports[1:] for row in r["rows"]
                                  if row["method"] != "baseline"]
    samplers = list(dict.fromkeys((r["sampler"], r["steps"]) for r in rows))
    rows.sort(key=lambda r: samplers.index((r["sampler"], r["steps"])))  # stable: runs' order
    return {"setup": first["setup"], "fid_floor_heldout": first["fid_floor_heldout"],
            "rows": rows, "merged_from": [str(p) for p in paths],
            "timing": {k if i == 0 else f"{k} ({Path(p).name})": v  # each run's own check
                       for i, (p, r) in enumerate(zip(paths, reports, strict=True))
                       for k, v in r.get("timing", {}).items()}}


def render(report: dict[str, Any], out_dir: str) -> None:
    """quality.md and the plot from a saved (or merged) report; no sample grid."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text(markdown(report) + "\n")
    _plot(report, out / "quality_vs_speedup.png")


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, FID) points no other point beats on both (faster and lower FID), by
    speedup."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):  # fastest first
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front[::-1]


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samplers = list(dict.fromkeys(f"{r['sampler']}-{r['steps']}" for r in report["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    style = {m: (f"C{i % 10}", "osd^v<>p*hXDP"[i % 13]) for i, m in enumerate(methods)}
    # top row: FID (the distribution); bottom row: PSNR against the uncached samples of the
    # same seeds (faithfulness; FID can fall below the baseline's when samples shift)
    fig, axes = plt.subplots(2, len(samplers), figsize=(5 * len(samplers), 7), dpi=120,
                             squeeze=False, sharey="row")
    for col, sampler in enumerate(samplers):  # one column per sampler
        fid_ax, psnr_ax = axes[0][col], axes[1][col]
        for method in methods:
            rows = [r for r in report["rows"]
                    if f"{r['sampler']}-{r['steps']}" == sampler and r["method"] == method]
            if not rows:
                continue
            xs = [r["speedup"] or 1.0 for r in rows]
            color, marker = style[method]
            line = "-" if len(rows) > 1 else "none"
            # error bars: spread over seeds; every method samples the same seeds
            fid_ax.errorbar(xs, [r["fid"] for r in rows], yerr=[r["fid_std"] for r in rows],
                            color=color, marker=marker, capsize=2, label=method, linestyle=line)
            if method != "baseline":
                psnr_ax.plot(xs, [r["psnr"] for r in rows], color=color, marker=marker,
                             label=method, linestyle=line)
            for r, x in zip(rows, xs, strict=True):
                if r["interval"]:
                    for ax, y in ((fid_ax, r["fid"]), (psnr_ax, r["psnr"])):
                        ax.annotate(f"N={r['interval']}", (x, y), fontsize=7, xytext=(3, 3),
                                    textcoords="offset points")
        front = pareto([(r["speedup"] or 1.0, r["fid"]) for r in report["rows"]
                        if f"{r['sampler']}-{r['steps']}" == sampler])
        fid_ax.plot(*zip(*front, strict=True), color="black", linestyle="--", linewidth=0.8,
                    zorder=0, label="Pareto front (faster and lower FID)")
        fid_ax.axhline(report["fid_floor_heldout"], color="grey", linestyle=":",
                       label="held-out real digits")
        fid_ax.set_title(sampler, fontsize=9)
        psnr_ax.set_xlabel("wall-clock speedup over the compiled uncached model (CPU)",
                           fontsize=8)
        fid_ax.legend(fontsize=7)
        psnr_ax.legend(fontsize=7)
    axes[0][0].set_ylabel("FID (digits-classifier features), lower is better")
    axes[1][0].set_ylabel("PSNR vs uncached samples, dB (higher = closer)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_grid(grids: dict[str, torch.Tensor], path: Path, scale: int = 4, per_row: int = 10,
          rows_per_method: int = 2) -> None:
    """Same seeds and labels in every block: column c shows class c (labels cycle 0..9)."""
    from PIL import Image, ImageDraw

    if not grids:
        return
    cell, label_w = 8 * scale + 2, 80
    height = len(grids) * (rows_per_method * cell + 6)
    img = Image.new("L", (label_w + per_row * cell, height), 255)
    draw = ImageDraw.Draw(img)
    for i, (name, imgs) in enumerate(grids.items()):
        top = i * (rows_per_method * cell + 6)
        draw.text((4, top + cell // 2), name, fill=0)
        for j in range(min(len(imgs), per_row * rows_per_method)):
            px = ((imgs[j, 0] + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
            tile = Image.fromarray(px).resize((8 * scale, 8 * scale), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + (j % per_row) * cell + 1, top + (j // per_row) * cell + 1))
    img.save(path)
