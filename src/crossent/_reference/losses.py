r"""NLL and cross-entropy, their reductions and their gradient, written once in the Array API.

This is the specification every fast path is tested against. With :math:`\ell = \log\mathrm{softmax}(x)`
over the classes, :math:`m_n = [y_n \ne \text{ignore\_index}]`, :math:`\varepsilon` the label smoothing,
:math:`w` the class weights (ones if None) and :math:`C` the number of classes:

- class-index targets:
  :math:`l_n = m_n\,[(1-\varepsilon)\,w_{y_n}(-\ell_{n,y_n}) + \tfrac{\varepsilon}{C}\sum_c w_c(-\ell_{n,c})]`,
  and ``mean`` divides the sum by :math:`\sum_n m_n w_{y_n}`;
- probability targets: :math:`t' = (1-\varepsilon)t + \varepsilon/C`,
  :math:`l_n = -\sum_c w_c t'_{n,c}\ell_{n,c}`, and ``mean`` divides by the number of rows;
- ``z_loss`` adds :math:`z\cdot\mathrm{lse}_n^2` to every non-ignored :math:`l_n`; ``softcap`` replaces
  the logits by :math:`s\tanh(x/s)` first.

The gradient is written out rather than left to an autograd:
:math:`\partial l_n/\partial x_{n,j} = (1-\varepsilon)w_{y_n}(p_{n,j} - [j = y_n])
+ \tfrac{\varepsilon}{C}(p_{n,j}\sum_c w_c - w_j) + 2z\,\mathrm{lse}_n\,p_{n,j}` for class indices, and
:math:`p_{n,j}\sum_c w_c t'_{n,c} - w_j t'_{n,j} + 2z\,\mathrm{lse}_n\,p_{n,j}` for probabilities, with
:math:`p = \mathrm{softmax}(x)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device as device_of

from .._validate import LossOptions, LossShape, index_dtype
from .softmax import batch_dtype, classes_back, classes_last, compute_dtype, row_stats


@dataclass(frozen=True)
class _ClassIndexTerms:
    valid: Any  # (...,) bool: target != ignore_index
    onehot: Any  # (..., C) bool: class == target, all False on ignored rows
    target_weight: Any  # (...,) w[target], 0 on ignored rows


def _class_index_terms(xp: Any, target: Any, n_classes: int, ignore_index: int, w: Any, zero: Any) -> Any:
    t = xp.astype(target, index_dtype(xp, target.dtype, ignore_index))
    valid = t != ignore_index
    classes = xp.arange(n_classes, dtype=t.dtype, device=device_of(target))
    onehot = classes == xp.where(valid, t, xp.full_like(t, -1))[..., None]  # (..., C)
    if w is None:
        target_weight = xp.astype(valid, zero.dtype)
    else:
        target_weight = xp.sum(xp.where(onehot, w, zero), axis=-1)
    # A class index outside [0, C) that was not checked (inside jit, on an accelerator, where reading
    # the target would synchronise the host): its row's weight is NaN, so that its loss, the mean and
    # the gradient are NaN rather than a finite number that counts the row as 0.
    outside = valid & ((t < 0) | (t >= n_classes))
    target_weight = xp.where(outside, xp.full_like(target_weight, math.nan), target_weight)
    return _ClassIndexTerms(valid=valid, onehot=onehot, target_weight=target_weight)


def reduce_losses(xp: Any, per_element: Any, denominator: Any, opts: LossOptions) -> Any:
    """Per-element losses as they are (none), summed in the denominator's dtype (sum), or divided by
    the denominator (mean; 0 instead of NaN for a zero denominator with ``zero_if_all_ignored``)."""
    if opts.reduction == "none":
        return per_element
    total = xp.sum(xp.astype(per_element, denominator.dtype))
    if opts.reduction == "sum":
        return total
    if not opts.zero_if_all_ignored:
        return total / denominator
    # Divided by 1 where the result is replaced by 0: autodiff of where() multiplies the division's
    # derivative (1/0) by the 0 it selects, which is NaN (JAX's grad of nll_loss goes through here).
    zero = denominator == 0
    safe = xp.where(zero, xp.ones_like(denominator), denominator)
    return xp.where(zero, xp.zeros_like(total), total / safe)


def _upstream(xp: Any, grad_output: Any, denominator: Any, opts: LossOptions, dtype: Any, dev: Any) -> Any:
    """d(loss)/d(per-element loss): shape (...,) for reduction='none', else 0-d."""
    if opts.reduction == "none":
        return xp.astype(xp.asarray(grad_output, device=dev), dtype)
    g = xp.asarray(1.0 if grad_output is None else grad_output, dtype=dtype, device=dev)
    if opts.reduction == "mean":
        # A denominator of 0 leaves the mean's gradient undefined: NaN on the elements that count
        # (ignored ones get 0 by a where), or 0 with zero_if_all_ignored; g / 0 would give +-inf, and
        # inf - inf at the target.
        undefined = xp.zeros_like(g) if opts.zero_if_all_ignored else xp.full_like(g, math.nan)
        g = xp.where(denominator == 0, undefined, g / denominator)
    return g


def mean_denominator(xp: Any, opts: LossOptions, default: Any, dev: Any) -> Any:
    """What ``mean`` divides by, in the batch-sum dtype (the total is summed in the same).

    A normalizer that crossent._validate could not read (a JAX tracer, an accelerator's array) and that
    is negative, NaN or infinite becomes NaN here, so that the loss and gradient are NaN, never finite
    and wrong; 0 stays 0 (a division by 0, or 0 with ``zero_if_all_ignored``)."""
    denom = default if opts.normalizer is None else opts.normalizer
    if hasattr(denom, "dtype"):
        denom = xp.astype(denom, batch_dtype(xp))
    else:
        denom = xp.asarray(denom, dtype=batch_dtype(xp), device=dev)
    if opts.normalizer is not None:
        denom = xp.where((denom >= 0) & (denom < math.inf), denom, xp.full_like(denom, math.nan))
    return denom


def _times(xp: Any, weight: Any, log_probs: Any, zero: Any) -> Any:
    """weight * log_probs, with 0 where the weight is exactly 0 and the log-probability -inf: a class
    with no weight contributes nothing, even where its probability is 0 (IEEE's 0 * inf is NaN, and
    so is torch's loss there). A NaN log-probability (a row without a finite maximum) stays NaN."""
    return xp.where((weight == 0) & xp.isinf(log_probs), zero, weight * log_probs)


def _cross_entropy(
    xp: Any,
    input: Any,
    target: Any,
    weight: Any,
    shape: LossShape,
    opts: LossOptions,
    *,
    want_grad: bool,
    grad_output: Any = None,
) -> tuple[Any, Any]:
    dtype = input.dtype
    cdt = compute_dtype(xp, dtype)
    dev = device_of(input)
    axis = shape.class_axis
    n_classes = shape.n_classes
    eps = opts.label_smoothing
    zero = xp.zeros((), dtype=cdt, device=dev)
    w = None if weight is None else xp.astype(weight, cdt)  # (C,); astype keeps an autograd graph

    x = xp.astype(classes_last(xp, input, axis), cdt)  # (..., C)
    if opts.softcap is not None:
        tanh_x = xp.tanh(x / opts.softcap)
        x = opts.softcap * tanh_x
    stats = row_stats(xp, x)
    log_probs = stats.log_probs(xp)  # (..., C)

    valid = None
    if shape.probability_target:
        t = xp.astype(classes_last(xp, target, axis), cdt)  # (..., C)
        if eps > 0:
            t = (1.0 - eps) * t + eps / n_classes
        weighted_t = t if w is None else t * w  # (..., C)
        per_element = -xp.sum(_times(xp, weighted_t, log_probs, zero), axis=-1)  # (...,)
        default_denominator = math.prod(shape.batch_shape)
    else:
        terms = _class_index_terms(xp, target, n_classes, opts.ignore_index, w, zero)
        valid = terms.valid
        nll = -xp.sum(xp.where(terms.onehot, log_probs, zero), axis=-1)  # (...,) -log p[target]
        y_scale = terms.target_weight if eps == 0 else (1.0 - eps) * terms.target_weight
        per_element = -_times(xp, y_scale, -nll, zero)
        if eps > 0:
            smooth = -xp.sum(log_probs if w is None else _times(xp, w, log_probs, zero), axis=-1)
            per_element = per_element + (eps / n_classes) * xp.where(valid, smooth, zero)
        default_denominator = xp.sum(xp.astype(terms.target_weight, batch_dtype(xp)))
    if opts.z_loss > 0:
        z_term = opts.z_loss * stats.lse**2
        per_element = per_element + (z_term if valid is None else xp.where(valid, z_term, zero))

    denominator = mean_denominator(xp, opts, default_denominator, dev)
    loss = xp.astype(reduce_losses(xp, per_element, denominator, opts), dtype)
    if not want_grad:
        return loss, None

    g = xp.astype(_upstream(xp, grad_output, denominator, opts, batch_dtype(xp), dev), cdt)
    if g.ndim > 0:
        g = g[..., None]
    p = stats.probs(xp)  # (..., C)
    if shape.probability_target:
        dx = p * xp.sum(weighted_t, axis=-1, keepdims=True) - weighted_t
    else:
        target_scale = terms.target_weight[..., None] * (1.0 - eps)  # (..., 1)
        # (p - onehot) * scale: the 1 of the one-hot is subtracted from the target column only.
        dx = p * target_scale - xp.where(terms.onehot, target_scale, zero)
        if eps > 0:
            w_total = float(n_classes) if w is None else xp.sum(w)
            dx = dx + (eps / n_classes) * (p * w_total - (1.0 if w is None else w))
    if opts.z_loss > 0:
        dx = dx + (2.0 * opts.z_loss) * stats.lse[..., None] * p
    dx = g * dx
    if opts.softcap is not None:
        dx = dx * (1.0 - tanh_x**2)
    if opts.reduction == "mean" and opts.zero_if_all_ignored:
        # zero_if_all_ignored's gradient for a denominator of 0 is exactly 0, also on a counted row with
        # no finite logit, whose NaN softmax times the 0 upstream gradient would be NaN.
        dx = xp.where(denominator == 0, zero, dx)
    if valid is not None:
        # where, not a multiply by the mask, and after the soft cap's factor: an ignored row may hold
        # NaN (all -inf or NaN logits) or meet an infinite upstream gradient (mean over no target),
        # and must still get exactly 0.
        dx = xp.where(valid[..., None], dx, zero)
    grad = classes_back(xp, xp.astype(dx, dtype), axis)
    return loss, grad


def cross_entropy(xp: Any, input: Any, target: Any, weight: Any, shape: LossShape, opts: LossOptions) -> Any:
    return _cross_entropy(xp, input, target, weight, shape, opts, want_grad=False)[0]


def cross_entropy_and_grad(
    xp: Any,
    input: Any,
    target: Any,
    weight: Any,
    shape: LossShape,
    opts: LossOptions,
    grad_output: Any,
) -> tuple[Any, Any]:
    return _cross_entropy(xp, input, target, weight, shape, opts, want_grad=True, grad_output=grad_output)


def nll_loss(xp: Any, input: Any, target: Any, weight: Any, shape: LossShape, opts: LossOptions) -> Any:
    """-w[y] * input[y] per element, reduced like cross_entropy (input holds log-probabilities)."""
    dtype = input.dtype
    cdt = compute_dtype(xp, dtype)
    dev = device_of(input)
    zero = xp.zeros((), dtype=cdt, device=dev)
    w = None if weight is None else xp.astype(weight, cdt)  # astype: keeps an autograd graph
    x = xp.astype(classes_last(xp, input, shape.class_axis), cdt)  # (..., C)
    terms = _class_index_terms(xp, target, shape.n_classes, opts.ignore_index, w, zero)
    picked = xp.sum(xp.where(terms.onehot, x, zero), axis=-1)  # (...,) input[target]
    per_element = -(terms.target_weight * picked)
    denominator = mean_denominator(xp, opts, xp.sum(xp.astype(terms.target_weight, batch_dtype(xp))), dev)
    return xp.astype(reduce_losses(xp, per_element, denominator, opts), dtype)
