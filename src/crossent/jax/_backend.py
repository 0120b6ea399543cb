"""Which implementation computes a crossent.jax call: the native kernel inside XLA (an FFI custom
call, CPU only) or a jnp implementation of the same semantics (crossent's Array-API reference, which
XLA fuses, on every platform). The one place that chooses.

``"auto"`` (the default) lowers to the FFI target on the CPU and to jnp elsewhere
(``lax.platform_dependent``: the choice is made when XLA compiles, per platform); ``"ffi"`` and
``"jnp"`` force one. The setting is read when a function is traced: a function that ``jax.jit`` has
already compiled keeps the implementation it was traced with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from .. import _reference as reference
from .._validate import LossOptions, LossShape
from . import _ffi

BACKENDS = ("auto", "ffi", "jnp")
_state = {"backend": "auto"}


class _Previous(str):
    """The previous setting, which also restores itself when used as a context manager."""

    def __enter__(self) -> str:
        return str(self)

    def __exit__(self, *exc: Any) -> None:
        _state["backend"] = str(self)


def use_backend(name: str) -> str:
    """Choose the implementation of later traces: ``"auto"``, ``"ffi"`` or ``"jnp"``.

    Returns the previous setting; ``with use_backend("jnp"): ...`` restores it on exit. ``"ffi"``
    raises at the next call if the FFI target is not available (see :func:`ffi_available`).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = _Previous(_state["backend"])
    _state["backend"] = name
    return previous


def current_backend() -> str:
    return _state["backend"]


def ffi_available() -> bool:
    """Whether crossent's XLA FFI target is registered (the native kernel under ``jit`` on the CPU)."""
    return _ffi.available()


def _use_ffi(dtype: Any) -> str | None:
    """ "ffi", "auto" (FFI on the CPU, jnp elsewhere) or None (jnp) for a call on ``dtype``."""
    name = _state["backend"]
    if name == "jnp":
        return None
    usable = _ffi.available() and _ffi.supports(dtype)
    if name == "ffi":
        if not usable:
            raise RuntimeError(
                f"backend 'ffi' was forced but crossent's XLA FFI target "
                f"{'does not take ' + str(dtype) if _ffi.available() else 'is not available'}"
            )
        return "ffi"
    return "auto" if usable else None


def _arrays(args: Any) -> Any:
    # Inside a custom rule JAX may hand over its literal constants (NumPy-like, with a device named by
    # a string), which jnp's array constructors cannot place beside: make them JAX arrays.
    return jax.tree_util.tree_map(jnp.asarray, args)


def _varying(a: Any) -> frozenset[Any]:
    """The mesh axes over which ``a`` varies inside shard_map (none outside it)."""
    return frozenset(jax.typeof(a).manual_axis_type.varying)


def _dispatch(dtype: Any, ffi_fn: Any, jnp_fn: Any, *args: Any) -> Any:
    """``jnp_fn(*args)``, or ``ffi_fn(*args)`` where the FFI runs. ``ffi_fn(*args, batched=...)``: under
    ``vmap`` it is called with ``batched=True`` and vmapped, the FFI call keeping the batch (one custom
    call, ``vmap_method="expand_dims"``), so that vmap runs the kernel too; ``batched=False`` may let the
    gradient take the logits' buffer, which a batch's broadcast operands could not give."""
    args = _arrays(args)
    mode = _use_ffi(dtype)
    if mode is None:
        return jnp_fn(*args)
    batched = jax.custom_batching.custom_vmap(functools.partial(ffi_fn, batched=False))

    @batched.def_vmap
    def _rule(axis_size: int, in_batched: Any, *xs: Any) -> Any:
        axes = [jax.tree_util.tree_map(lambda b: 0 if b else None, b) for b in in_batched]
        out = jax.vmap(functools.partial(ffi_fn, batched=True), in_axes=tuple(axes))(*xs)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    def on_cpu(*xs: Any) -> Any:
        # Inside shard_map a custom call's results are typed as invariant over the mesh axes; they vary
        # as its operands do (and platform_dependent's branches must agree with the jnp one's types).
        axes = frozenset().union(*(_varying(a) for a in xs if a is not None))
        out = batched(*xs)
        if not axes:
            return out
        return jax.tree_util.tree_map(lambda o: jax.lax.pcast(o, tuple(sorted(axes - _varying(o))), to="varying"), out)

    if mode == "ffi":
        return on_cpu(*args)
    return jax.lax.platform_dependent(*args, cpu=on_cpu, default=jnp_fn)


