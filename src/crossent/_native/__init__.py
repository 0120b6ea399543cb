"""The native CPU kernel's Python side: lay NumPy arrays out for it, call it, shape its results.

Arguments arrive validated (crossent._validate); this module only maps them onto the kernel's
(outer, classes, inner) view and its enums (kernel_api.hpp). If the compiled module is missing or fails
to load, ``extension`` is None and crossent runs the Array-API reference instead.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import numpy as np

from .. import _memory
from .._validate import LossOptions, LossShape, dtype_name

extension: Any
load_error: str | None
try:
    extension = importlib.import_module(f"{__name__}._crossent_native")
except ImportError as error:  # not built (CROSSENT_NATIVE=OFF), or built for another Python
    extension, load_error = None, f"{type(error).__name__}: {error}"
else:
    load_error = None

# Set by crossent.jax._ffi once it registers the module's XLA FFI handlers (xla_targets) with JAX.
xla_registered = False

# Values of the enums in kernel_api.hpp.
_DTYPE_CODES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
_TARGET_CODES = {"int64": 0, "int32": 1, "uint8": 2}
_PROBABILITY = 3
_TARGET_CODE_OF_DTYPE = {np.dtype(name): code for name, code in _TARGET_CODES.items()}
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_LOG_SOFTMAX, _SOFTMAX, _LOGSUMEXP = 0, 1, 2


def supports(x: Any) -> bool:
    """Whether the kernel takes this NumPy array (dtype, non-empty)."""
    if extension is None or not isinstance(x, np.ndarray) or x.size == 0:
        return False
    return dtype_name(x.dtype) in _DTYPE_CODES


def class_indices_valid(target: Any, n_classes: int, ignore_index: int) -> bool:
    """True when every class index of a NumPy target is in [0, n_classes) or equals ignore_index,
    checked in one native pass; False when not, or when the kernel cannot read this target (the
    caller then runs crossent._validate's check, which names the offender)."""
    if extension is None or type(target) is not np.ndarray or not target.flags.c_contiguous:
        return False
    code = _TARGET_CODE_OF_DTYPE.get(target.dtype)
    return code is not None and extension.class_indices_valid(target, code, n_classes, ignore_index)


_PLAIN_REDUCTION_CODES = {name: _REDUCTION_CODES[name] for name in ("mean", "sum")}
# Native byte order only: np.dtype(">f4") differs from np.dtype("f4").
_PLAIN_INPUT_DTYPES = frozenset(map(np.dtype, ("float32", "float64")))
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def plain_cross_entropy(input: Any, target: Any, ignore_index: Any, reduction: Any) -> np.ndarray | None:
    """cross_entropy of float32/float64 (rows, classes) logits and (rows,) class indices with no other
    option, checked and computed in one native call; None for any other call, or for an invalid one
    (the general path then validates, and names what is wrong). Small calls are otherwise dominated by
    Python's argument handling: 256x10 takes about 8 us here against 18 us on the general path."""
    if (
        extension is None
        or type(input) is not np.ndarray
        or type(target) is not np.ndarray
        or type(ignore_index) is not int
        or type(reduction) is not str
        or input.dtype not in _PLAIN_INPUT_DTYPES
        or target.dtype not in _TARGET_CODE_OF_DTYPE
        or not (input.flags.c_contiguous and target.flags.c_contiguous)
        or not _INT64_MIN <= ignore_index <= _INT64_MAX
    ):
        return None
    code = _PLAIN_REDUCTION_CODES.get(reduction)
    if code is None:
        return None
    total = extension.plain_cross_entropy(input, target, ignore_index, code)
    return None if total is None else np.array(total, dtype=input.dtype)


def _layout(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """(outer, classes, inner) of a C-contiguous array with classes on ``axis``."""
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _kernel_view(x: np.ndarray) -> tuple[np.ndarray, int]:
    """A C-contiguous view the kernel can read, and its dtype code. Half types travel as uint16 bits."""
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    code = _DTYPE_CODES[dtype_name(x.dtype)]
    return (x.view(np.uint16) if x.dtype.itemsize == 2 else x), code


def _compute_dtype(dtype: np.dtype) -> type:
    return np.float64 if dtype == np.float64 else np.float32


def _weight(weight: Any, dtype: np.dtype) -> np.ndarray | None:
    return None if weight is None else np.ascontiguousarray(weight, dtype=_compute_dtype(dtype))


def _target(target: np.ndarray, shape: LossShape, dtype: np.dtype) -> tuple[np.ndarray, int]:
    if shape.probability_target:
        view, _ = _kernel_view(np.asarray(target, dtype=dtype))
        return view, _PROBABILITY
    name = dtype_name(target.dtype)
    if name not in _TARGET_CODES:  # other integer widths: widen (a batch-sized copy)
        target, name = target.astype(np.int64), "int64"
    return (target if target.flags.c_contiguous else np.ascontiguousarray(target)), _TARGET_CODES[name]


def _normalizer(opts: LossOptions) -> tuple[bool, float]:
    """(has_normalizer, value) for the kernel: 0 is a normalizer like any other (mean divides by it)."""
    return (False, 0.0) if opts.normalizer is None else (True, float(opts.normalizer))


def _cross_entropy(
    input: np.ndarray,
    target: Any,
    weight: Any,
    shape: LossShape,
    opts: LossOptions,
    *,
    want_grad: bool,
    grad_output: Any,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    assert extension is not None
    dtype = input.dtype
    x, code = _kernel_view(input)
    outer, classes, inner = _layout(input.shape, shape.class_axis)
    t, kind = _target(target, shape, dtype)
    cdt = _compute_dtype(dtype)
    rows = outer * inner
    loss_rows: np.ndarray | None = np.empty(rows, dtype=cdt) if opts.reduction == "none" else None
    grad = None
    if want_grad:
        # A fresh gradient costs the operating system a page fault and a zeroing per page on first
        # write; `out` lets a training loop reuse one buffer instead.
        grad = _memory.empty(input.shape, dtype) if out is None else out
    grad_rows: np.ndarray | None = None
    grad_scale = 1.0
    if want_grad and opts.reduction == "none":
        grad_rows = np.ascontiguousarray(np.asarray(grad_output, dtype=cdt).reshape(rows))
    elif want_grad and grad_output is not None:
        grad_scale = float(grad_output)
    total = extension.cross_entropy(
        x, code, outer, classes, inner, t, kind, _weight(weight, dtype), opts.ignore_index, opts.label_smoothing,
        opts.z_loss, opts.softcap or 0.0, _REDUCTION_CODES[opts.reduction], *_normalizer(opts),
        opts.zero_if_all_ignored, None if grad is None else _kernel_view(grad)[0], grad_rows, grad_scale, loss_rows,
    )  # fmt: skip
    if loss_rows is not None:
        loss = loss_rows.reshape(shape.batch_shape).astype(dtype)
    else:
        loss = np.array(total, dtype=dtype)
    return loss, grad


class NativeKernel:
    """The kernel, with the call signatures of crossent._reference."""

    @staticmethod
    def cross_entropy(input: Any, target: Any, weight: Any, shape: LossShape, opts: LossOptions) -> Any:
        return _cross_entropy(input, target, weight, shape, opts, want_grad=False, grad_output=None)[0]

    @staticmethod
    def cross_entropy_and_grad(
        input: Any, target: Any, weight: Any, shape: LossShape, opts: LossOptions, grad_output: Any, out: Any = None
    ) -> tuple[Any, Any]:
        return _cross_entropy(input, target, weight, shape, opts, want_grad=True, grad_output=grad_output, out=out)

    @staticmethod
    def nll_loss(input: Any, target: Any, weight: Any, shape: LossShape, opts: LossOptions) -> Any:
        assert extension is not None
        dtype = input.dtype
        x, code = _kernel_view(input)
        outer, classes, inner = _layout(input.shape, shape.class_axis)
        t, kind = _target(target, shape, dtype)
        loss_rows: np.ndarray | None = None
        if opts.reduction == "none":
            loss_rows = np.empty(outer * inner, dtype=_compute_dtype(dtype))
        total = extension.nll_loss(
            x, code, outer, classes, inner, t, kind, _weight(weight, dtype), opts.ignore_index,
            _REDUCTION_CODES[opts.reduction], *_normalizer(opts), opts.zero_if_all_ignored, loss_rows,
        )  # fmt: skip
        if loss_rows is not None:
            return loss_rows.reshape(shape.batch_shape).astype(dtype)
        return np.array(total, dtype=dtype)

    @staticmethod
    def _softmax(x: Any, axis: int, op: int, out: np.ndarray | None = None) -> Any:
        assert extension is not None
        view, code = _kernel_view(x)
        outer, classes, inner = _layout(x.shape, axis)
        out_shape = x.shape[:axis] + x.shape[axis + 1 :] if op == _LOGSUMEXP else x.shape
        if out is None:
            out = _memory.empty(out_shape, x.dtype)
        elif out.shape != out_shape or out.dtype != x.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {x.dtype} array of shape {out_shape}, got "
                             f"{out.dtype} {out.shape}")  # fmt: skip
        extension.softmax(view, _kernel_view(out)[0], code, outer, classes, inner, op)
        return out

    def log_softmax(self, x: Any, axis: int) -> Any:
        return self._softmax(x, axis, _LOG_SOFTMAX)

    def softmax(self, x: Any, axis: int, out: np.ndarray | None = None) -> Any:
        return self._softmax(x, axis, _SOFTMAX, out)

    def logsumexp(self, x: Any, axis: int, keepdims: bool) -> Any:
        out = self._softmax(x, axis, _LOGSUMEXP)
        return np.expand_dims(out, axis) if keepdims else out


KERNEL = NativeKernel()


def token_stats(
    input: np.ndarray,
    target: np.ndarray,
    ignore_index: int,
    temperature: float,
    *,
    upstream: tuple[Any, Any, Any] | None = None,
    grad: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log_prob, entropy and logsumexp of ``input / temperature`` (rows, classes), each (rows,) in the
    compute dtype; with ``upstream`` (three per-row arrays or None), their gradient written to ``grad``
    (the input's dtype and shape; it may be ``input`` itself)."""
    assert extension is not None
    x, code = _kernel_view(input)
    rows, classes = input.shape
    t, kind = _target(target, LossShape(1, classes, (rows,), False), input.dtype)
    cdt = _compute_dtype(input.dtype)
    outs: list[np.ndarray] = [np.empty(rows, dtype=cdt) for _ in range(3)]
    ups = [None if g is None else np.ascontiguousarray(np.asarray(g, dtype=cdt).reshape(rows)) for g in upstream or ()]
    if len(ups) < 3:
        ups = [None, None, None]
    extension.token_stats(
        x, code, rows, classes, t, kind, ignore_index, 1.0 / temperature, *outs, *ups,
        None if grad is None else _kernel_view(grad)[0],
    )  # fmt: skip
    return outs[0], outs[1], outs[2]
