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
    torch._dynamo.reset()
    yield
