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


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "shares_captures: the test's `name` parameter is a whole-graph model case "
        "(tests/zoo.py, tests/pipes.py); the tests of one case run on one worker, back to back, "
        "sharing Dynamo's cache")


_previous_case: list[str | None] = [None]


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    # Compiled entries are shared between models of one class (per code object); start each
    # test from an empty Dynamo cache so compile counts and recompile limits are per test.
    # (Per file was tried: a piecewise compile makes Dynamo skip that class's frame for later
    # whole-graph ones, which then fail; the tests' dealing order decided which.) The
    # exception: consecutive `shares_captures` tests of one case (whole-graph models) keep it,
    # so a transform that differs from an earlier one only in its schedule compiles nothing.
    case = _shared_case(request.node)
    if case is None or case != _previous_case[0]:
        torch._dynamo.reset()
    _previous_case[0] = case
    before = _compile_configs()
    yield
    changed = sorted(k for k, v in _compile_configs().items() if before.get(k) != v)
    # A process-wide compile setting changed by a test (or by a library it ran) changes
    # every later test on the worker: cache-dit's recommended setup once left Dynamo's
    # recompile limit at 1024, and a later test that counted on 8 failed, by dealing order.
    assert not changed, f"the test left torch's compile configs changed: {changed}"


def _shared_case(item) -> str | None:
    if item.get_closest_marker("shares_captures") is None:
        return None
    return item.callspec.params["name"]


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
    for item in items:  # a case's tests on one worker (see _fresh_dynamo)
        case = _shared_case(item)
        if case is not None:
            item.add_marker(pytest.mark.xdist_group(f"case_{case}"))
    if not getattr(config.option, "loadgroup", False) or not hasattr(config, "workerinput"):
        return
    from _pytest.nodeid import NodeId

    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        suffix = "@" + "_".join(sorted(names))
        if names and not item.nodeid.endswith(suffix) and isinstance(item._id, NodeId):
            item._id = NodeId.parse(item.nodeid + suffix)
