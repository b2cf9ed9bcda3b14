"""The wheel ships passes/ as fora_fx.passes (never a top-level `passes`), and a plain
(non-editable) install resolves backend="fora" in a fresh interpreter through its entry
point."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
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


def test_gpu_setup_imports_fora_fx_with_nothing_installed(tmp_path):
    """The GPU check runs in a carried checkout with nothing installed: the checkout itself
    imports, fora_fx.passes included (passes/ sits beside fora_fx/). Run here with
    `python -S`, so that this venv's editable install (a .pth file) is not seen, and a fake
    nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", f'exec {sys.executable} -S "$@"'),
                       ("nvidia-smi", "echo name; echo 'no GPU (test)'")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHONPATH": sysconfig.get_paths()["purelib"], "OUT": str(tmp_path / "out"),
           "FORA_WHEELS": str(tmp_path / "no-wheels")}
    env.pop("PYTHONSAFEPATH", None)
    show = ("cd / && python3 -c 'import fora_fx.bench.run, fora_fx, fora_fx.passes; "
            "print(fora_fx.__file__, fora_fx.passes.__file__)'")

    def bash(script: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    plain = bash(f"export PYTHONPATH={ROOT}:$PYTHONPATH; {show}")  # the checkout, no setup
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout.split() == [str(ROOT / "fora_fx" / "__init__.py"),
                                    str(ROOT / "passes" / "__init__.py")]
    staged = bash(f"source examples/gpu_setup.sh && {show}")
    assert staged.returncode == 0, staged.stderr[-2000:]
    assert staged.stdout.split()[-2] == str(ROOT / "fora_fx" / "__init__.py")
