"""crossent's losses and softmax family on JAX arrays: validated at trace time, differentiable through
``jax.custom_jvp`` (so ``grad``, ``jvp``, ``vmap``, ``jit`` and ``remat`` all apply), computed by
``_backend``."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _reference as reference
from .. import _validate as validate
from .._functional import check_integers_fit
from .._reference.softmax import batch_dtype, compute_dtype
from .._validate import LossOptions, LossShape
from . import _backend


def as_jax(a: Any) -> Any:
    """A JAX array (tracers included) as it is; NumPy arrays and Python data converted, refusing integers
    that JAX would narrow (int64 without x64)."""
    if a is None or isinstance(a, jax.Array):
        return a
    converted = jnp.asarray(a)
    check_integers_fit(jnp, a, converted)
    return converted


def _is_zero(tangent: Any) -> bool:
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _perturbed_jvp(fn: Any, primals: tuple[Any, ...], tangents: tuple[Any, ...], skip: int = 0) -> Any:
    """The tangent of ``fn(*primals)`` along the non-zero ``tangents`` (positions from ``skip`` on),
    with the other arguments held fixed; None if there are none."""
    moving = [i for i in range(skip, len(primals)) if not _is_zero(tangents[i])]
    if not moving:
        return None

    def along(*values: Any) -> Any:
        args = list(primals)
        for i, v in zip(moving, values, strict=True):
            args[i] = v
        return fn(*args)

    return jax.jvp(along, tuple(primals[i] for i in moving), tuple(tangents[i] for i in moving))[1]


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _cross_entropy(x: Any, target: Any, weight: Any, normalizer: Any, shape: LossShape, opts: LossOptions) -> Any:
    return _backend.loss_and_unit_grad(x, target, weight, normalizer, shape, opts, want_grad=False)[0]


def _cross_entropy_jvp(shape: LossShape, opts: LossOptions, primals: Any, tangents: Any) -> Any:
    x, target, weight, normalizer = primals
    dx = tangents[0]
    # The loss and d(loss)/d(x) come from one sweep; the tangent is linear in dx, so that reverse mode
    # (JAX transposes it) multiplies the saved gradient by the upstream one and recomputes nothing;
    # XLA removes that multiply for the literal 1 that grad and value_and_grad seed.
    loss, grad = _backend.loss_and_unit_grad(x, target, weight, normalizer, shape, opts, want_grad=not _is_zero(dx))
    cdt = compute_dtype(jnp, x.dtype)
    out = jnp.zeros(loss.shape, cdt)
    if grad is not None:
        axes = None if opts.reduction != "none" else shape.class_axis
        out = jnp.sum(grad.astype(cdt) * dx.astype(cdt), axis=axes)
    # Probability targets, class weights and a normalizer array: the specification's own tangent.
    rest = _perturbed_jvp(
        lambda x, t, w, n: _backend.reference_loss(x, t, w, n, shape, opts),
        (x, target, weight, normalizer),
        tangents,
        skip=1,
    )
    if rest is not None:
        out = out + rest.astype(cdt)
    return loss, out.astype(loss.dtype)


_cross_entropy.defjvp(_cross_entropy_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _nll_loss(x: Any, target: Any, weight: Any, normalizer: Any, shape: LossShape, opts: LossOptions) -> Any:
    return _backend.nll_loss(x, target, weight, normalizer, shape, opts)


def _nll_loss_jvp(shape: LossShape, opts: LossOptions, primals: Any, tangents: Any) -> Any:
    loss = _nll_loss(*primals, shape, opts)

    def spec(x: Any, target: Any, weight: Any, normalizer: Any) -> Any:
        x, target, weight, normalizer = _backend._arrays((x, target, weight, normalizer))
        return reference.nll_loss(jnp, x, target, weight, shape, _backend._with_normalizer(opts, normalizer))

    tangent = _perturbed_jvp(spec, tuple(primals), tuple(tangents))
    return loss, jnp.zeros_like(loss) if tangent is None else tangent.astype(loss.dtype)


_nll_loss.defjvp(_nll_loss_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _softmax_op(x: Any, axis: int, op: str) -> Any:
    return _backend.softmax_op(x, axis, op)


@_softmax_op.defjvp
def _softmax_op_jvp(axis: int, op: str, primals: Any, tangents: Any) -> Any:
    (x,), (dx,) = primals, tangents
    out = _softmax_op(x, axis, op)

    def spec(x: Any) -> Any:
        x = jnp.asarray(x)
        return reference.logsumexp(jnp, x, axis, False) if op == "logsumexp" else getattr(reference, op)(jnp, x, axis)

    return out, jax.jvp(spec, (x,), (dx,))[1]


def _unsigned_without_wrapping(target: Any, n_classes: int, ignore_index: int) -> Any:
    """uint32 class indices as int32 without x64 (JAX cannot hold the int64 the comparison needs):
    values past the classes become the first index past them that is not ignore_index, so that no large
    value wraps round onto a class or onto ignore_index."""
    if validate.dtype_name(target.dtype) != "uint32" or jax.config.read("jax_enable_x64"):
        return target
    beyond = n_classes if ignore_index != n_classes else n_classes + 1
    keep = (target < n_classes) | ((ignore_index >= 0) & (target == jnp.uint32(max(ignore_index, 0))))
    return jnp.where(keep, target.astype(jnp.int32), jnp.int32(beyond))


def _prepare(
    input: Any, target: Any, weight: Any, axis: Any, opts: LossOptions, *, allow_probabilities: bool
) -> tuple[Any, Any, Any, Any, LossShape, LossOptions]:
    input, target, weight = as_jax(input), as_jax(target), as_jax(weight)
    shape = validate.loss_shape(jnp, input, target, axis, allow_probabilities=allow_probabilities)
    if weight is not None:
        validate.check_weight(jnp, weight, shape.n_classes)
    validate.check_target_options(shape.probability_target, opts)
    if not shape.probability_target:
        validate.check_class_indices(jnp, target, shape.n_classes, opts.ignore_index)  # skipped when traced
        target = _unsigned_without_wrapping(target, shape.n_classes, opts.ignore_index)
    normalizer = None if opts.normalizer is None else as_jax(opts.normalizer)
    if normalizer is not None and not jnp.issubdtype(normalizer.dtype, jnp.floating):
        normalizer = normalizer.astype(batch_dtype(jnp))
    # The options travel as static (hashable) data; an array normalizer travels as an operand.
    return input, target, weight, normalizer, shape, dataclasses.replace(opts, normalizer=None)


def cross_entropy(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    axis: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
) -> jax.Array:
    r"""Cross-entropy between logits and class indices or class probabilities, as PyTorch computes it,
    for JAX: usable under ``jit``, ``grad``, ``value_and_grad``, ``vmap``, ``jvp``, ``checkpoint`` and
    ``shard_map``.

    The arguments, options, shapes and math are those of :func:`crossent.cross_entropy` (torch's
    ``cross_entropy`` plus the keyword-only ``axis``, ``z_loss``, ``softcap``, ``normalizer`` and
    ``zero_if_all_ignored``). float16 and bfloat16 are computed in float32; float64 needs
    ``jax_enable_x64``. NumPy arrays and Python data are converted to JAX arrays.

    Gradients: with respect to the logits from the same sweep as the loss (``jax.custom_jvp``; reverse
    mode multiplies the saved gradient by the upstream one); with respect to probability targets, class
    weights and an array ``normalizer`` as autodiff of the specification gives them (torch gives the
    first two as well).

    Errors: shapes, dtypes and options raise at trace time, as :func:`crossent.cross_entropy` raises.
    A class index outside ``[0, C)`` that is not ``ignore_index`` raises IndexError when the target is
    concrete (an eager call, or a target closed over by ``jit``); inside a trace its value is unknown,
    and that element's loss is NaN, so that ``mean`` and ``sum`` are NaN too and its gradient row is
    NaN: never a finite wrong number. To get an error under ``jit`` instead, check the targets with
    :func:`check_class_indices` inside ``jax.experimental.checkify.checkify``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, crossent.jax as cj
    >>> x = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    >>> y = jnp.array([0, 2])
    >>> print(f"{jax.jit(cj.cross_entropy)(x, y):.4f}")  # (0.1698 + 0.1520) / 2, by hand
    0.1609
    >>> g = jax.grad(cj.cross_entropy)(x, y, label_smoothing=0.1)
    >>> g.shape
    (2, 3)
    """
    opts = validate.loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    input, target, weight, norm, shape, static = _prepare(input, target, weight, axis, opts, allow_probabilities=True)
    return _cross_entropy(input, target, weight, norm, shape, static)


def nll_loss(
    input: Any,
    target: Any,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    axis: int | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
) -> jax.Array:
    """The negative log-likelihood of class indices under log-probabilities, for JAX.

    As :func:`crossent.nll_loss`, with the transformations and the out-of-range rule of
    :func:`cross_entropy`.

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> logp = jnp.log(jnp.array([[0.25, 0.75], [0.5, 0.5]]))
    >>> print(f"{cj.nll_loss(logp, jnp.array([1, 0])):.4f}")
    0.4904
    """
    opts = validate.loss_options(
        reduction=reduction, ignore_index=ignore_index, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored
    )
    input, target, weight, norm, shape, static = _prepare(input, target, weight, axis, opts, allow_probabilities=False)
    return _nll_loss(input, target, weight, norm, shape, static)


def _over_axes(x: Any, axis: Any, op: str, keepdims: bool = False) -> Any:
    """``op`` over ``axis``: one axis directly; several (a tuple, or None for every axis, as jax.nn takes
    them; a 0-d input has none to name but 0, -1, None or ()) moved last and flattened into one, the
    result laid back out. Reducing over no axis is an op over one element per position."""
    x = as_jax(x)
    validate.require_floating(jnp, x, "x")
    if isinstance(axis, int) and not isinstance(axis, bool) and x.ndim > 0:
        ax = validate.resolve_axis(axis, x.ndim, torch_rule=False)
        out = _softmax_op(x, ax, op)
        return jnp.expand_dims(out, ax) if keepdims and op == "logsumexp" else out
    axes = validate.resolve_axes(axis, x.ndim)  # ValueError/TypeError naming a bad axis
    kept = tuple(a for a in range(x.ndim) if a not in axes)
    shape = tuple(x.shape)
    moved = jnp.transpose(x, kept + axes)
    flat = moved.reshape(*(shape[a] for a in kept), math.prod(shape[a] for a in axes))
    out = _softmax_op(flat, len(kept), op)
    if op == "logsumexp":
        return out.reshape(tuple(1 if a in axes else n for a, n in enumerate(shape))) if keepdims else out
    return jnp.transpose(out.reshape(moved.shape), tuple(np.argsort(kept + axes)))


def logsumexp(x: Any, axis: int | tuple[int, ...] | None = -1, keepdims: bool = False) -> jax.Array:
    """``log(sum(exp(x), axis))`` without overflow, for JAX (see :func:`crossent.logsumexp`).

    ``axis`` takes what ``jax.nn.logsumexp`` takes: an int, a tuple of ints (reduced together; ``()``
    reduces nothing and returns ``x``) or None (every axis); a 0-d ``x`` also takes 0 or -1, as
    :func:`crossent.logsumexp`. An axis out of range or named twice raises ValueError, one that is not
    an int TypeError.

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> print(f"{cj.logsumexp(jnp.array([100.0, 100.0])):.4f}")  # 100 + log 2
    100.6931
    >>> print(f"{cj.logsumexp(jnp.zeros((2, 3)), axis=None):.4f}")  # log 6
    1.7918
    """
    if not isinstance(keepdims, bool):
        raise TypeError(f"keepdims must be a bool, got {keepdims!r}")
    return _over_axes(x, axis, "logsumexp", keepdims)


def log_softmax(x: Any, axis: int | tuple[int, ...] | None = -1) -> jax.Array:
    """``x - logsumexp(x, axis)`` without overflow, for JAX (see :func:`crossent.log_softmax`).

    ``axis`` as for :func:`logsumexp` (jax.nn.log_softmax's): with several axes the log-probabilities
    are normalised over all of them together.

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> [round(float(v), 4) for v in cj.log_softmax(jnp.array([0.0, jnp.log(3.0)]))]
    [-1.3863, -0.2877]
    """
    return _over_axes(x, axis, "log_softmax")


def softmax(x: Any, axis: int | tuple[int, ...] | None = -1) -> jax.Array:
    """``exp(x) / sum(exp(x), axis)`` without overflow, for JAX (see :func:`crossent.softmax`).

    ``axis`` as for :func:`logsumexp` (jax.nn.softmax's): with several axes the probabilities sum to 1
    over all of them together.

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> [float(v) for v in cj.softmax(jnp.array([1000.0, 1000.0]))]
    [0.5, 0.5]
    """
    return _over_axes(x, axis, "softmax")


def check_class_indices(target: Any, n_classes: int, ignore_index: int = -100) -> None:
    """Under ``jax.experimental.checkify.checkify``: an error for a class index outside
    ``[0, n_classes)`` that is not ``ignore_index``, where a traced value cannot raise IndexError.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, crossent.jax as cj
    >>> from jax.experimental import checkify
    >>> def loss(x, y):
    ...     cj.check_class_indices(y, x.shape[-1])
    ...     return cj.cross_entropy(x, y)
    >>> err, value = jax.jit(checkify.checkify(loss))(jnp.zeros((2, 3)), jnp.array([0, 7]))
    >>> err.get()
    'target value out of range for 3 classes (expected 0 <= target < 3, or ignore_index -100)...'
    """
    from jax.experimental import checkify

    t = as_jax(target)
    n = validate.check_int(n_classes, "n_classes")
    ignore = validate.check_int(ignore_index, "ignore_index")
    if jnp.issubdtype(t.dtype, jnp.unsignedinteger):
        bad = t >= n
        if ignore >= 0:
            bad = bad & (t != ignore)
    else:
        bad = ((t < 0) | (t >= n)) & (t != ignore)
    checkify.check(
        ~jnp.any(bad),
        f"target value out of range for {n} classes (expected 0 <= target < {n}, or ignore_index {ignore})",
    )


__all__ = ["check_class_indices", "cross_entropy", "log_softmax", "logsumexp", "nll_loss", "softmax"]
_ = np  # NumPy data is accepted through as_jax
