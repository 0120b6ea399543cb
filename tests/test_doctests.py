"""The runnable examples in crossent's docstrings are tests too."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "crossent._functional",
    "crossent._modules",
    "crossent._config",
    "crossent.torch._functional",
    "crossent.torch._linear",
    "crossent.torch._backend",
    "crossent.jax._functional",
    "crossent.jax._optax",
    "crossent.jax._linear",
    "crossent._token_stats",
    "crossent.torch._token_stats",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
