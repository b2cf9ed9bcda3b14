"""`fora-fx eval --quick` runs end to end on the committed digits DiT and writes its outputs."""

from __future__ import annotations

import json

from fora_fx import cli


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
    for name in ("quality.md", "quality_vs_speedup.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert "| ddim-10 | fora | 3 |" in capsys.readouterr().out
