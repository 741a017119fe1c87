"""Mutated sample files: a loader may refuse any of them, but only with an
EdgetailorError (a message and a hint), never a traceback. The inputs and
the check live in fuzz_cases.py, so that a benchmark can run the same check
on many more inputs than the default suite has time for."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.fuzz_cases import LOADERS, fuzz_one, mutate, seed_inputs


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_seeds_are_read_without_error(fuzz_dir):
    for name, data in seed_inputs().items():
        assert fuzz_one(name, data, fuzz_dir) is None, name


@pytest.mark.parametrize("loader", LOADERS)
@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False))
def test_mutated_inputs_raise_only_edgetailor_errors(loader, rng, fuzz_dir):
    data = mutate(loader, seed_inputs()[loader], rng)
    assert fuzz_one(loader, data, fuzz_dir) is None
