"""``linear_cross_entropy``: the loss of ``hidden @ kernel + bias`` without the (N, V) logits.

Rows are taken in chunks under ``lax.scan``; each chunk's logits exist only inside one step, where the
specification (crossent's reference, reduction "none") gives the chunk's per-row losses and their
gradient, which the step turns into the chunk's share of d/d hidden, d/d kernel and d/d bias at once.
For ``mean`` and ``sum`` the upstream gradient is a scalar, so all gradients come out of the forward
sweep (``jax.custom_vjp``; the backward only scales them); for ``none`` the backward sweeps again with
the per-row upstream gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from .. import _reference as reference
from .. import _validate as validate
from .._reference.softmax import batch_dtype
from .._validate import LossOptions, LossShape
from . import _backend
from ._functional import _unsigned_without_wrapping, as_jax

# Bytes of float32 logits one row chunk may hold (the kernel's gradient then takes them in place). Each
# chunk adds its (D, V) share of d/d kernel to the accumulator, a pass over D * V floats whatever the
# chunk's rows, against 6 * rows * D * V flops of matmuls: 4 MiB (32 rows at V = 32768) spent a third
# of the time on that pass (N=2048 D=512 V=32768: 1.3-1.7x the naive loss), 16 MiB (128 rows) is within
# a few percent of it, and adds 16 MiB of temporaries (3% of the naive loss's).
CHUNK_BYTES = 16 << 20
# Fewer rows than this per chunk (a vocabulary past CHUNK_BYTES / 256 B, 65536 classes) would starve the
# matmuls: past it, chunks of VOCAB_ROWS rows and as many classes as VOCAB_BYTES holds.
MIN_ROWS, VOCAB_ROWS, VOCAB_BYTES = 64, 64, 4 << 20


@dataclasses.dataclass(frozen=True)
class _Static:
    rows: int
    chunk: int
    vocab_chunk: int | None  # classes per vocabulary chunk, or None: whole rows
    opts: LossOptions  # with normalizer=None; an array normalizer travels as an operand


def _target_weights(labels: Any, weight: Any, opts: LossOptions, dtype: Any) -> Any:
    valid = labels != opts.ignore_index
    if weight is None:
        return valid.astype(dtype)
    safe = jnp.where(valid, labels, 0)
    return jnp.where(valid, jnp.take(weight.astype(dtype), safe, mode="clip"), 0)


def _denominator_and_scale(labels: Any, weight: Any, normalizer: Any, opts: LossOptions) -> tuple[Any, Any]:
    """What ``mean`` divides by, and d(loss)/d(row loss) for a unit upstream gradient."""
    bdt = batch_dtype(jnp)
    if opts.reduction != "mean":
        return jnp.ones((), bdt), jnp.ones((), bdt)
    if normalizer is None:
        denom = jnp.sum(_target_weights(labels, weight, opts, bdt))
    else:  # negative, infinite or NaN (traced, so unchecked): NaN, as the specification's rule
        denom = reference.mean_denominator(jnp, dataclasses.replace(opts, normalizer=normalizer), None, None)
    # A denominator of 0: NaN on the rows that count (0 with zero_if_all_ignored), as the
    # specification's upstream gradient (1 / 0 would meet a zero unit gradient as inf * 0 anyway).
    scale = jnp.where(denom == 0, 0.0 if opts.zero_if_all_ignored else jnp.nan, 1.0 / denom)
    return denom, scale


def _chunk(h: Any, kernel: Any, bias: Any, y: Any, weight: Any, opts: LossOptions, upstream: Any) -> tuple[Any, ...]:
    """Per-row losses of one chunk and, for per-row ``upstream`` gradients, its gradients.

    The chunk's loss and its gradient for a unit upstream gradient per row come from one call of the
    loss (``_backend``: the native kernel in place on the CPU, the reference elsewhere), the same as
    :func:`crossent.jax.cross_entropy` computes for the naive logits. The per-row upstream gradient
    then scales ``h``'s rows and ``dh``'s rows, (rows, D) each, rather than the (rows, V) logits'
    gradient: one pass over the chunk fewer. An ignored row's unit gradient is exactly 0 and its
    upstream is taken as 0, as the specification's ``where`` gives it 0 even for an infinite upstream."""
    cdt = jnp.float64 if h.dtype == jnp.float64 else jnp.float32
    logits = jnp.matmul(h, kernel, preferred_element_type=cdt)
    if bias is not None:
        logits = logits + bias.astype(cdt)
    shape = LossShape(1, logits.shape[1], (logits.shape[0],), False)
    per_row = dataclasses.replace(opts, reduction="none", normalizer=None, zero_if_all_ignored=False)
    loss, unit = _backend.loss_and_unit_grad(logits, y, weight, None, shape, per_row, want_grad=upstream is not None)
    if upstream is None:
        return (loss,)
    g = jnp.where(y != opts.ignore_index, upstream.astype(cdt), 0)[:, None]
    dh = g * jnp.matmul(unit, kernel.T, preferred_element_type=cdt)
    dk = jnp.matmul((g * h.astype(cdt)).T, unit, preferred_element_type=cdt)
    db = None if bias is None else jnp.matmul(g[:, 0], unit, preferred_element_type=cdt)
    return loss, dh, dk, db


