"""crossent's C++ kernel inside jitted JAX programs on the CPU: XLA custom calls through the XLA FFI.

The handlers (src/crossent/_native/xla_ffi.cpp) are compiled into crossent's native module when jaxlib's
headers were found at build time (install jax before crossent); :func:`available` says whether they
were, and registers them with XLA on first use. XLA hands the handler its own buffers, which the kernel
reads and writes in place, on crossent's OpenMP threads (:func:`crossent.set_num_threads`), with the
same bits as the kernel called from NumPy for any thread count.

Arrays arrive in the kernel's (outer, classes, inner) view; crossent.jax lays them out and validates
everything static (shapes, dtypes, options) before calling here. What cannot be checked inside ``jit``
gives NaN, never a finite wrong number: a class index outside [0, classes) that is not ``ignore_index``
makes its row's loss and gradient NaN for ``reduction="none"``, and the whole loss and gradient NaN
for ``mean`` and ``sum``; so does a negative, infinite or NaN normalizer (0 divides by 0, as everywhere).

Under ``vmap`` the call keeps the batch (``vmap_method="expand_dims"``): each batch item is one kernel
call inside one custom call, and operands shared by the batch are not copied.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _native
from .._validate import LossOptions

__all__ = ["available", "cross_entropy_fwd", "nll_loss_fwd", "softmax_op", "supports"]

_CROSS_ENTROPY, _NLL_LOSS, _SOFTMAX = "crossent_cross_entropy", "crossent_nll_loss", "crossent_softmax"
_SOFTMAX_OPS = {"log_softmax": 0, "softmax": 1, "logsumexp": 2}  # SoftmaxOp in kernel_api.hpp
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}  # Reduction in kernel_api.hpp
_DTYPES = frozenset(map(jnp.dtype, ("float32", "float64", "float16", "bfloat16")))
_INDEX_DTYPES = frozenset(map(jnp.dtype, ("int32", "int64", "uint8")))
_VMAP = "expand_dims"


@functools.cache
def _register() -> bool:
    """Register the handlers with XLA for the CPU, once; False where they are not built."""
    ext = _native.extension
    if ext is None or not hasattr(ext, "xla_targets"):
        return False
    for name, capsule in ext.xla_targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    _native.xla_registered = True
    return True


def available() -> bool:
    """Whether the FFI targets are built, registered with XLA, and JAX's default backend is the CPU."""
    return _register() and jax.default_backend() == "cpu"


def supports(dtype: Any) -> bool:
    """Whether the kernel computes logits of ``dtype`` (float32, float64, float16, bfloat16)."""
    try:
        return jnp.dtype(dtype) in _DTYPES
    except TypeError:
        return False


def _compute_dtype(dtype: Any) -> Any:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _index_target(target: Any, classes: int, ignore_index: int) -> Any:
    """Class indices the kernel reads (int32, int64, uint8), the same values where they are in range."""
    dtype = jnp.dtype(target.dtype)
    if dtype in _INDEX_DTYPES:
        return target
    if jnp.issubdtype(dtype, jnp.signedinteger) and dtype.itemsize < 4:
        return target.astype(jnp.int32)
    if jnp.issubdtype(dtype, jnp.unsignedinteger) and dtype.itemsize < 4:
        return target.astype(jnp.int32)
    # Wider unsigned (or int64 without x64): a value past int32 would wrap round, possibly onto
    # ignore_index; every value >= classes is out of range, so one out-of-range value stands for all.
    wide = jnp.int64 if jax.config.read("jax_enable_x64") else jnp.int32
    if jnp.issubdtype(dtype, jnp.unsignedinteger):
        sentinel = classes if ignore_index != classes else classes + 1
        return jnp.where(target >= classes, sentinel, target).astype(wide)
    return target.astype(wide)


def _call(target_name: str, results: Any, aliases: dict[int, int] | None = None) -> Any:
    if not _register():
        raise RuntimeError(f"crossent's XLA FFI handlers are not built into this installation ({target_name})")
    return jax.ffi.ffi_call(target_name, results, vmap_method=_VMAP, input_output_aliases=aliases)


def _loss_operands(
    target: Any, weight: Any, normalizer: Any, dtype: Any, classes: int, probability: bool, opts: LossOptions
) -> tuple[list[Any], dict[str, Any]]:
    cdt = _compute_dtype(dtype)
    t = target.astype(dtype) if probability else _index_target(target, classes, opts.ignore_index)
    operands = [t]
    if weight is not None:
        operands.append(jnp.asarray(weight, cdt))
    if normalizer is not None:
        # A runtime operand (it may be traced); the handler reads it into LossCall in one place.
        operands.append(jnp.asarray(normalizer, cdt).reshape(()))
    attrs = {
        "ignore_index": np.int64(opts.ignore_index),
        "reduction": np.int64(_REDUCTIONS[opts.reduction]),
        "zero_if_all_ignored": np.bool_(opts.zero_if_all_ignored),
        "has_weight": np.bool_(weight is not None),
        "has_normalizer": np.bool_(normalizer is not None),
    }
    return operands, attrs