def _dims(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :])


def _with_normalizer(opts: LossOptions, normalizer: Any) -> LossOptions:
    return opts if normalizer is None else dataclasses.replace(opts, normalizer=normalizer)


def reference_loss(x: Any, target: Any, weight: Any, normalizer: Any, shape: LossShape, opts: LossOptions) -> Any:
    """The specification itself (differentiable jnp): for tangents of targets, weights, normalizers."""
    x, target, weight, normalizer = _arrays((x, target, weight, normalizer))
    return reference.cross_entropy(jnp, x, target, weight, shape, _with_normalizer(opts, normalizer))


def loss_and_unit_grad(
    x: Any, target: Any, weight: Any, normalizer: Any, shape: LossShape, opts: LossOptions, *, want_grad: bool
) -> tuple[Any, Any]:
    """The loss and d(loss)/d(x) for a unit upstream gradient (one per row for ``none``), in one sweep."""

    def by_jnp(x: Any, target: Any, weight: Any, normalizer: Any) -> tuple[Any, Any]:
        o = _with_normalizer(opts, normalizer)
        if not want_grad:
            return reference.cross_entropy(jnp, x, target, weight, shape, o), jnp.zeros((0,), x.dtype)
        ones = jnp.ones(shape.batch_shape, x.dtype) if opts.reduction == "none" else None
        return reference.cross_entropy_and_grad(jnp, x, target, weight, shape, o, ones)

    def by_ffi(x: Any, target: Any, weight: Any, normalizer: Any, *, batched: bool) -> tuple[Any, Any]:
        outer, classes, inner = _dims(tuple(x.shape), shape.class_axis)
        t = target.reshape((outer, classes, inner) if shape.probability_target else (outer, inner))
        loss, grad = _ffi.cross_entropy_fwd(
            x.reshape(outer, classes, inner), t, weight, normalizer, outer=outer, classes=classes, inner=inner,
            probability=shape.probability_target, opts=opts, want_grad=want_grad, reuse_logits=not batched,
        )  # fmt: skip
        loss = loss.reshape(shape.batch_shape) if opts.reduction == "none" else loss
        return loss, grad.reshape(x.shape) if want_grad else jnp.zeros((0,), x.dtype)

    loss, grad = _dispatch(x.dtype, by_ffi, by_jnp, x, target, weight, normalizer)
    return loss, grad if want_grad else None


def nll_loss(x: Any, target: Any, weight: Any, normalizer: Any, shape: LossShape, opts: LossOptions) -> Any:
    def by_jnp(x: Any, target: Any, weight: Any, normalizer: Any) -> Any:
        return reference.nll_loss(jnp, x, target, weight, shape, _with_normalizer(opts, normalizer))

    def by_ffi(x: Any, target: Any, weight: Any, normalizer: Any, *, batched: bool) -> Any:
        outer, classes, inner = _dims(tuple(x.shape), shape.class_axis)
        loss = _ffi.nll_loss_fwd(
            x.reshape(outer, classes, inner), target.reshape(outer, inner), weight, normalizer,
            outer=outer, classes=classes, inner=inner, opts=opts,
        )  # fmt: skip
        return loss.reshape(shape.batch_shape) if opts.reduction == "none" else loss

    return _dispatch(x.dtype, by_ffi, by_jnp, x, target, weight, normalizer)


def softmax_op(x: Any, axis: int, op: str) -> Any:
    """log_softmax, softmax or logsumexp (without keepdims) over ``axis``."""

    def by_jnp(x: Any) -> Any:
        if op == "logsumexp":
            return reference.logsumexp(jnp, x, axis, False)
        return getattr(reference, op)(jnp, x, axis)

    def by_ffi(x: Any, *, batched: bool) -> Any:
        outer, classes, inner = _dims(tuple(x.shape), axis)
        out = _ffi.softmax_op(x.reshape(outer, classes, inner), outer=outer, classes=classes, inner=inner, op=op)
        return out.reshape(x.shape[:axis] + x.shape[axis + 1 :] if op == "logsumexp" else x.shape)

    return _dispatch(x.dtype, by_ffi, by_jnp, x)
