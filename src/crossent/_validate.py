"""Argument and shape checks shared by every path (reference, native kernel, torch layer).

This is the one home of crossent's error messages: every public function validates here, before any
computation, so that a bad call raises the same clear exception whichever backend would have run it.
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

REDUCTIONS = ("none", "mean", "sum")

# A target dtype is either integral (class indices) or floating (class probabilities); a float16 or
# bfloat16 array is "half" and is computed in float32.
_HALF_NAMES = ("float16", "bfloat16", "half")


@dataclass(frozen=True)
class LossOptions:
    """The loss options after validation; every backend reads them from here."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    normalizer: Any = None  # None, a number >= 0, or a 0-d array of the input's library
    zero_if_all_ignored: bool = False


class LossShape(NamedTuple):
    """Where the classes are and what the target holds, for one validated (input, target) pair (a
    named tuple: built on every call, and a frozen dataclass costs a microsecond more to build)."""

    class_axis: int  # non-negative
    n_classes: int
    batch_shape: tuple[int, ...]  # input shape without the class axis = shape of reduction="none"
    probability_target: bool


def dtype_name(dtype: Any) -> str:
    """``float32`` for numpy's, torch's (``torch.float32``) and JAX's float32 alike."""
    if isinstance(dtype, np.dtype):
        return _numpy_dtype_name(dtype)
    return str(dtype).rsplit(".", 1)[-1]


@functools.lru_cache(maxsize=64)
def _numpy_dtype_name(dtype: np.dtype) -> str:
    # Cached: str() of a NumPy dtype costs microseconds, which matter for small inputs.
    return str(dtype)


def is_half(dtype: Any) -> bool:
    return dtype_name(dtype) in _HALF_NAMES


def is_floating(xp: Any, dtype: Any) -> bool:
    if isinstance(dtype, np.dtype) and dtype.kind in "fiub":
        return dtype.kind == "f"  # the common NumPy case without isdtype's microseconds
    # bfloat16 from ml_dtypes is a NumPy "void" kind that isdtype does not recognise.
    if is_half(dtype):
        return True
    try:
        return bool(xp.isdtype(dtype, "real floating"))
    except (TypeError, ValueError):
        return False


def is_integral(xp: Any, dtype: Any) -> bool:
    if isinstance(dtype, np.dtype) and dtype.kind in "fiub":
        return dtype.kind in "iu"  # excludes bool
    try:
        return bool(xp.isdtype(dtype, "integral"))  # excludes bool
    except (TypeError, ValueError):
        return False


def require_floating(xp: Any, x: Any, what: str) -> None:
    if not is_floating(xp, x.dtype):
        raise TypeError(
            f"{what} must have a real floating dtype (float16, bfloat16, float32 or float64), got {dtype_name(x.dtype)}"
        )


def check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def resolve_axis(axis: Any, ndim: int, *, torch_rule: bool) -> int:
    """The class axis as a non-negative int; None follows torch (axis 1, or 0 for a 1-D input)."""
    if ndim == 0:
        raise ValueError("input must have at least one dimension (the classes), got a 0-d array")
    if axis is None:
        if not torch_rule:
            raise TypeError("axis must be an int, got None")
        return 0 if ndim == 1 else 1
    axis = check_int(axis, "axis")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input with {ndim} dimensions")
    return axis % ndim


def resolve_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """The reduced axes of ``logsumexp`` as sorted non-negative ints: an int, a tuple of ints, or None
    for every axis (NumPy's and SciPy's convention). A 0-d array has one axis to name, 0 or -1 (torch)."""
    if axis is None:
        return tuple(range(ndim))
    axes = axis if isinstance(axis, tuple) else (axis,)
    span = max(ndim, 1)
    out = []
    for a in axes:
        a = check_int(a, "axis")
        if not -span <= a < span:
            raise ValueError(f"axis {a} is out of range for an input with {ndim} dimensions")
        out.append(a % span)
    if len(set(out)) != len(out):
        raise ValueError(f"axis {axis!r} names an axis twice")
    return tuple(sorted(out)) if ndim else ()


