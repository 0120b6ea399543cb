"""Drop-ins for optax's softmax cross-entropies: optax's signatures, shapes and values, crossent's
computation (the native kernel under ``jit`` on the CPU where its FFI target is available)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .. import _validate as validate
from ._functional import as_jax, cross_entropy


def _classes_last(logits: Any, axis: Any, *others: Any) -> tuple[Any, list[Any], int]:
    """``axis`` as one class axis: a tuple (or None, for all axes) is moved to the end and flattened, as
    optax flattens it (a label is then a flat index into those axes)."""
    ndim = logits.ndim
    if isinstance(axis, int) and not isinstance(axis, bool):
        return logits, list(others), validate.resolve_axis(axis, ndim, torch_rule=False)
    if axis is None:
        axes = tuple(range(ndim))
    elif isinstance(axis, tuple) and all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        axes = tuple(validate.resolve_axis(a, ndim, torch_rule=False) for a in axis)
    else:
        raise ValueError(f"axis must be an int, a tuple of ints or None, got {axis!r}")
    batch = tuple(a for a in range(ndim) if a not in axes)

    def flatten(a: Any) -> Any:
        if a is None or a.ndim != ndim:
            return a
        a = jnp.transpose(a, batch + axes)
        return a.reshape((*a.shape[: len(batch)], -1))

    return flatten(logits), [flatten(o) for o in others], len(batch)


def _row_mask(where: Any, ndim: int) -> bool:
    return where.ndim != ndim


def softmax_cross_entropy(logits: Any, labels: Any, axis: Any = -1, where: Any = None) -> jax.Array:
    r"""``optax.softmax_cross_entropy``: :math:`-\sum_j y_j \log\mathrm{softmax}(x)_j` per example.

    Parameters
    ----------
    logits : array, shape (..., C, ...)
        Unnormalised log-probabilities; the classes on ``axis``.
    labels : array
        Class probabilities (optax does not require them to sum to 1), broadcastable to ``logits``.
    axis : int or tuple of ints
        The class axis or axes.
    where : bool array, optional
        Elements to include: of the batch shape (an excluded example's loss is 0, with a zero
        gradient) or of the logits' shape (excluded logits take no part in the softmax or the sum).

    Returns
    -------
    jax.Array
        The loss per example, the logits' shape without ``axis``.

    Differences from optax: a logit of -inf where the label's probability is 0 contributes 0, as the
    limit p log p -> 0 gives it (optax multiplies 0 by -inf: NaN; ``optax.safe_softmax_cross_entropy``
    gives 0 too). bfloat16 and float16 logits are computed in float32 and the loss rounded once to
    the input dtype; optax computes the log-softmax and the sum in the input dtype, so its result can
    differ from crossent's by a unit in the last place of that dtype or more.

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    >>> [round(float(v), 4) for v in cj.softmax_cross_entropy(logits, labels)]
    [0.2761, 2.9518]
    """
    logits, labels = as_jax(logits), as_jax(labels)
    validate.require_floating(jnp, logits, "logits")
    dtype = jnp.result_type(logits, labels)
    labels = jnp.broadcast_to(labels, logits.shape)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(logits.dtype)  # one-hot integers are probabilities too
    if where is not None:
        where = as_jax(where)
        if not _row_mask(where, logits.ndim):  # per logit: excluded logits leave the softmax and the sum
            lse = jax.nn.logsumexp(logits, axis=axis, where=where, keepdims=True)
            return (-jnp.sum(jnp.where(where, labels * (logits - lse), 0), axis=axis)).astype(dtype)
    x, (t,), class_axis = _classes_last(logits, axis, labels)
    loss = cross_entropy(x, t, reduction="none", axis=class_axis).astype(dtype)
    return loss if where is None else jnp.where(where, loss, jnp.zeros((), dtype))


def softmax_cross_entropy_with_integer_labels(logits: Any, labels: Any, axis: Any = -1, where: Any = None) -> jax.Array:
    r"""``optax.softmax_cross_entropy_with_integer_labels``: :math:`\operatorname{logsumexp}(x) - x_y`
    per example.

    Parameters
    ----------
    logits : array, shape (..., C, ...)
        Unnormalised log-probabilities; the classes on ``axis`` (a tuple of axes is flattened, and a
        label is a flat index into them, as optax's).
    labels : integer array
        Class indices, the logits' shape without ``axis``.
    axis : int or tuple of ints
    where : bool array, optional
        As for :func:`softmax_cross_entropy` (per-logit masks leave the label's logit in).

    Returns
    -------
    jax.Array
        The loss per example.

    Raises
    ------
    IndexError
        A concrete label outside ``[0, C)``, naming it (C the number of classes on ``axis``).

    Differences from optax: a label outside ``[0, C)`` raises IndexError on concrete labels, and gives
    NaN under ``jit`` (optax gives NaN in both cases). Every integer value is a class index: there is no
    ignore_index here. bfloat16 and float16 logits are computed in float32 and the loss rounded once
    to the input dtype (optax's log-sum-exp and difference are rounded in the input dtype, so the two
    can differ by a unit in the last place of that dtype or more).

    Examples
    --------
    >>> import jax.numpy as jnp, crossent.jax as cj
    >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
    >>> [round(float(v), 4) for v in cj.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))]
    [0.2761, 2.9518]
    """
    logits, labels = as_jax(logits), as_jax(labels)
    validate.require_floating(jnp, logits, "logits")
    if not validate.is_integral(jnp, labels.dtype):
        raise TypeError(f"labels must have an integer dtype, got {validate.dtype_name(labels.dtype)}")
    where = as_jax(where)
    x, (w,), class_axis = _classes_last(logits, axis, where)
    n_classes = x.shape[class_axis]
    if where is not None and not _row_mask(where, logits.ndim):  # per logit
        picked = jnp.take_along_axis(x, jnp.expand_dims(labels, class_axis), axis=class_axis, mode="fill")
        lse = jax.nn.logsumexp(x, axis=class_axis, where=w)
        out = lse - jnp.squeeze(picked, class_axis)
        return jnp.where(jnp.any(w, axis=class_axis), out, jnp.zeros((), out.dtype))
    # No ignore_index in optax: any in-range value checks as "all in [0, C)", and the computation ignores
    # only the dtype's most negative value, whose loss is then set to NaN.
    validate.check_class_indices(jnp, labels, n_classes, 0, name="labels", ignorable=False)
    signed = jnp.issubdtype(labels.dtype, jnp.signedinteger)
    sentinel = int(jnp.iinfo(labels.dtype).min) if signed else -1
    loss = cross_entropy(x, labels, reduction="none", axis=class_axis, ignore_index=sentinel)
    if signed:
        loss = jnp.where(labels == sentinel, jnp.asarray(jnp.nan, loss.dtype), loss)
    return loss if where is None else jnp.where(where, loss, jnp.zeros((), loss.dtype))