def _layout_attrs(outer: int, classes: int, inner: int) -> dict[str, Any]:
    return {"outer": np.int64(outer), "classes": np.int64(classes), "inner": np.int64(inner)}


def _loss_shape(outer: int, inner: int, dtype: Any, reduction: str) -> jax.ShapeDtypeStruct:
    # Per-row losses come back in the compute dtype (as the kernel writes them) and are rounded here,
    # as NumPy rounds them; the reduced loss is rounded once from double inside the handler.
    if reduction == "none":
        return jax.ShapeDtypeStruct((outer, inner), _compute_dtype(dtype))
    return jax.ShapeDtypeStruct((), dtype)


def cross_entropy_fwd(
    x: Any,
    target: Any,
    weight: Any,
    normalizer: Any,
    *,
    outer: int,
    classes: int,
    inner: int,
    probability: bool,
    opts: LossOptions,
    want_grad: bool,
    reuse_logits: bool = False,
) -> tuple[Any, Any]:
    """The loss of (outer, classes, inner) logits, and d(loss)/d(x) for a unit upstream gradient.

    Parameters
    ----------
    x : jax.Array, (outer, classes, inner), float32, float64, float16 or bfloat16
    target : jax.Array
        (outer, inner) class indices (any integer dtype), or (outer, classes, inner) probabilities.
    weight : jax.Array or None
        (classes,) class weights, taken in the compute dtype (float64 for float64 logits, else float32).
    normalizer : jax.Array or None
        A 0-d divisor for ``mean`` in place of torch's; may be traced. Not positive (or NaN): NaN loss.
    opts : crossent._validate.LossOptions
        The validated static options (``opts.normalizer`` is ignored: ``normalizer`` is the operand).
    reuse_logits : bool
        Let the gradient take x's buffer (XLA aliases the output to the operand) with the classes
        contiguous (``inner == 1``); not under ``vmap`` of an unbatched x (the shapes would differ).

    Returns
    -------
    loss : jax.Array
        0-d for mean and sum, (outer, inner) for none, in x's dtype.
    grad : jax.Array or None
        x's shape and dtype when ``want_grad``: per row for ``none`` (multiply by the row's upstream).
    """
    dtype = x.dtype
    operands, attrs = _loss_operands(target, weight, normalizer, dtype, classes, probability, opts)
    results = [_loss_shape(outer, inner, dtype, opts.reduction)]
    if want_grad:
        results.append(jax.ShapeDtypeStruct((outer, classes, inner), dtype))
    # The gradient may take the logits' buffer (XLA aliases it: no fresh gradient-sized buffer, whose
    # first touch costs a page fault per 4 KiB; where the logits stay live, XLA copies them first).
    # Measured at 4096x32768 float32 (2-core VM, value_and_grad under jit, one process): logits made
    # inside the program, as in a model, 1.0 s aliased against 1.5 s with a fresh gradient; logits
    # passed as a (non-donated) argument, which XLA must copy, 0.80 s against 0.71 s. The model's case
    # decides. The kernel overwrites logits row by row only with the classes contiguous (inner == 1);
    # it sees the same pointer for both and reads each row before writing it.
    aliases = {0: 1} if want_grad and reuse_logits and inner == 1 else None
    call = _call(_CROSS_ENTROPY, results, aliases)
    out = call(
        x, *operands, **_layout_attrs(outer, classes, inner), **attrs,
        probability=np.bool_(probability),
        label_smoothing=np.float64(opts.label_smoothing),
        z_loss=np.float64(opts.z_loss),
        softcap=np.float64(opts.softcap or 0.0),
    )  # fmt: skip
    loss = out[0].astype(dtype)
    return loss, (out[1] if want_grad else None)


def nll_loss_fwd(
    x: Any, target: Any, weight: Any, normalizer: Any, *, outer: int, classes: int, inner: int, opts: LossOptions
) -> Any:
    """nll_loss of (outer, classes, inner) log-probabilities and (outer, inner) class indices; the loss
    as :func:`cross_entropy_fwd` returns it (out-of-range indices: NaN)."""
    dtype = x.dtype
    operands, attrs = _loss_operands(target, weight, normalizer, dtype, classes, False, opts)
    call = _call(_NLL_LOSS, _loss_shape(outer, inner, dtype, opts.reduction))
    return call(x, *operands, **_layout_attrs(outer, classes, inner), **attrs).astype(dtype)


def softmax_op(x: Any, *, outer: int, classes: int, inner: int, op: str) -> Any:
    """log_softmax or softmax of (outer, classes, inner) x over classes, in x's shape and dtype; or
    logsumexp, (outer, inner)."""
    shape = (outer, inner) if op == "logsumexp" else (outer, classes, inner)
    call = _call(_SOFTMAX, jax.ShapeDtypeStruct(shape, x.dtype))
    return call(x, **_layout_attrs(outer, classes, inner), op=np.int64(_SOFTMAX_OPS[op]))
