"""The cross-entropy of logits whose classes are split over the devices of a mesh axis, for use inside
``jax.shard_map`` (or ``pmap``): JAX's own collectives, so the same code runs on one host or many
(``jax.distributed``).

Each device reduces its slice to a few numbers per row and two collectives combine them, as
``crossent.torch.distributed`` does: a ``pmax`` of the rows' maxima m, then one ``psum`` of a packed
(rows, k) array holding sum_c exp(x_c - m), the target's shifted logit (from the device that holds it)
and, as the options need them, the label-smoothing and probability-target sums, each shifted by m so
that only differences of nearby numbers are taken. A slice whose logits are all -inf contributes
exactly nothing (exp(-inf - m) = 0, and so does its gradient). Gradients are JAX's autodiff of these
few lines: the shift m is held constant (the result does not depend on it), and the transpose of the
``psum`` needs no communication.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .. import _reference as reference
from .. import _validate as validate
from .._reference.softmax import batch_dtype, compute_dtype
from ._functional import as_jax


def _axis_size(axis_name: Any) -> int:
    return int(jax.lax.psum(1, axis_name))


def _row_losses(x: Any, labels: Any, axis_name: Any, start: Any, local_size: Any, total: int, weight: Any, opts: Any):
    """Per-row losses (rows,) over the whole vocabulary and the per-row count weight, from a (rows, W)
    slice whose first ``local_size`` columns are classes [start, start + local_size)."""
    width = x.shape[1]
    cdt = x.dtype
    local = jnp.arange(width)
    real = local < local_size  # padding columns of an uneven split take no part
    cols = start + local
    x = jnp.where(real, x, -jnp.inf)
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(x, axis=1)), axis_name)  # collective 1
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row without a finite maximum shifts by 0
    shifted = x - m[:, None]
    w_local = None if weight is None else jnp.where(real, jnp.take(weight, cols, mode="clip"), 0.0)
    eps = opts.label_smoothing
    uniform = eps / total
    w_total = float(total) if weight is None else jnp.sum(weight)
    columns = [jnp.sum(jnp.exp(shifted), axis=1)]
    probability = jnp.issubdtype(labels.dtype, jnp.floating)
    if probability:
        t = jnp.where(real, labels.astype(cdt), 0.0)
        wt = t if w_local is None else t * w_local
        columns += [jnp.sum(jnp.where(real, wt * shifted, 0.0), axis=1), jnp.sum(wt, axis=1)]
    else:
        mine = (labels >= start) & (labels < start + local_size) & (labels != opts.ignore_index)
        onehot = (cols[None, :] == labels[:, None]) & mine[:, None] & real[None, :]
        columns.append(jnp.sum(jnp.where(onehot, shifted, 0.0), axis=1))
    if eps > 0:
        ws = shifted if w_local is None else w_local * shifted
        columns.append(jnp.sum(jnp.where(real, ws, 0.0), axis=1))
    packed = jax.lax.psum(jnp.stack(columns, axis=-1), axis_name)  # collective 2
    log_s = jnp.log(packed[:, 0])
    wx = packed[:, -1] if eps > 0 else jnp.zeros_like(log_s)
    if probability:
        wt_s = (1 - eps) * packed[:, 2] + uniform * w_total
        loss = log_s * wt_s - ((1 - eps) * packed[:, 1] + uniform * wx)
        valid = jnp.ones(log_s.shape, bool)
        count = jnp.ones(log_s.shape, batch_dtype(jnp))
    else:
        t = labels.astype(validate.index_dtype(jnp, labels.dtype, opts.ignore_index))
        valid = t != opts.ignore_index
        safe = jnp.where(valid, t, 0)
        w_y = jnp.where(valid, 1.0 if weight is None else jnp.take(weight, safe, mode="clip"), 0.0).astype(cdt)
        # A counted target outside [0, total): NaN, never a finite wrong loss (see crossent.jax.cross_entropy).
        w_y = jnp.where(valid & ((t < 0) | (t >= total)), jnp.nan, w_y)
        loss = (1 - eps) * w_y * (log_s - packed[:, 1]) + uniform * (log_s * w_total - wx)
        count = w_y.astype(batch_dtype(jnp))
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * (m + log_s) ** 2
    return jnp.where(valid, loss, 0.0), count


def vocab_parallel_cross_entropy(
    local_logits: Any,
    labels: Any,
    axis_name: Any,
    *,
    vocab_start: Any = None,
    vocab_size: int | None = None,
    local_size: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
) -> jax.Array:
    """The cross-entropy of logits whose classes are split over the devices of mesh axis ``axis_name``.

    Call it inside ``jax.shard_map`` (or ``pmap``) with each device's slice of the classes.

    Parameters
    ----------
    local_logits : array, shape (..., W)
        This device's slice of the classes (last axis) for every row.
    labels : array
        Global class ids, shape (...), the same on every device; or this device's slice of class
        probabilities, shape (..., W).
    axis_name : hashable
        The mesh axis the vocabulary is split over.
    vocab_start : int or 0-d integer array, optional
        The global id of this device's first class; by default ``axis_index * W`` (an even split).
    vocab_size : int, optional
        The global number of classes; by default ``W`` times the axis size.
    local_size : int or 0-d integer array, optional
        How many of the W columns are classes (uneven splits: shard_map gives every device the same
        width, so a shorter slice is padded at its end and names its real width here); default W.
    weight : array, shape (vocab_size,), optional
        The global class weights, the same on every device.
    ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored
        As for :func:`crossent.jax.cross_entropy`, over the whole vocabulary.

    Returns
    -------
    jax.Array
        The loss, the same on every device: 0-d for mean and sum, the rows' shape for none.

    Two collectives in the forward: a ``pmax`` and one ``psum`` of a (rows, k) array, k <= 4.
    """
    opts = validate.loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    x, labels, weight = as_jax(local_logits), as_jax(labels), as_jax(weight)
    validate.require_floating(jnp, x, "local_logits")
    width = int(x.shape[-1])
    rows_shape = tuple(x.shape[:-1])
    total = width * _axis_size(axis_name) if vocab_size is None else validate.check_int(vocab_size, "vocab_size")
    start = jax.lax.axis_index(axis_name) * width if vocab_start is None else vocab_start
    size = width if local_size is None else local_size
    probability = validate.is_floating(jnp, labels.dtype)
    validate.check_target_options(probability, opts)
    if probability and tuple(labels.shape) != tuple(x.shape):
        raise ValueError(f"probability targets must have the local logits' shape {tuple(x.shape)}, got {labels.shape}")
    if not probability:
        if not validate.is_integral(jnp, labels.dtype):
            raise TypeError(f"labels must have an integer or floating dtype, got {validate.dtype_name(labels.dtype)}")
        if tuple(labels.shape) != rows_shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the logits' rows {rows_shape}")
        validate.check_class_indices(jnp, labels, total, opts.ignore_index)
    if weight is not None:
        validate.check_weight(jnp, weight, total)
    cdt = compute_dtype(jnp, x.dtype)
    xc = x.reshape(-1, width).astype(cdt)
    if opts.softcap is not None:
        xc = opts.softcap * jnp.tanh(xc / opts.softcap)
    lab = labels.reshape(-1, width) if probability else labels.reshape(-1)
    w = None if weight is None else weight.astype(cdt)
    losses, count = _row_losses(xc, lab, axis_name, start, size, total, w, opts)
    if opts.reduction == "none":
        return losses.reshape(rows_shape).astype(x.dtype)
    bdt = batch_dtype(jnp)
    if opts.normalizer is None:
        denom = jnp.sum(count)
    else:  # negative, infinite or NaN (traced, so unchecked): NaN, as the specification's rule
        denom = reference.mean_denominator(jnp, opts, None, None)
    if opts.reduction == "mean" and opts.normalizer is None and probability:
        denom = jnp.asarray(float(math.prod(rows_shape)), bdt)
    return reference.reduce_losses(jnp, losses, denom, opts).astype(x.dtype)


def vocab_parallel_linear_cross_entropy(
    hidden: Any,
    local_kernel: Any,
    labels: Any,
    axis_name: Any,
    *,
    local_bias: Any = None,
    **options: Any,
) -> jax.Array:
    """``vocab_parallel_cross_entropy(hidden @ local_kernel + local_bias, labels, axis_name, ...)``: the
    sharded output layer (kernel ``(D, W)`` per device, flax's layout) and the loss.

    ``hidden`` (..., D) is the same on every device; its gradient, a sum over the slices, is what JAX's
    transpose of the replicated input gives. The (rows, W) local logits are formed on each device.
    Keyword options as for :func:`vocab_parallel_cross_entropy`.
    """
    hidden, local_kernel, local_bias = as_jax(hidden), as_jax(local_kernel), as_jax(local_bias)
    if local_kernel.ndim != 2 or local_kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"local_kernel must have shape (D, W) with D = hidden.shape[-1], got {tuple(local_kernel.shape)}"
        )
    logits = jnp.matmul(hidden, local_kernel, preferred_element_type=compute_dtype(jnp, hidden.dtype))
    if local_bias is not None:
        logits = logits + local_bias
    return vocab_parallel_cross_entropy(logits.astype(hidden.dtype), labels, axis_name, **options)
