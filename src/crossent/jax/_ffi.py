"""Placeholder for crossent's XLA FFI target (the native kernel inside XLA on the CPU).

The real module, built beside the native kernel, replaces this one; its interface is what
``crossent.jax._backend`` calls. Here the target is never available, so every call runs the jnp
implementation.
"""

from __future__ import annotations

from typing import Any


def available() -> bool:
    """Whether the FFI target is registered with XLA and importable."""
    return False


def supports(dtype: Any) -> bool:
    """Whether the target computes arrays of ``dtype``."""
    return False


def _missing(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("crossent's XLA FFI target is not built in this installation")


cross_entropy_fwd = _missing
nll_loss_fwd = _missing
softmax_op = _missing
