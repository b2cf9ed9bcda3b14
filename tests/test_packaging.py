"""The wheel ships passes/ as fora_fx.passes (never a top-level `passes`), and a plain
(non-editable) install resolves backend="fora" in a fresh interpreter through its entry
point."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_fresh_install(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("fora_fx-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fora_fx/passes/locate.py" in names
    assert not any(n.startswith("passes/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "fora = fora_fx.backend:fora_backend" in text

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import toy\n"
        "m = torch.compile(toy.Toy(), backend='fora', options={'compiler': 'eager'})\n"
        "assert m(*toy.inputs(1)).item() == toy.recomputed(1)\n"
        "import fora_fx, fora_fx.passes\n"
        "print(fora_fx.__file__, fora_fx.passes.__file__)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd="/", env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    module_file, passes_file = run.stdout.split()
    assert module_file.startswith(str(target)) and passes_file.startswith(str(target))
