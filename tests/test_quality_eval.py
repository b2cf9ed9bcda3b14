"""`fora-fx eval --quick` runs end to end on the committed digits DiT and writes its outputs."""

from __future__ import annotations

import json

from fora_fx import cli, peers_cachedit


def test_eval_quick_writes_table_plot_and_grid(tmp_path, capsys):
    # The CLI's run at a CI size: 30 samples in 3 batches (3 timing rounds, the fewest that
    # measure the noise), eager models. Each fora_fx row is a capture (~5 s here) and costs
    # more than sampling at this size, so of fora_fx's five methods, which differ only in
    # their ForaConfig, this runs replay (fora) and the one that forecasts on a calibrated
    # schedule (taylor2-cal); the next test builds the uniform ones with Inductor. Every peer
    # runs. Compiled sampling of this DiT is test_examples' digits job.
    out = tmp_path / "eval"
    path = tmp_path / "eval.json"
    methods = "fora,taylor2-cal,taylorseer,pab,cache-dit,cache-dit+taylorseer"
    assert cli.main(["eval", "--quick", "--samples", "30", "--batch", "10", "--no-compile",
                     "--methods", methods, "--json", str(path), "--out", str(out)]) == 0
    report = json.loads(path.read_text())
    rows = {(r["sampler"], r["method"], r["interval"]): r for r in report["rows"]}
    assert ("ddim", "baseline", None) in rows
    fora3, fora6 = rows[("ddim", "fora", 3)], rows[("ddim", "fora", 6)]
    assert {m for _, m, _ in rows} >= {"baseline", "fora", "taylor2-cal", "taylorseer", "pab"}
    # calibrated: as many full steps as the interval rule's (4 at N=3), forecast between them
    assert abs(rows[("ddim", "taylor2-cal", 3)]["skipped"] - 0.6) < 1e-9
    # 10 steps: N=3 recomputes 0, 3, 6, 9 (9 is the last); N=6 recomputes 0, 6, 9
    assert abs(fora3["skipped"] - 0.6) < 1e-9 and abs(fora6["skipped"] - 0.7) < 1e-9
    base = rows[("ddim", "baseline", None)]
    assert base["psnr"] is None and fora3["psnr"] > 10  # same seeds: close to the baseline
    assert base["class_acc"] > 0.5  # the committed model draws the digits it is asked for
    assert report["fid_floor_heldout"] < base["fid"]
    if peers_cachedit.available():  # mask 1001001001: 6 cached steps skip 4 of the 5 blocks
        assert abs(rows[("ddim", "cache-dit", 3)]["skipped"] - 6 * 4 / 50) < 1e-9
        assert rows[("ddim", "cache-dit+taylorseer", 3)]["psnr"] > 10
    for name in ("quality.md", "quality_vs_speedup.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert "| ddim-10 | fora | 3 |" in capsys.readouterr().out


def test_eval_compiles_the_baseline_and_every_fora_fx_row_with_inductor(monkeypatch):
    import torch

    from fora_fx.quality import evaluate
    from fora_fx.quality.model import load_trained

    compilers = []
    transform = evaluate.api.transform

    def spy(model, **options):
        compilers.append(options["compiler"])
        return transform(model, **options)

    monkeypatch.setattr(evaluate.api, "transform", spy)
    # the uniform-schedule methods (a calibrated one runs a calibration generation first:
    # the quick run above builds taylor2-cal)
    ours = tuple(m for m, (_, calibrated) in evaluate.OURS.items() if not calibrated)
    setup = evaluate.EvalSetup(methods=ours, intervals=(3, 6))
    assert setup.compile  # the CLI's default
    methods = evaluate._methods(load_trained(), setup, "ddim", 10, print)
    assert [m.name for m in methods] == ["baseline"] + [n for n in ours for _ in (3, 6)]
    assert isinstance(methods[0].model, torch._dynamo.eval_frame.OptimizedModule)
    assert compilers == ["inductor"] * 6
    configs = [m.model.fora_config for m in methods[1:]]
    assert [(c.interval, c.forecast, c.order if c.forecast else 0) for c in configs] == [
        (3, None, 0), (6, None, 0), (3, "taylor", 1), (6, "taylor", 1), (3, "taylor", 2),
        (6, "taylor", 2)]


def test_cache_dit_rows_are_skipped_cleanly_without_cache_dit(monkeypatch):
    import sys

    from fora_fx import peers_cachedit
    from fora_fx.quality.evaluate import EvalSetup, _methods
    from fora_fx.quality.model import load_trained

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # `import cache_dit` raises ImportError
    assert not peers_cachedit.available()
    logged: list[str] = []
    setup = EvalSetup(compile=False, methods=("cache-dit", "cache-dit+taylorseer"))
    methods = _methods(load_trained(), setup, "ddim", 10, logged.append)
    assert [m.name for m in methods] == ["baseline"]
    assert len(logged) == 2 and all("cache-dit is not installed" in s for s in logged)


def test_unknown_eval_method_is_refused_with_the_valid_ones():
    import pytest

    with pytest.raises(SystemExit, match="valid: fora,taylor1,.*,taylorseer,pab,cache-dit"):
        cli.main(["eval", "--quick", "--methods", "fora,deepcache"])


def _row(method, interval, fid, speedup, seeds=True):
    row = {"sampler": "ddim", "steps": 50, "method": method, "interval": interval, "fid": fid,
            "fid_std": 0.1, "is_": 9.9, "precision": 0.9, "recall": 0.5, "class_acc": 1.0,
            "psnr": None if method == "baseline" else 30.0, "speedup": speedup,
            "speedup_eager": 2 * speedup, "skipped": 0.0 if method == "baseline" else 0.5}
    if seeds:  # the baseline's per-seed spread is shared: paired differences cancel it
        row["fid_seeds"] = [fid - 0.5, fid + 0.1, fid + 0.4 + 0.1 * (method == "fora")]
    return row


def test_render_merges_runs_with_one_baseline_and_refuses_other_settings(tmp_path, capsys):
    setup = {"samples": 2000, "seeds": [0, 1, 2], "samplers": [["ddim", 50]], "cfg": 2.0,
             "batch": 100, "compile": True}
    first = {"setup": setup, "fid_floor_heldout": 1.8,
             "rows": [_row("baseline", None, 10.0, 1.0), _row("fora", 3, 11.0, 2.2)]}
    second = {"setup": setup, "fid_floor_heldout": 1.8,
              "rows": [_row("baseline", None, 10.0, 1.0),
                       _row("cache-dit", 3, 12.0, 0.9, seeds=False)]}  # an older report
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(first))
    b.write_text(json.dumps(second))
    out = tmp_path / "out"
    assert cli.main(["eval", "--render", str(a), str(b), "--out", str(out)]) == 0
    table = (out / "quality.md").read_text()
    assert table.count("| baseline |") == 1
    assert "| ddim-50 | fora | 3 | 11.00 | 0.10 | +1.03 ± 0.05 |" in table
    assert "| ddim-50 | cache-dit | 3 | 12.00 | 0.10 |  |" in table
    assert (out / "quality_vs_speedup.png").stat().st_size > 0
    second["setup"] = {**setup, "seeds": [0]}
    b.write_text(json.dumps(second))
    import pytest

    with pytest.raises(ValueError, match="other settings.*seeds"):
        cli.main(["eval", "--render", str(a), str(b), "--out", str(out)])
