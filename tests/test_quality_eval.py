"""`fora-fx eval --quick` runs end to end on the committed digits DiT and writes its outputs."""

from __future__ import annotations

import json

from fora_fx import cli, peers_cachedit


def test_eval_quick_writes_table_plot_and_grid(tmp_path, capsys):
    out = tmp_path / "eval"
    path = tmp_path / "eval.json"
    assert cli.main(["eval", "--quick", "--json", str(path), "--out", str(out)]) == 0
    report = json.loads(path.read_text())
    rows = {(r["sampler"], r["method"], r["interval"]): r for r in report["rows"]}
    assert ("ddim", "baseline", None) in rows
    fora3, fora6 = rows[("ddim", "fora", 3)], rows[("ddim", "fora", 6)]
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


def test_cache_dit_rows_are_skipped_cleanly_without_cache_dit(monkeypatch):
    import sys

    from fora_fx import peers_cachedit
    from fora_fx.quality.evaluate import EvalSetup, _methods
    from fora_fx.quality.model import load_trained

    monkeypatch.setitem(sys.modules, "cache_dit", None)  # `import cache_dit` raises ImportError
    assert not peers_cachedit.available()
    logged: list[str] = []
    setup = EvalSetup(compile=False, methods=("cache-dit", "cache-dit+taylorseer"))
    methods = _methods(load_trained(), setup, 10, logged.append)
    assert [m.name for m in methods] == ["baseline"]
    assert len(logged) == 2 and all("cache-dit is not installed" in s for s in logged)


def test_unknown_eval_method_is_refused_with_the_valid_ones():
    import pytest

    with pytest.raises(SystemExit, match="valid: fora,taylorseer,pab,cache-dit"):
        cli.main(["eval", "--quick", "--methods", "fora,deepcache"])