def _check_real(value: Any, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    inside = (low < v if low_open else low <= v) and v <= high
    if not inside:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
    return v


def loss_options(
    *,
    reduction: Any,
    ignore_index: Any,
    label_smoothing: Any = 0.0,
    z_loss: Any = 0.0,
    softcap: Any = None,
    normalizer: Any = None,
    zero_if_all_ignored: Any = False,
    cache: bool = True,
) -> LossOptions:
    """The checked options. Plain Python values are checked once per distinct combination (a small
    input's call would otherwise spend a sizeable share of its time here); the key holds each value's
    type, so that True is not taken for 1. Arrays (a 0-d normalizer) are checked every time, and so is
    everything with ``cache=False`` (under torch.compile's tracer, which bypasses caches with a warning)."""
    args = (reduction, ignore_index, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored)
    types = tuple(map(type, args))
    if not cache or not _PLAIN_TYPES.issuperset(types):
        return _loss_options(*args)
    key = args + types
    opts = _CHECKED_OPTIONS.get(key)
    if opts is None:
        opts = _loss_options(*args)  # raises for bad values, which are never cached
        if len(_CHECKED_OPTIONS) < 256:
            _CHECKED_OPTIONS[key] = opts
    return opts


_PLAIN_TYPES = frozenset((str, int, float, bool, type(None)))
_CHECKED_OPTIONS: dict[tuple[Any, ...], LossOptions] = {}


def _loss_options(
    reduction: Any,
    ignore_index: Any,
    label_smoothing: Any,
    z_loss: Any,
    softcap: Any,
    normalizer: Any,
    zero_if_all_ignored: Any,
) -> LossOptions:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_int(ignore_index, "ignore_index")
    eps = _check_real(label_smoothing, "label_smoothing", 0.0, 1.0)
    z = _check_real(z_loss, "z_loss", 0.0, math.inf)
    if math.isinf(z):
        raise ValueError(f"z_loss must be finite, got {z_loss!r}")
    cap = None
    if softcap is not None:
        cap = _check_real(softcap, "softcap", 0.0, math.inf, low_open=True)
        if math.isinf(cap):
            raise ValueError(f"softcap must be finite (or None for no capping), got {softcap!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer only applies to reduction='mean', got reduction={reduction!r}")
        if isinstance(normalizer, numbers.Real) and not isinstance(normalizer, bool):
            normalizer = _check_normalizer(float(normalizer), normalizer)
        elif getattr(normalizer, "shape", None) != ():
            raise TypeError(f"normalizer must be a number >= 0 or a 0-d array, got {normalizer!r}")
        else:
            value = _host_value(normalizer)
            if value is not None:
                _check_normalizer(value, normalizer)
    if not isinstance(zero_if_all_ignored, bool):
        raise TypeError(f"zero_if_all_ignored must be a bool, got {zero_if_all_ignored!r}")
    return LossOptions(
        reduction=reduction,
        ignore_index=int(ignore_index),
        label_smoothing=eps,
        z_loss=z,
        softcap=cap,
        normalizer=normalizer,
        zero_if_all_ignored=zero_if_all_ignored,
    )


def normalizer_value(normalizer: Any) -> float:
    """A normalizer's value as a float, checked; for paths that read it anyway (the CPU kernel)."""
    return _check_normalizer(float(normalizer), normalizer)


def _check_normalizer(value: float, given: Any) -> float:
    """The normalizer is what ``mean`` divides by, whatever its type: finite and >= 0 (0 included: the
    global count of a batch whose every target is ignored, see ``zero_if_all_ignored``)."""
    if not 0.0 <= value < math.inf:  # False for NaN too
        raise ValueError(f"normalizer must be a finite number >= 0 (what mean divides by), got {given!r}")
    return value


def _host_value(array: Any) -> float | None:
    """A 0-d array's value where reading it costs no device synchronisation (NumPy, a CPU tensor outside
    torch.compile's tracing, a concrete JAX array on the CPU), else None: such a normalizer (a CUDA tensor,
    a JAX array on an accelerator, a JAX tracer) is checked where it is used, where a bad value turns the
    loss into NaN."""
    if isinstance(array, (np.ndarray, np.generic)):
        return float(array)
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
        # A concrete JAX array on the host (an eager call, or a constant closed over by jit): reading it
        # costs no device round trip. On an accelerator it would, and the NaN rule applies instead.
        if all(d.platform == "cpu" for d in array.devices()):
            return float(array)
        return None
    if type(array).__module__.startswith("torch") and getattr(getattr(array, "device", None), "type", None) == "cpu":
        import torch

        if not torch.compiler.is_compiling():
            try:
                return float(array.detach())
            except RuntimeError:  # a tensor under a transform (vmap) has no single value to read
                return None
    return None


def loss_shape(xp: Any, input: Any, target: Any, axis: Any, *, allow_probabilities: bool) -> LossShape:
    """Check the input/target pair and say where the classes are."""
    require_floating(xp, input, "input")
    shape = tuple(map(int, input.shape))
    class_axis = resolve_axis(axis, len(shape), torch_rule=True)
    n_classes = shape[class_axis]
    if n_classes == 0:  # torch returns NaN, 0 or raises depending on the options; no class can be a target
        raise ValueError(f"input of shape {shape} has no classes on axis {class_axis}: expected at least one")
    batch_shape = shape[:class_axis] + shape[class_axis + 1 :]
    target_shape = tuple(map(int, target.shape))
    if is_floating(xp, target.dtype):
        if not allow_probabilities:
            raise TypeError(f"target must hold class indices (an integer dtype), got {dtype_name(target.dtype)}")
        if target_shape != shape:
            raise ValueError(
                f"a floating target holds class probabilities and must have the input's shape "
                f"{shape}, got {target_shape} (class-index targets need an integer dtype)"
            )
        return LossShape(class_axis, n_classes, batch_shape, probability_target=True)
    if not is_integral(xp, target.dtype):
        kinds = "an integer dtype (class indices)"
        if allow_probabilities:
            kinds += " or a floating dtype (class probabilities)"
        raise TypeError(f"target must have {kinds}, got {dtype_name(target.dtype)}")
    if target_shape != batch_shape:
        raise ValueError(
            f"target shape {target_shape} does not match input shape {shape} with classes on axis "
            f"{class_axis}: expected target shape {batch_shape}"
        )
    return LossShape(class_axis, n_classes, batch_shape, probability_target=False)


def check_target_options(probability_target: bool, opts: LossOptions) -> None:
    """Options that a probability target cannot take (torch raises for the same)."""
    if probability_target and opts.ignore_index >= 0:
        raise ValueError(
            f"ignore_index is not supported for floating point target (class probabilities): got "
            f"ignore_index={opts.ignore_index}; leave it negative (the default -100) or pass class indices"
        )


def index_dtype(xp: Any, dtype: Any, ignore_index: int) -> Any:
    """A signed integer dtype that holds every value of ``dtype`` and ``ignore_index``.

    Comparing a uint8 target with ignore_index=-100 is only well defined in a signed type; int32
    suffices for everything but 64-bit targets (and keeps JAX, which lacks int64 by default, quiet).
    """
    if xp.iinfo(dtype).bits == 64 or not -(2**31) <= ignore_index < 2**31 or dtype_name(dtype) == "uint32":
        return xp.int64
    return xp.int32


def is_traced(x: Any) -> bool:
    """Whether ``x`` is a JAX tracer (inside ``jit``, ``vmap``, ``grad``...), whose values cannot be read.

    Nothing is imported: a JAX array can only exist once JAX is.
    """
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.core.Tracer)


