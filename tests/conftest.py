"""Test setup: tests/ on sys.path for the shared helpers, a CI-friendly hypothesis profile."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Derandomized (the same examples every run, so CI is reproducible), no deadline (a first
# call includes a Dynamo capture), bounded example counts set per test.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Compiled entries are shared between models of one class (per code object); start each
    # test from an empty Dynamo cache so compile counts and recompile limits are per test.
    # (Per file was tried: a piecewise compile makes Dynamo skip that class's frame for later
    # whole-graph ones, which then fail; the tests' dealing order decided which.)
    torch._dynamo.reset()
    before = _compile_configs()
    yield
    changed = sorted(k for k, v in _compile_configs().items() if before.get(k) != v)
    # A process-wide compile setting changed by a test (or by a library it ran) changes
    # every later test on the worker: cache-dit's recommended setup once left Dynamo's
    # recompile limit at 1024, and a later test that counted on 8 failed, by dealing order.
    assert not changed, f"the test left torch's compile configs changed: {changed}"


def _compile_configs() -> dict:
    import torch._inductor.config as inductor_config

    return {f"{c.__name__}.{k}": v for c in (torch._dynamo.config, inductor_config)
            for k, v in c.get_config_copy().items()}


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (tests/run.sh) keeps an `xdist_group` on one worker by the suffix
    `@group` that pytest-xdist appends to each marked test's nodeid in the workers. xdist
    3.8 writes it to `item._nodeid`, which pytest 9 no longer reads (nodeids live in
    `item._id`): every group was split over both workers, each ran the module fixtures (two
    torchruns for test_context_parallel.py) and the fuzzer's feature check skipped. Appended
    here where xdist's did not take."""
    if not getattr(config.option, "loadgroup", False) or not hasattr(config, "workerinput"):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix) and isinstance(item._id, NodeId):
            item._id = NodeId.parse(item.nodeid + suffix)
