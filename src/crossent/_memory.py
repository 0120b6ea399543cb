"""Large output arrays: 64-byte aligned, in memory Linux backs with huge pages.

NumPy asks Linux for transparent huge pages on large arrays (torch's CPU allocator does not), so first
touching a fresh gradient costs a fraction of what 4 KiB pages cost. But glibc places a large block 16
bytes past a page boundary, so every 32-byte vector load and store of the kernel, and MKL's, straddles
two cache lines half of the time: measured on the 2-core machine, accumulating the 64 MiB weight
gradient of the linear loss (eight 256-row chunks) took 707-811 ms at that offset, 532-554 ms aligned.
"""

from __future__ import annotations

import math

import numpy as np

_ALIGNMENT = 64  # a cache line, and an AVX-512 vector
# Below this an array lives in the malloc heap, where alignment costs more (a slice) than it saves.
_ALIGN_FROM_BYTES = 1 << 20


def empty(shape: tuple[int, ...], dtype: np.dtype | type, *, zero: bool = False) -> np.ndarray:
    """An uninitialised (or zeroed) C-contiguous array, 64-byte aligned when it is large."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ALIGN_FROM_BYTES:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    raw = (np.zeros if zero else np.empty)(nbytes + _ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)