def check_class_indices(
    xp: Any, target: Any, n_classes: int, ignore_index: int, *, name: str = "target", ignorable: bool = True
) -> None:
    """IndexError naming a target value outside [0, n_classes) that is not ignore_index.

    ``name`` is what the message calls the values (optax's drop-ins: "labels"); ``ignorable=False``
    (an API without ignore_index, which passes an in-range one) leaves ignore_index out of the message.

    A traced JAX target has no values to check: the check is skipped, and the reference gives such an
    element a NaN weight, so that its loss, the reductions over it and its gradient are NaN.
    """
    if math.prod(target.shape) == 0 or is_traced(target):
        return
    if type(target).__module__.startswith("jax"):
        # A concrete JAX array, e.g. labels closed over by a jitted function: its values are read on the
        # host, since JAX operations on it would be staged into the trace and could not be read.
        import array_api_compat.numpy as xp

        target = np.asarray(target)
    if isinstance(target, np.ndarray):
        # One vectorised pass for the common case of no offender (the generic path below makes four).
        outside = (target < 0) | (target >= n_classes)
        if not outside.any() or not (outside & (target != ignore_index)).any():
            return
    t = xp.astype(target, index_dtype(xp, target.dtype, ignore_index))
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if not bool(xp.any(bad)):
        return
    # Name the largest offender, or the most negative one when none is too large.
    too_large = bad & (t >= n_classes)
    if bool(xp.any(too_large)):
        value = int(xp.max(xp.where(too_large, t, xp.zeros_like(t))))
    else:
        value = int(xp.min(xp.where(bad, t, xp.zeros_like(t))))
    ignored = f", or {name} == ignore_index ({ignore_index})" if ignorable else ""
    raise IndexError(
        f"{name} value {value} is out of range for {n_classes} classes: expected 0 <= {name} < {n_classes}{ignored}"
    )


