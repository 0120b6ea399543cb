"""Which implementation crossent.torch runs: the one place that looks at the device and the backend.

``auto`` (the default) picks the native C++ kernel for CPU tensors, crossent's Triton kernel for CUDA
and ROCm tensors when triton is importable, and the torch-ops implementation (the Array-API reference
on row chunks) otherwise. An explicit choice that cannot run a call raises; it never falls back.
"""

from __future__ import annotations

import functools
import importlib.util
from types import TracebackType

import torch

from .. import _native

BACKENDS = ("auto", "native", "triton", "torch")
_state = {"backend": "auto"}


class use_backend:
    """Choose what computes crossent.torch's losses: ``"auto"``, ``"native"``, ``"triton"`` or ``"torch"``.

    Usable as a context manager, which restores the previous choice on exit, or as a plain call, which
    keeps the choice until the next one (like ``torch.set_grad_enabled``). The choice is process-wide
    (not per thread) and is read when each loss runs, so a compiled graph follows it too.

    - ``"auto"`` (default): the native kernel on CPU tensors (the torch-ops implementation where the
      kernel is not built or does not take the dtype), Triton on CUDA/ROCm tensors of float32, bfloat16
      or float16 when triton is importable, the torch-ops implementation otherwise.
    - ``"native"``: the C++ kernel; CPU tensors only.
    - ``"triton"``: crossent's Triton kernel; GPU tensors, or CPU tensors under Triton's interpreter
      (``TRITON_INTERPRET=1`` set before the kernels are first used: slow, for tests).
    - ``"torch"``: crossent's semantics as torch operations on row chunks, on any device.

    A backend that cannot run a call raises ``RuntimeError`` (``TypeError`` for a dtype it does not
    take) naming why. An empty batch has nothing to compute: on CPU tensors every backend returns
    torch's result for it (a NaN mean, a 0 sum, no rows).

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> x, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    >>> with ct.use_backend("torch"):
    ...     a = ct.cross_entropy(x, y)
    >>> bool(torch.allclose(a, ct.cross_entropy(x, y)))
    True
    """

    def __init__(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.previous = _state["backend"]
        self.name = name
        _state["backend"] = name

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        _state["backend"] = self.previous


def current() -> str:
    """The backend chosen now (possibly ``"auto"``)."""
    return _state["backend"]


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(x: torch.Tensor) -> str:
    """``"native"``, ``"triton"`` or ``"torch"``: what runs a loss on ``x``'s device and dtype.

    ``"native"`` from auto is a wish: the caller falls back to ``"torch"`` where the kernel does not
    take the arrays (see native_unavailable); from an explicit choice it must run or raise, except on
    an empty ``x``, which has nothing to compute and gets ``"torch"``.
    """
    name = _state["backend"]
    device = x.device.type
    if name == "auto":
        if device == "cpu":
            return "native"
        if device == "cuda" and triton_importable() and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return "triton"  # torch.version.hip builds report ROCm devices as "cuda" too
        return "torch"
    if name == "native" and device != "cpu":
        raise RuntimeError(f"crossent.torch.use_backend('native') runs on CPU tensors only, got a {device} tensor")
    if name == "native" and _native.extension is None:
        raise RuntimeError(
            f"crossent.torch.use_backend('native'): the native kernel is not built ({_native.load_error})"
        )
    if name == "native" and x.numel() == 0:
        return "torch"  # nothing to compute: an empty batch's NaN mean, 0 sum or empty rows, as torch's
    if name == "triton":
        if not triton_importable():
            raise RuntimeError("crossent.torch.use_backend('triton'): triton is not installed (pip install triton)")
        if device not in ("cpu", "cuda"):
            raise RuntimeError(f"crossent.torch.use_backend('triton') runs on CUDA/ROCm tensors, got a {device} tensor")
        from . import _triton  # imports triton; raises for CPU tensors without the interpreter

        _triton.check_device(x)
    return name


def explicit() -> bool:
    """Whether the backend was chosen by name (then it must run or raise, never fall back)."""
    return _state["backend"] != "auto"


def native_unavailable(why: str) -> RuntimeError:
    return RuntimeError(f"crossent.torch.use_backend('native') cannot run this call: {why}")
