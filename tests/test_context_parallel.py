"""FORA under diffusers' context parallelism (issue 20, docs/parallel.md): 2 processes over
gloo on loopback, Ulysses, tiny Wan and Flux transformers. The processes run
tests/cp_worker.py (one torchrun, ~70 s on the 2-core dev machine); this file asserts on the
`CP {json}` lines they print."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
TOL = 1e-5  # float32; Ulysses moves whole heads, Flux's joint attention reorders a sum (2e-7)

pytestmark = [
    # One worker for all of this file (tests/run.sh): its tests share the module fixture's
    # torchrun. (A second `pytestmark =` used to replace this mark: both workers ran it.)
    pytest.mark.xdist_group("context_parallel"),
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch.distributed with gloo is needed to run 2 processes on CPU"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lines() -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(HERE / "cp_worker.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=HERE)
    out = [json.loads(line[3:]) for line in proc.stdout.splitlines() if line.startswith("CP {")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [x["rank"] for x in out if x["case"] == "done"] in ([0, 1], [1, 0])
    return out


def _case(lines: list[dict], case: str, model: str | None = None) -> list[dict]:
    found = [x for x in lines if x["case"] == case and x.get("model") == model]
    assert sorted(x["rank"] for x in found) == [0, 1], (case, model, lines)
    return found


@pytest.mark.parametrize("model", ["wan", "flux"])
def test_sharded_fora_equals_single_process_fora(lines: list[dict], model: str) -> None:
    for x in _case(lines, "fora_cp_vs_single", model):
        assert x["max_abs"] <= TOL
        # the same schedule as one process, and on both ranks
        assert x["history"] == x["ref_history"] == [True, False, False, True, False, True]
        assert x["histories"][0] == x["histories"][1]


@pytest.mark.parametrize("model", ["wan", "flux"])
def test_reuse_graph_skips_the_attention_collectives(lines: list[dict], model: str) -> None:
    for x in _case(lines, "fora_cp_vs_single", model):
        # Wan: 2 self-attentions, Flux: 1 double + 1 single block; 4 all-to-alls each (q, k,
        # v in, output back), each waited; one all-gather at proj_out, outside every site.
        assert x["refresh"] == {"all_to_all_single": 8, "all_gather_into_tensor": 1,
                                "wait_tensor": 9}
        assert x["reuse"] == {"all_to_all_single": 0, "all_gather_into_tensor": 1,
                              "wait_tensor": 1}


@pytest.mark.parametrize("model", ["wan", "flux"])
def test_interval_1_equals_the_sharded_uncached_model(lines: list[dict], model: str) -> None:
    for x in _case(lines, "interval1_vs_uncached_cp", model):
        assert x["max_abs"] == 0.0
        assert x["single_vs_cp_uncached"] <= TOL  # the sharded model is the model


def test_transform_then_enable_works_too(lines: list[dict]) -> None:
    for x in _case(lines, "transform_then_enable", "wan"):
        assert x["max_abs"] <= TOL
        assert x["history"] == [True, False, False, True, False, True]
        assert x["refresh"]["all_to_all_single"] == 8  # the graph really is the sharded one


def test_ranks_at_different_steps_raise_on_both(lines: list[dict]) -> None:
    for x in _case(lines, "drift_reset"):
        assert x["raised"] and "different FORA positions" in x["raised"]


def test_a_rank_whose_peers_never_come_raises_instead_of_hanging(lines: list[dict]) -> None:
    by_rank = {x["rank"]: x for x in _case(lines, "drift_extra_call")}
    assert by_rank[0]["raised"] is None  # rank 0 made no extra call
    assert "waited 10 s" in by_rank[1]["raised"] and 9.5 <= by_rank[1]["waited"] < 40
    assert by_rank[1]["step"] == 1  # the call that raised did not advance the step


def test_docs_example_is_what_the_worker_runs() -> None:
    worker = (HERE / "cp_worker.py").read_text()
    docs = (HERE.parent / "docs" / "parallel.md").read_text()
    assert 'exec(EXAMPLE.group(1), example)' in worker and "shard_and_cache(" in worker
    assert "exec'd verbatim by tests/cp_worker.py" in docs
    assert "def shard_and_cache(" in docs


def test_bench_context_parallel_refuses_outside_torchrun(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from fora_fx.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        main(["bench", "--context-parallel", "2"])
    assert "runs under torchrun: torchrun --nproc-per-node 2" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["bench", "--context-parallel", "2", "--model", "tiny"])  # a DiT: no _cp_plan
    assert "has no context-parallel plan" in capsys.readouterr().err