def check_weight(xp: Any, weight: Any, n_classes: int) -> None:
    require_floating(xp, weight, "weight")
    if tuple(weight.shape) != (n_classes,):
        raise ValueError(
            f"weight must be a 1-D array with one entry per class ({n_classes},), got shape {tuple(weight.shape)}"
        )


def check_grad_output(grad_output: Any, loss_shape_: tuple[int, ...], reduction: str) -> None:
    if reduction == "none":
        if grad_output is None:
            raise ValueError(
                f"grad_output is required with reduction='none': pass the upstream gradient of shape {loss_shape_}"
            )
        shape = tuple(int(s) for s in getattr(grad_output, "shape", ()))
        if shape != loss_shape_:
            raise ValueError(f"grad_output must have the loss shape {loss_shape_}, got {shape}")
    elif grad_output is not None:
        shape = tuple(int(s) for s in getattr(grad_output, "shape", ()))
        if shape != ():
            raise ValueError(f"grad_output must be a scalar with reduction={reduction!r}, got shape {shape}")


def check_out(out: Any, input: Any, target: Any) -> None:
    """``out`` for the gradient: a writeable, C-contiguous NumPy array of the input's shape and dtype
    that is the input itself (an in-place gradient) or shares no memory with the input or the target
    (the kernel reads them while writing it)."""
    if not isinstance(out, np.ndarray) or not isinstance(input, np.ndarray):
        raise TypeError(f"out must be a NumPy array for a NumPy input, got {type(out).__name__}")
    if out.shape != input.shape or out.dtype != input.dtype:
        raise ValueError(
            f"out must have the input's shape {input.shape} and dtype {dtype_name(input.dtype)}, "
            f"got shape {out.shape} and dtype {dtype_name(out.dtype)}"
        )
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out must be a writeable, C-contiguous array")
    same_as_input = out.ctypes.data == input.ctypes.data and input.flags.c_contiguous
    if (np.shares_memory(out, input) and not same_as_input) or np.shares_memory(out, target):
        raise ValueError("out must be the input itself or share no memory with the input or the target")