def _vocab_slices(kernel: Any, bias: Any, j: Any, vc: int) -> tuple[Any, Any, Any, Any]:
    """Vocabulary chunk j: its kernel columns (D, vc), bias, first column, and which of its columns are
    its own. The last chunk is taken flush with the end (overlapping the one before, whose columns it
    masks) so that nothing is padded: a padded copy of the kernel would be a kernel-sized temporary."""
    v = kernel.shape[1]
    start = jnp.minimum(j * vc, v - vc)
    cols = start + jnp.arange(vc)
    k = jax.lax.dynamic_slice_in_dim(kernel, start, vc, axis=1)
    b = None if bias is None else jax.lax.dynamic_slice_in_dim(bias, start, vc)
    return k, b, start, cols >= j * vc


def _vocab_logits(h: Any, k: Any, b: Any, opts: LossOptions, cdt: Any) -> tuple[Any, Any]:
    z = jnp.matmul(h, k, preferred_element_type=cdt)
    if b is not None:
        z = z + b.astype(cdt)
    if opts.softcap is None:
        return z, None
    t = jnp.tanh(z / opts.softcap)
    return opts.softcap * t, t


def _chunk_by_vocab(
    h: Any, kernel: Any, bias: Any, y: Any, weight: Any, opts: LossOptions, upstream: Any, vc: int, acc: Any
) -> tuple[Any, ...]:
    """``_chunk`` with the classes in chunks of ``vc``: an online log-sum-exp over the chunks, then (for
    gradients) a second sweep that recomputes each chunk's logits. The same per-row terms as the
    specification (crossent._reference.losses): with lse the log-sum-exp of the (capped) logits x,

        loss = (1 - eps) w_y (lse - x_y) + eps/C (sum_c w_c lse - sum_c w_c x_c) + z lse^2
        dx_c = g (p_c ((1 - eps) w_y + eps/C sum_c w_c + 2 z lse) - (1 - eps) w_y [c = y] - eps/C w_c)

    (times 1 - tanh^2 under the soft cap), 0 for an ignored row and NaN for an out-of-range class index.
    ``acc`` holds the (D, V) and (V,) gradient sums, updated chunk by chunk in place."""
    v = kernel.shape[1]
    n_chunks = math.ceil(v / vc)
    cdt = jnp.float64 if h.dtype == jnp.float64 else jnp.float32
    eps, zl = opts.label_smoothing, opts.z_loss
    w = None if weight is None else weight.astype(cdt)
    rows = h.shape[0]

    def col_weights(start: Any) -> Any:
        return jnp.ones((vc,), cdt) if w is None else jax.lax.dynamic_slice_in_dim(w, start, vc)

    def stats(carry: Any, j: Any) -> Any:
        m, s, xy, wx = carry
        k, b, start, own = _vocab_slices(kernel, bias, j, vc)
        z, _ = _vocab_logits(h, k, b, opts, cdt)
        z = jnp.where(own, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        at_y = own & (start + jnp.arange(vc) == y[:, None])
        xy = xy + jnp.sum(jnp.where(at_y, z, 0), axis=1)
        if eps > 0:
            wx = wx + jnp.sum(jnp.where(own, col_weights(start) * z, 0), axis=1)
        return (m_new, s, xy, wx), None

    zeros = jnp.zeros((rows,), cdt)
    init = (jnp.full((rows,), -jnp.inf, cdt), zeros, zeros, zeros)
    (m, s, xy, wx), _ = jax.lax.scan(stats, init, jnp.arange(n_chunks))
    lse = m + jnp.log(s)
    valid = y != opts.ignore_index
    in_range = (y >= 0) & (y < v)
    w_y = jnp.ones((rows,), cdt) if w is None else jnp.take(w, jnp.where(in_range, y, 0))
    w_y = jnp.where(valid, jnp.where(in_range, w_y, jnp.nan), 0)  # NaN: the specification's rule
    w_total = jnp.asarray(float(v), cdt) if w is None else jnp.sum(w)
    loss = (1 - eps) * w_y * (lse - xy)
    if eps > 0:
        loss = loss + (eps / v) * (w_total * lse - wx)
    if zl > 0:
        loss = loss + zl * lse**2
    loss = jnp.where(valid, loss, 0)
    if upstream is None:
        return (loss,)
    coef = (1 - eps) * w_y + (eps / v) * w_total + 2 * zl * lse
    g = upstream.astype(cdt)

    def grads(carry: Any, j: Any) -> Any:
        dh, dk_acc, db_acc = carry
        k, b, start, own = _vocab_slices(kernel, bias, j, vc)
        z, t = _vocab_logits(h, k, b, opts, cdt)
        dx = jnp.exp(z - lse[:, None]) * coef[:, None]
        dx = dx - jnp.where(start + jnp.arange(vc) == y[:, None], (1 - eps) * w_y[:, None], 0)
        if eps > 0:
            dx = dx - (eps / v) * col_weights(start)
        dx = jnp.where(valid[:, None] & own, dx * g[:, None], 0)
        if t is not None:
            dx = dx * (1 - t * t)
        dh = dh + jnp.matmul(dx, k.T.astype(cdt))
        dk = jax.lax.dynamic_slice_in_dim(dk_acc, start, vc, axis=1) + jnp.matmul(h.T.astype(cdt), dx)
        db = jax.lax.dynamic_slice_in_dim(db_acc, start, vc) + jnp.sum(dx, axis=0)
        dk_acc = jax.lax.dynamic_update_slice_in_dim(dk_acc, dk, start, axis=1)
        db_acc = jax.lax.dynamic_update_slice_in_dim(db_acc, db, start, axis=0)
        return (dh, dk_acc, db_acc), None

    (dh, dk, db), _ = jax.lax.scan(grads, (jnp.zeros(h.shape, cdt), *acc), jnp.arange(n_chunks))
    return loss, dh, (dk, db)


def _sweep(h: Any, kernel: Any, bias: Any, y: Any, weight: Any, st: _Static, upstream: Any) -> tuple[Any, ...]:
    """Row losses (rows,) and, with upstream (rows,) given, d/d(hidden, kernel, bias) in float32/64."""
    n_chunks = math.ceil(st.rows / st.chunk)
    pad = n_chunks * st.chunk - st.rows
    # Padding rows are ignored targets: no loss, no gradient.
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(n_chunks, st.chunk, h.shape[1])  # no -1: rows may be 0
    yp = jnp.pad(y, (0, pad), constant_values=st.opts.ignore_index).reshape(n_chunks, st.chunk)
    cdt = jnp.float64 if h.dtype == jnp.float64 else jnp.float32
    if upstream is None:

        def forward(_: Any, xs: Any) -> Any:
            if st.vocab_chunk is not None:
                return None, _chunk_by_vocab(xs[0], kernel, bias, xs[1], weight, st.opts, None, st.vocab_chunk, None)[0]
            return None, _chunk(xs[0], kernel, bias, xs[1], weight, st.opts, None)[0]

        _, losses = jax.lax.scan(forward, None, (hp, yp))
        return (losses.reshape(-1)[: st.rows],)
    gp = jnp.pad(upstream.astype(cdt), (0, pad)).reshape(n_chunks, st.chunk)

    def step(carry: Any, xs: Any) -> Any:
        if st.vocab_chunk is not None:
            loss, dh, carry = _chunk_by_vocab(xs[0], kernel, bias, xs[1], weight, st.opts, xs[2], st.vocab_chunk, carry)
            return carry, (loss, dh)
        dk_acc, db_acc = carry
        loss, dh, dk, db = _chunk(xs[0], kernel, bias, xs[1], weight, st.opts, xs[2])
        return (dk_acc + dk, db_acc if db is None else db_acc + db), (loss, dh)

    init = (jnp.zeros(kernel.shape, cdt), jnp.zeros((kernel.shape[1],), cdt))
    (dk, db), (losses, dh) = jax.lax.scan(step, init, (hp, yp, gp))
    dh = dh.reshape(-1, h.shape[1])[: st.rows]
    return losses.reshape(-1)[: st.rows], dh.astype(h.dtype), dk.astype(kernel.dtype), db


def _reduce(losses: Any, denom: Any, opts: LossOptions, dtype: Any) -> Any:
    return reference.reduce_losses(jnp, losses, denom, dataclasses.replace(opts, normalizer=None)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _linear(h: Any, kernel: Any, bias: Any, y: Any, weight: Any, normalizer: Any, st: _Static) -> Any:
    (losses,) = _sweep(h, kernel, bias, y, weight, st, None)
    denom, _ = _denominator_and_scale(y, weight, normalizer, st.opts)
    return _reduce(losses, denom, st.opts, h.dtype)


def _linear_fwd(h: Any, kernel: Any, bias: Any, y: Any, weight: Any, normalizer: Any, st: _Static) -> Any:
    if st.opts.reduction == "none":
        loss = _linear(h, kernel, bias, y, weight, normalizer, st)
        return loss, (h, kernel, bias, y, weight, None)
    denom, scale = _denominator_and_scale(y, weight, normalizer, st.opts)
    upstream = jnp.broadcast_to(scale, y.shape)
    losses, dh, dk, db = _sweep(h, kernel, bias, y, weight, st, upstream)
    return _reduce(losses, denom, st.opts, h.dtype), (None, None, bias, None, weight, (dh, dk, db))


def _linear_bwd(st: _Static, res: Any, ct: Any) -> Any:
    h, kernel, bias, y, weight, grads = res
    if grads is None:  # reduction "none": sweep again with the per-row upstream gradients
        _, dh, dk, db = _sweep(h, kernel, bias, y, weight, st, ct)
    else:
        dh, dk, db = grads
        dh, dk, db = (g * ct.astype(g.dtype) for g in (dh, dk, db))
    db = None if bias is None else db.astype(bias.dtype)
    return dh, dk, db, None, None if weight is None else jnp.zeros_like(weight), None


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_cross_entropy(
    hidden: Any,
    kernel: Any,
    labels: Any,
    *,
    bias: Any = None,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: Any = None,
    zero_if_all_ignored: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> jax.Array:
    r"""``cross_entropy(hidden @ kernel + bias, labels, ...)`` without the (N, V) logits.

    Parameters
    ----------
    hidden : array, shape (..., D)
    kernel : array, shape (D, V)
        The output layer laid out as flax's ``Dense``/``nnx.Linear`` store it.
    labels : integer array, shape (...)
        Class indices (probability targets are not supported here).
    bias : array, shape (V,), optional
    weight, ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored
        As for :func:`crossent.jax.cross_entropy`.
    chunk_size : int, optional
        Rows per chunk; by default as many as keep a chunk's float32 logits within 16 MiB, or, where
        that would be fewer than 64 rows (more than 65536 classes), 64 (with vocabulary chunks).
    vocab_chunk_size : int, optional
        Classes per vocabulary chunk: the loss takes an online log-sum-exp over the chunks and a second
        sweep for the gradients, so that no row's logits exist whole. By default none (whole rows)
        unless the rows alone cannot keep a chunk within 16 MiB; then as many classes as keep 64 rows'
        logits within 4 MiB (16384), and rows to fill 4 MiB when only this is given.

    Returns
    -------
    jax.Array
        0-d for ``mean`` and ``sum``, the labels' shape for ``none``; ``hidden``'s dtype.

    Gradients with respect to ``hidden``, ``kernel`` and ``bias`` (accumulated in float32, or float64);
    none with respect to ``weight`` or ``normalizer`` (they are taken as constants). Out-of-range labels
    raise IndexError when concrete and give NaN (loss and gradients) under ``jit``, as
    :func:`crossent.jax.cross_entropy`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, crossent.jax as cj
    >>> h = jnp.ones((4, 8)) / 8
    >>> k = jnp.zeros((8, 100))
    >>> print(f"{cj.linear_cross_entropy(h, k, jnp.array([0, 1, 2, 3])):.4f}")  # log(100)
    4.6052
    >>> grads = jax.grad(cj.linear_cross_entropy, argnums=(0, 1))(h, k, jnp.array([0, 1, 2, 3]))
    >>> [g.shape for g in grads]
    [(4, 8), (8, 100)]
    """
    opts = validate.loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    hidden, kernel, labels, bias, weight = (as_jax(a) for a in (hidden, kernel, labels, bias, weight))
    validate.require_floating(jnp, hidden, "hidden")
    validate.require_floating(jnp, kernel, "kernel")
    if hidden.ndim < 1 or kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(
            f"kernel must have shape (D, V) with D = hidden.shape[-1], got hidden {tuple(hidden.shape)} "
            f"and kernel {tuple(kernel.shape)}"
        )
    d, v = (int(s) for s in kernel.shape)
    if v == 0:
        raise ValueError(f"kernel of shape {(d, v)} has no classes: expected at least one")
    if not validate.is_integral(jnp, labels.dtype):
        raise TypeError(f"labels must hold class indices (an integer dtype), got {validate.dtype_name(labels.dtype)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden's rows {tuple(hidden.shape[:-1])}")
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    if weight is not None:
        validate.check_weight(jnp, weight, v)
    validate.check_class_indices(jnp, labels, v, opts.ignore_index)
    rows = math.prod(labels.shape)
    vocab_chunk = None
    if vocab_chunk_size is not None:
        vocab_chunk = validate.check_int(vocab_chunk_size, "vocab_chunk_size")
        if vocab_chunk < 1:
            raise ValueError(f"vocab_chunk_size must be at least 1, got {vocab_chunk_size!r}")
    if chunk_size is None:
        if vocab_chunk is None:
            chunk = CHUNK_BYTES // (4 * v)
            if chunk < MIN_ROWS:
                chunk, vocab_chunk = VOCAB_ROWS, max(1, VOCAB_BYTES // (4 * VOCAB_ROWS))
        else:
            chunk = VOCAB_BYTES // (4 * min(vocab_chunk, v))
        chunk = max(1, min(rows, chunk))
    else:
        chunk = validate.check_int(chunk_size, "chunk_size")
        if chunk < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size!r}")
        chunk = min(chunk, max(rows, 1))
    if vocab_chunk is not None and vocab_chunk >= v:
        vocab_chunk = None  # one chunk holds every class: whole rows
    y = _unsigned_without_wrapping(labels.reshape(rows), v, opts.ignore_index)
    norm = None if opts.normalizer is None else jnp.asarray(opts.normalizer)
    st = _Static(rows=rows, chunk=chunk, vocab_chunk=vocab_chunk, opts=dataclasses.replace(opts, normalizer=None))
    loss = _linear(hidden.reshape(rows, d), kernel, bias, y, weight, norm, st)
    return loss.reshape(labels.shape) if opts.reduction == "none" else loss
