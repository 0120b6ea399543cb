"""What crossent runs on: the native kernel or the reference, its instruction set and its threads."""

from __future__ import annotations

import os
import platform
from typing import Any

from . import _memory, _native, _validate


def set_num_threads(n: int) -> None:
    """Threads the native kernel uses (default: ``OMP_NUM_THREADS``, else every core).

    Results are bitwise the same for any thread count.
    """
    n = _validate.check_int(n, "n")
    if n < 1:
        raise ValueError(f"the number of threads must be at least 1, got {n}")
    if _native.extension is not None:
        _native.extension.set_num_threads(n)


def get_num_threads() -> int:
    """Threads the native kernel uses (1 when it is not built)."""
    return 1 if _native.extension is None else int(_native.extension.get_num_threads())


def config() -> dict[str, Any]:
    """The facts :func:`show_config` prints, as a dict."""
    ext = _native.extension
    info: dict[str, Any] = {
        "native": ext is not None,
        "path": "native C++ kernel (NumPy arrays)" if ext is not None else "Array-API reference",
        "isa": ext.isa() if ext is not None else None,
        "available_isas": list(ext.available_isas()) if ext is not None else [],
        "openmp": bool(ext.openmp) if ext is not None else False,
        "threads": get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "buffer_cache": "{:.0f} MiB held of {:.0f} MiB".format(*(b / 2**20 for b in _memory.buffer_cache_bytes())),
    }
    if ext is None:
        info["load_error"] = _native.load_error
    info["xla_ffi"] = xla_ffi_status()
    return info


def xla_ffi_status() -> str:
    """Whether the kernel's XLA FFI handlers (the kernel inside jitted JAX programs on the CPU) are built
    into this installation and registered with JAX; never imports JAX."""
    ext = _native.extension
    if ext is None or not hasattr(ext, "xla_targets"):
        return "not built (jaxlib was not installed when crossent was built; crossent.jax runs jnp)"
    version = f"XLA FFI API {ext.xla_ffi_api_version}"
    if _native.xla_registered:
        return f"built and registered ({version})"
    return f"built ({version}); registered when crossent.jax first runs"


def show_config() -> None:
    """Print which path crossent uses, the SIMD level and the thread count.

    Examples
    --------
    >>> import crossent
    >>> crossent.show_config()  # doctest: +ELLIPSIS
    crossent ...
      path: ...
    """
    from . import __version__

    info = config()
    print(f"crossent {__version__}")
    for key, value in info.items():
        print(f"  {key}: {value}")
