"""Docs that run: the README's example is examples/quickstart.py, and CI runs it."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example(capfd, script: str, *args: str) -> tuple[int, str, str]:
    """`python examples/<script> <args>` run in this process (as `__main__`, stdout and
    stderr captured at the file descriptors, so not a terminal): the same code path as
    from a shell, without a fresh interpreter's ~8 s of importing torch and diffusers.
    Returns the exit code, stdout and stderr."""
    argv, path, environ, cwd = sys.argv, list(sys.path), dict(os.environ), os.getcwd()
    sys.argv = [str(ROOT / "examples" / script), *args]
    sys.path.insert(0, str(ROOT / "examples"))  # as `python examples/<script>` has it
    code = 0
    try:
        os.chdir(ROOT)
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
    out, err = capfd.readouterr()
    return code, out, err


def test_readme_example_is_the_quickstart_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (ROOT / "examples" / "quickstart.py").read_text() in blocks


def test_quickstart_runs():
    # a fresh interpreter, as a user runs it first (the other examples run in-process)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fora_fx: 4 cached sites" in proc.stdout
    assert "10 calls: 4 recomputed, 6 reused" in proc.stdout


def test_demo_quick_runs_and_reproduces_baseline_at_interval_1(capfd):
    code, out, err = _example(capfd, "demo.py", "--quick", "--repeats", "1")
    assert code == 0, out[-3000:] + err[-3000:]
    assert "OK: interval=1 reproduces the baseline" in out


def test_digits_main_job_quick(tmp_path, capfd):
    dest = tmp_path / "digits"
    code, out, err = _example(capfd, "digits.py", "--quick", "--intervals", "3",
                              "--out", str(dest))
    assert code == 0, out[-3000:] + err[-3000:]
    assert "interval=1 reproduces the baseline" in out
    # through a pipe, no progress bar draws (one run for this and the job's results)
    for stream in (out, err):
        assert "\r" not in stream and "it/s" not in stream and "run/s" not in stream
    assert "compiling:" not in err and "sampling:" not in err
    row = re.search(r"^fora N=3 +([\d.]+)x +(\d+)% +([\d.]+)-([\d.]+) ", out, flags=re.M)
    assert row and int(row.group(2)) == 60  # 10 steps: 0, 3, 6, 9 recompute
    assert float(row.group(3)) <= float(row.group(1)) <= float(row.group(4))  # median in range
    # the verdict of the timing check is printed, and the same verdict is in the JSON
    verdict = re.search(r"^(timing ok|UNRELIABLE timing)", out, flags=re.M)
    assert verdict
    timing = json.loads((dest / "results.json").read_text())["timing"]
    assert timing["unreliable"] == (verdict.group(1) == "UNRELIABLE timing")
    assert timing["rounds"] == 5 and timing["controls"] == ["fora N=1"]
    assert len(timing["times_s"]["fora N=3"]) == 5
    for name in ("samples.png", "fid_vs_speedup.png"):
        assert (dest / name).stat().st_size > 0


def test_last_steps_probe_quick(capfd):
    code, out, err = _example(capfd, "last_steps_probe.py", "--quick")
    assert code == 0, out[-3000:] + err[-3000:]
    assert "N=5 last 2  recomputes  6/20 [0, 5, 10, 15, 18, 19]" in out
    assert "N=6         recomputes  5/20 [0, 6, 12, 18, 19]" in out
    assert len(re.findall(r"PSNR [\d.]+ dB", out)) == 5


def test_pipeline_examples_run_for_every_family(capfd):
    code, out, err = _example(capfd, "pipelines.py", "--compiler", "eager")
    assert code == 0, out[-3000:] + err[-3000:]
    for family in ("DiTPipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline",
                   "FluxPipeline", "WanPipeline"):
        assert f": {family}" in out
    assert out.strip().endswith("OK")


def test_video_probe_runs_a_model_whole_and_one_piecewise(capfd):
    # skyreels_v2 is captured in one graph; hunyuan_video15 breaks Dynamo's graph in its own
    # code and runs with piecewise=fora_fx.Piecewise().
    code, out, err = _example(capfd, "video_probe.py", "skyreels_v2", "hunyuan_video15")
    assert code == 0, out[-3000:] + err[-3000:]
    assert out.count("step0 max|fast-ref| = 0.000e+00   (exact: True)") == 2
    assert "6 cached sites" in out
    assert "hunyuan_video15   (piecewise=fora_fx.Piecewise())" in out
    assert out.strip().endswith("OK")


def test_image_probe_runs_three_cases_this_repo_once_got_wrong(capfd):
    # prx: an MLP computed inline in the block; nucleusmoe: a router's scatter_add_ with an
    # unread result (its refresh step used to be wrong); ovis_image: a parallel block whose
    # MLP input is torch.split off (its MLP half used to run on every step, unmentioned).
    code, out, err = _example(capfd, "image_probe.py", "prx", "nucleusmoe", "ovis_image")
    assert code == 0, out[-3000:] + err[-3000:]
    assert out.count("(exact: True)") == 3
    assert "mlp_1          blocks.1.down_proj" in out
    assert "parallel_1" in out and "not cached" not in out
    assert out.strip().endswith("OK")


def _probe():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cuda_codegen_probe", ROOT / "examples" / "cuda_codegen_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_codegen_probe_counts_the_wrapper_launches():
    wrapper = '''
@triton.jit
def triton_poi_fused_add_0(in_ptr0, in_ptr1, out_ptr0, xnumel, XBLOCK : tl.constexpr):
    pass
def triton_red_fused_norm_1(in_out_ptr0, in_ptr0, xnumel, r0_numel, XBLOCK : tl.constexpr):
    pass
class Runner:
    def call(self, args):
        extern_kernels.bmm(arg1_1, arg2_1, out=buf0)
        triton_poi_fused_add_0.run(buf0, arg3_1, buf1, 64, stream=stream0)
        extern_kernels.addmm(arg4_1, buf1, arg5_1, alpha=1, beta=1, out=buf2)
        triton_red_fused_norm_1.run(buf2, arg6_1, 8, 8, stream=stream0)
        triton_poi_fused_add_0.run(buf2, arg3_1, buf3, 64, stream=stream0)
        return (buf3, )
def get_args():
    triton_poi_fused_add_0.run(ignored)
'''
    found = _probe().launches(wrapper)
    assert found["triton"] == [("triton_poi_fused_add_0", 3), ("triton_red_fused_norm_1", 2),
                               ("triton_poi_fused_add_0", 3)]
    assert dict(found["extern"]) == {"bmm": 1, "addmm": 1}


def test_cuda_codegen_probe_on_the_tiny_model():
    # Needs Triton (PyPI's CUDA build of torch brings it); the CPU build CI installs has none.
    import importlib.util

    import pytest

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (the CPU build of torch)")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "cuda_codegen_probe.py"),
                           "--model", "tiny", "--batch", "1", "--variants", "reuse"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = re.search(r"^\| reuse \| (\d+) \| (.*) \| (\d+) \|$", proc.stdout, flags=re.M)
    assert row and int(row.group(1)) > 0 and "bmm" in row.group(2), proc.stdout[-3000:]
