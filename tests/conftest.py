from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # the oracle helper lives beside the tests

# CI runs hypothesis derandomized so that a red build can be replayed; locally it explores.
settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The longer exploration, one command: pytest tests/test_differential.py --hypothesis-profile=long
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("ci" if os.environ.get("CI") else "dev")

BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]


class Backend:
    """One array library: converts NumPy test data into its arrays and back."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name == "numpy":
            self.mod = np
        elif name == "jax":
            jax = pytest.importorskip("jax")
            jax.config.update("jax_enable_x64", True)  # float64 parity needs it
            self.mod = importlib.import_module("jax.numpy")
        else:
            self.mod = pytest.importorskip(name)

    def asarray(self, a):
        a = np.asarray(a)
        if self.name == "torch":
            return self.mod.from_numpy(a.copy())
        return self.mod.asarray(a)

    def to_numpy(self, a):
        if self.name == "torch":
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def same_library(self, a) -> bool:
        module = type(a).__module__.split(".")[0]
        return {"numpy": "numpy", "array_api_strict": "array_api_strict", "torch": "torch", "jax": "jaxlib"}[
            self.name
        ] == module or (self.name == "jax" and module == "jax")


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return Backend(request.param)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


@pytest.fixture
def fresh_buffer_cache():
    """crossent's buffer cache emptied at its default limit, so that what the test frees is all it holds."""
    from crossent import _memory

    _memory.set_buffer_cache(0)
    _memory.set_buffer_cache(_memory._DEFAULT_CACHE_BYTES)
    yield
    _memory.set_buffer_cache(_memory._DEFAULT_CACHE_BYTES)
