"""Docs that run: the README's example is examples/quickstart.py, and CI runs it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_quickstart_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert (ROOT / "examples" / "quickstart.py").read_text() in blocks


def test_quickstart_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fora_fx: 4 cached sites" in proc.stdout
    assert "10 calls: 4 recomputed, 6 reused" in proc.stdout


def test_demo_quick_runs_and_reproduces_baseline_at_interval_1():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--quick",
                           "--repeats", "1"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK: interval=1 reproduces the baseline" in proc.stdout


def test_digits_main_job_quick(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "--quick",
                           "--intervals", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "interval=1 reproduces the baseline" in proc.stdout
    # through a pipe, no progress bar draws (one run for this and the job's results)
    for stream in (proc.stdout, proc.stderr):
        assert "\r" not in stream and "it/s" not in stream and "run/s" not in stream
    assert "compiling:" not in proc.stderr and "sampling:" not in proc.stderr
    row = re.search(r"^fora N=3 +([\d.]+)x +(\d+)% +([\d.]+)-([\d.]+) ", proc.stdout, flags=re.M)
    assert row and int(row.group(2)) == 60  # 10 steps: 0, 3, 6, 9 recompute
    assert float(row.group(3)) <= float(row.group(1)) <= float(row.group(4))  # median in range
    # the verdict of the timing check is printed, and the same verdict is in the JSON
    verdict = re.search(r"^(timing ok|UNRELIABLE timing)", proc.stdout, flags=re.M)
    assert verdict
    timing = json.loads((out / "results.json").read_text())["timing"]
    assert timing["unreliable"] == (verdict.group(1) == "UNRELIABLE timing")
    assert timing["rounds"] == 5 and timing["controls"] == ["fora N=1"]
    assert len(timing["times_s"]["fora N=3"]) == 5
    for name in ("samples.png", "fid_vs_speedup.png"):
        assert (out / name).stat().st_size > 0


def test_last_steps_probe_quick():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "last_steps_probe.py"),
                           "--quick"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "N=5 last 2  recomputes  6/20 [0, 5, 10, 15, 18, 19]" in proc.stdout
    assert "N=6         recomputes  5/20 [0, 6, 12, 18, 19]" in proc.stdout
    assert len(re.findall(r"PSNR [\d.]+ dB", proc.stdout)) == 5


def test_pipeline_examples_run_for_every_family():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pipelines.py"),
                           "--compiler", "eager"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for family in ("DiTPipeline", "PixArtAlphaPipeline", "StableDiffusion3Pipeline",
                   "FluxPipeline", "WanPipeline"):
        assert f": {family}" in proc.stdout
    assert proc.stdout.strip().endswith("OK")


def test_video_probe_runs_a_model_whole_and_one_piecewise():
    # skyreels_v2 is captured in one graph; hunyuan_video15 breaks Dynamo's graph in its own
    # code and runs with piecewise=fora_fx.Piecewise().
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "video_probe.py"),
                           "skyreels_v2", "hunyuan_video15"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("step0 max|fast-ref| = 0.000e+00   (exact: True)") == 2
    assert "6 cached sites" in proc.stdout
    assert "hunyuan_video15   (piecewise=fora_fx.Piecewise())" in proc.stdout
    assert proc.stdout.strip().endswith("OK")


def test_image_probe_runs_three_cases_this_repo_once_got_wrong():
    # prx: an MLP computed inline in the block; nucleusmoe: a router's scatter_add_ with an
    # unread result (its refresh step used to be wrong); ovis_image: a parallel block whose
    # MLP input is torch.split off (its MLP half used to run on every step, unmentioned).
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "image_probe.py"),
                           "prx", "nucleusmoe", "ovis_image"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("(exact: True)") == 3
    assert "mlp_1          blocks.1.down_proj" in proc.stdout
    assert "parallel_1" in proc.stdout and "not cached" not in proc.stdout
    assert proc.stdout.strip().endswith("OK")


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
