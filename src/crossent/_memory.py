"""Large output arrays: 64-byte aligned, in memory Linux backs with huge pages, reused once freed.

NumPy asks Linux for transparent huge pages on large arrays (torch's CPU allocator does not), so first
touching a fresh gradient costs a fraction of what 4 KiB pages cost. But glibc places a large block 16
bytes past a page boundary, so every 32-byte vector load and store of the kernel, and MKL's, straddles
two cache lines half of the time: measured on the 2-core machine, accumulating the 64 MiB weight
gradient of the linear loss (eight 256-row chunks) took 707-811 ms at that offset, 532-554 ms aligned.

Even in huge pages, a fresh block is zeroed by the kernel on first touch, a write of every byte before
the gradient's own: at 4096x32768 float32, a fresh 512 MiB gradient took 88 ms forward+backward where a
reused one took 54 ms. So a large block whose arrays are all gone goes back to a bounded cache, and the
next request of the same size takes it instead of fresh memory: a training loop that drops each step's
gradient gets the previous one's memory back. :func:`set_buffer_cache` bounds what the cache holds
(2 GiB by default) and empties it.
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np

from . import _validate

_ALIGNMENT = 64  # a cache line, and an AVX-512 vector
# Below this an array lives in the malloc heap, where alignment costs more (a slice) than it saves.
_ALIGN_FROM_BYTES = 1 << 20
_DEFAULT_CACHE_BYTES = 2 << 30


class _BlockCache:
    """Freed raw blocks by size, oldest first, within a limit on the bytes held."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()  # id -> block
        self._lock = threading.Lock()  # blocks come back from whichever thread drops their last array

    def take(self, nbytes: int) -> np.ndarray | None:
        with self._lock:
            for key, block in self._blocks.items():
                if block.nbytes == nbytes:
                    del self._blocks[key]
                    self.held -= nbytes
                    return block
        return None

    def put(self, block: np.ndarray) -> None:
        # Called from a lease's __del__, which the garbage collector may run inside this very lock (an
        # allocation in take or resize): then, or while another thread holds it, the block is just freed.
        if not self._lock.acquire(blocking=False):
            return
        try:
            if block.nbytes > self.limit:
                return
            self._evict_to(self.limit - block.nbytes)
            self._blocks[id(block)] = block
            self.held += block.nbytes
        finally:
            self._lock.release()

    def resize(self, limit: int) -> None:
        with self._lock:
            self.limit = limit
            self._evict_to(limit)

    def _evict_to(self, budget: int) -> None:
        """Drop the oldest blocks until at most ``budget`` bytes are held (under the lock)."""
        while self.held > budget:
            _, oldest = self._blocks.popitem(last=False)
            self.held -= oldest.nbytes


_cache = _BlockCache(_DEFAULT_CACHE_BYTES)


class _Lease:
    """The base of the arrays over one raw block: when the last of them is gone, the block is cached.

    NumPy keeps the object whose ``__array_interface__`` an array was made from as that array's base,
    and every view's base leads back to it, so the lease lives exactly as long as some array uses the
    block.
    """

    def __init__(self, block: np.ndarray, start: int, nbytes: int) -> None:
        self.block = block
        self.cache = _cache  # held here: module globals may be gone when the last lease dies at exit
        self.__array_interface__ = {
            "data": (block.ctypes.data + start, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }

    def __del__(self) -> None:
        self.cache.put(self.block)


def empty(shape: tuple[int, ...], dtype: np.dtype | type, *, zero: bool = False) -> np.ndarray:
    """An uninitialised (or zeroed) C-contiguous array, 64-byte aligned when it is large."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ALIGN_FROM_BYTES:
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    block = _cache.take(nbytes + _ALIGNMENT)
    if block is None:
        block = (np.zeros if zero else np.empty)(nbytes + _ALIGNMENT, np.uint8)
    elif zero:
        block.fill(0)
    # Bytes first, then the dtype: an interface's type string cannot name every dtype (bfloat16's is "|V2").
    raw = np.asarray(_Lease(block, -block.ctypes.data % _ALIGNMENT, nbytes))
    return raw.view(dtype).reshape(shape)


def set_buffer_cache(max_bytes: int) -> None:
    """Bound the memory crossent keeps from freed large outputs for reuse (default 2 GiB).

    A gradient (or other output of 1 MiB or more) whose arrays are all gone is kept, up to
    ``max_bytes`` in all (the oldest dropped first), for the next output of the same size: reusing it
    spares the operating system's zeroing of fresh memory. ``0`` turns the cache off and frees what it
    holds.
    """
    max_bytes = _validate.check_int(max_bytes, "max_bytes")
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be at least 0, got {max_bytes}")
    _cache.resize(max_bytes)


def buffer_cache_bytes() -> tuple[int, int]:
    """(bytes the cache holds, its limit)."""
    return _cache.held, _cache.limit
