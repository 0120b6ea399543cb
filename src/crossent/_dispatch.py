"""Which implementation runs a call: the native CPU kernel when it is built and takes the input, else
the Array-API reference. Both receive the same validated arguments."""

from __future__ import annotations

from typing import Any

import array_api_compat

from . import _native

_enabled = True


def native_kernel(xp: Any, x: Any) -> Any:
    """The native kernel for this input, or None to use the Array-API reference.

    NumPy arrays of float16/bfloat16/float32/float64 go native; other libraries' arrays stay on the
    reference (torch's CPU tensors reach the kernel through ``crossent.torch``'s custom op).
    """
    if _enabled and array_api_compat.is_numpy_namespace(xp) and _native.supports(x):
        return _native.KERNEL
    return None


def native_enabled() -> bool:
    """Whether the native path is switched on (use_native); the kernel may still be missing."""
    return _enabled


def use_native(enabled: bool) -> bool:
    """Turn the native path on or off (for comparisons); returns the previous setting."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _enabled = _enabled, enabled
    return previous
