"""`fora-fx bench --quick` runs on CPU and writes sane rows (no timing is asserted)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fora_fx import cli


@pytest.fixture(autouse=True)
def _warm_compile_caches(monkeypatch):
    # The bench compiles every family of rows cold (fora_fx.bench.timing.CompileCaches), so
    # that warm-up times compare compiles; these tests assert on rows, not on warm-up times.
    # A root kept next to Inductor's own cache: each family finds what it built in an earlier
    # run of this file (C++ compiles were ~90% of a cold run: 193 s vs 27 s for lumina2).
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("FORA_BENCH_CACHE_DIR", os.path.join(cache_dir(), "fora_bench"))


def test_bench_quick_writes_json_and_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    payload = json.loads(path.read_text())
    rows = {(r["method"], r["interval"]): r for r in payload["rows"]}
    assert payload["setup"]["model"] == "tiny" and payload["setup"]["steps"] == 6
    for key in [("eager", None), ("compiled", None), ("fora_fx", 2), ("fora_fx", 3),
                ("hook-fora (official)", 3), ("diffusers taylorseer", 3), ("diffusers pab", 3)]:
        assert key in rows and rows[key]["loop_s"] > 0, key
        assert rows[key]["device"].startswith("CPU")
    for n in (2, 3):  # fora_fx samples what the official-style hook FORA samples
        row = rows[("fora_fx", n)]
        assert row["max_dev_vs_hook_fora"] < 1e-3
        assert row["graphs_compiled"] == 1 and row["cudagraph_skips"] == 0
        assert row["recompiles"] == 0 and row["loop_s_unguarded"] > 0
        assert row["cache_mib"] > 0
        assert row["refresh_ms"] > 0 and row["reuse_ms"] > 0
        assert row["direct_share"] > 0.8  # all calls but each generation's first (5 of 6)
    cd = rows[("cache-dit", 3)]
    assert cd["note"].startswith("skipped") or cd["loop_s"] > 0
    ablation = rows[("fora_fx -batch -limit", 3)]  # same samples without the two passes
    assert ablation["max_dev_vs_hook_fora"] < 1e-3 and ablation["recompiles"] == 0
    assert rows[("compiled", None)]["max_dev_vs_eager"] < 1e-3
    assert "| fora_fx | 3 |" in table
    assert "N=3:" in table and "over compiled (target 2.5x)" in table  # the targets' check


def test_bench_rejects_bad_intervals(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--intervals", "0,3"])
    assert "--intervals must be positive integers" in capsys.readouterr().err


def test_bench_pixart_path_with_profile(tmp_path, capsys):
    """The PixArt branch of the harness (captions, no cache-dit adapter) and --profile."""
    path = tmp_path / "pixart.json"
    assert cli.main(["bench", "--model", "tiny-pixart", "--device", "cpu", "--steps", "4",
                     "--repeats", "1", "--intervals", "3", "--no-ablation", "--no-forecast",
                     "--no-compiled-peers", "--profile", "--json", str(path)]) == 0
    rows = {(r["method"], r["interval"]): r for r in json.loads(path.read_text())["rows"]}
    fora = rows[("fora_fx", 3)]
    assert fora["max_dev_vs_hook_fora"] < 1e-3 and fora["recompiles"] == 0
    assert fora["direct_share"] >= 0.75  # 3 of 4 calls (captions and a dict of Nones)
    assert fora["profile"]["reuse"]["kernels"] < fora["profile"]["refresh"]["kernels"]
    assert rows[("cache-dit", 3)]["note"].startswith("skipped")
    assert "one reuse step:" in capsys.readouterr().out


def test_bench_without_peers_has_only_the_compiled_rows(tmp_path):
    # The GPU check's B=16 run: a time budget fits eager, compiled and fora_fx only. On the
    # video path of the harness (Wan: 5-D latents, text tokens, no class labels).
    path = tmp_path / "bare.json"
    assert cli.main(["bench", "--model", "tiny-wan", "--device", "cpu", "--steps", "4",
                     "--repeats", "1", "--intervals", "3", "--no-ablation", "--no-peers",
                     "--no-forecast", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [(r["method"], r["interval"]) for r in rows] == [
        ("eager", None), ("compiled", None), ("fora_fx", 3)]
    fora = rows[2]
    # no hook FORA row, but its output is still computed (untimed) to check against
    assert fora["loop_s"] > 0 and 0 <= fora["max_dev_vs_hook_fora"] < 1e-3
    assert fora["cache_mib"] > 0 and fora["recompiles"] == 0
    # every attention, cross-attention and FFN of both blocks is cached: 6 x [2, 48, 32] f32
    assert fora["cache_mib"] * 2**20 == 6 * 2 * 48 * 32 * 4


def test_video_inputs_and_sampler():
    from fora_fx.bench.setup import Setup, build, sample

    model, inputs = build(Setup(model="tiny-wan", device="cpu", batch=2))
    assert inputs["noise"].shape == (2, 4, 3, 8, 8)
    assert inputs["encoder_hidden_states"].shape == (4, 6, 24)  # CFG: cond + uncond rows
    seen = []
    with torch.no_grad():
        out = sample(model, inputs, steps=3, on_step=seen.append)
    assert out.shape == inputs["noise"].shape and len(seen) == 3
    assert not torch.allclose(out.float(), inputs["noise"].float())


def test_compile_caches_are_cold_per_family_and_warm_within_one(monkeypatch):
    # Warm-up times compare compiles only if no row finds another family's work in
    # Inductor's caches; later rows of one family may reuse their own (the same graphs).
    import torch
    from torch._dynamo.utils import counters

    from fora_fx.bench.timing import CompileCaches

    def f(a):
        return torch.sin(a) * 3 + a.cos()

    monkeypatch.delenv("FORA_BENCH_CACHE_DIR")
    caches = CompileCaches()
    hits = []

    def compile_in(family):
        torch._dynamo.reset()
        counters.clear()
        with caches.use(family):
            torch.compile(f, dynamic=False)(torch.ones(8))
        hits.append(counters["inductor"]["fxgraph_cache_hit"])

    for family in ("plain", "plain", "fora"):
        compile_in(family)
    # A root that outlives the run (FORA_BENCH_CACHE_DIR): a later run finds its families'.
    monkeypatch.setenv("FORA_BENCH_CACHE_DIR", caches.root)
    caches = CompileCaches()
    compile_in("fora")
    torch._dynamo.reset()
    assert hits == [0, 1, 0, 1]


def test_targets_say_when_the_deviation_is_not_checked():
    from fora_fx.bench.report import targets
    from fora_fx.bench.setup import Row, Setup

    setup = Setup(model="tiny", device="cpu")
    compiled = Row("compiled", None, loop_s=1.0, max_dev_vs_eager=1e-5)
    fora = Row("fora_fx", 3, loop_s=0.5)
    lines = targets([compiled, fora], setup)
    assert "(no eager FORA output to compare with: deviation not checked)" in lines
    assert not any("deviation from the eager FORA" in line for line in lines)
    fora.max_dev_vs_hook_fora = 1e-3  # 50x what compiling alone changes
    assert any(line.startswith("MISS max deviation") for line in targets([compiled, fora], setup))


def test_bench_piecewise_model(tmp_path):
    """A model whose own code breaks Dynamo's graph (Lumina 2: `.tolist()` on the caption
    mask): the compiled row keeps the breaks, fora_fx runs piecewise and still samples what
    the hook FORA samples."""
    path = tmp_path / "lumina2.json"
    assert cli.main(["bench", "--model", "tiny-lumina2", "--device", "cpu", "--steps", "4",
                     "--repeats", "1", "--intervals", "3", "--no-ablation", "--no-peers",
                     "--no-forecast", "--json", str(path)]) == 0  # (forecast rows: the quick run)
    rows = {(r["method"], r["interval"]): r for r in json.loads(path.read_text())["rows"]}
    compiled, fora = rows[("compiled", None)], rows[("fora_fx", 3)]
    assert "with graph breaks" in compiled["note"] and compiled["graphs_compiled"] > 1
    assert fora["graphs_compiled"] == compiled["graphs_compiled"]  # the same pieces
    assert 0 <= fora["max_dev_vs_hook_fora"] < 1e-3 and fora["recompiles"] == 0
    assert fora["cache_mib"] > 0 and fora["direct_share"] == 0  # no direct calls piecewise
    assert fora["refresh_ms"] > 0 and fora["reuse_ms"] > 0
