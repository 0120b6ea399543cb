r"""d(loss)/d(class weights) and d(loss)/d(probability target), analytic, for the losses whose backward
is not torch's autograd (the cross-entropy op, the linear loss, the vocabulary-parallel loss).

With :math:`\ell = \log\mathrm{softmax}(x')` (:math:`x'` the soft-capped logits), :math:`g_n` the upstream
gradient of element n and :math:`m_n` its mask (not ignored), the summed loss :math:`S = \sum_n g_n l_n`
has

- class indices: :math:`\partial S/\partial w_c = \sum_n g_n m_n [(1-\varepsilon)[y_n = c](-\ell_{n,y_n})
  + \tfrac{\varepsilon}{C}(-\ell_{n,c})]`;
- probabilities, :math:`t' = (1-\varepsilon)t + \varepsilon/C`: :math:`\partial S/\partial w_c =
  -\sum_n g_n t'_{n,c}\ell_{n,c}` and :math:`\partial S/\partial t_{n,c} = -(1-\varepsilon) g_n w_c \ell_{n,c}`.

``mean`` without a normalizer divides by :math:`D = \sum_n m_n w_{y_n}`, which depends on w too:
:math:`\partial (S/D)/\partial w_c = (\partial S/\partial w_c - L\,\#\{n: m_n, y_n = c\})/D` with L the
mean. The z-loss term does not depend on w. torch refuses a class weight that requires a gradient with
class-index targets (its nll_loss is not differentiable in it); with probability targets its autograd
gives the formula above, which is what the tests compare with.
"""

from __future__ import annotations

import torch

from .._validate import LossOptions
from ._reduction import mean_denominator_and_scale


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_probs(logits: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    """log_softmax of the (soft-capped) logits over the last axis, in float32 or float64."""
    x = logits.to(_acc(logits.dtype))
    if opts.softcap is not None and opts.softcap > 0:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    return torch.log_softmax(x, -1)


def weight_grad_sum(
    log_probs: torch.Tensor, target: torch.Tensor, g: torch.Tensor, opts: LossOptions, n_classes: int,
    start: int = 0,
) -> torch.Tensor:  # fmt: skip
    """d(sum_n g_n l_n)/d(w) for the classes [start, start + V) of ``log_probs`` (rows, V): global
    log-probabilities of a block of classes; ``target`` (rows,) global class ids or (rows, V) the
    block's probabilities; ``g`` (rows,) per-row upstream gradients. Shape (V,)."""
    eps = opts.label_smoothing
    v = log_probs.shape[-1]
    g = g.to(log_probs.dtype)
    if target.is_floating_point():
        t = (1 - eps) * target.to(log_probs.dtype) + eps / n_classes
        return -(g[:, None] * t * log_probs).sum(0)
    valid = target != opts.ignore_index
    local = target - start
    mine = valid & (local >= 0) & (local < v)
    safe = torch.where(mine, local, 0)
    gv = torch.where(valid, g, torch.zeros_like(g))
    picked = -log_probs.gather(1, safe[:, None])[:, 0]  # -l_{n, y_n} where this block holds y_n
    grad = torch.zeros(v, dtype=log_probs.dtype, device=log_probs.device)
    grad.index_add_(0, safe, torch.where(mine, (1 - eps) * gv * picked, torch.zeros_like(g)))
    if eps > 0:
        # where, not a product with the mask: an ignored row may hold NaN log-probabilities.
        grad += (eps / n_classes) * torch.where(valid[:, None], -log_probs * gv[:, None], 0.0).sum(0)
    return grad


def finish_weight_grad(
    grad_sum: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, opts: LossOptions,
    normalizer: torch.Tensor | None, grad_loss: torch.Tensor, loss: torch.Tensor, rows: int,
) -> torch.Tensor:  # fmt: skip
    """The reduction's part: ``grad_sum`` (from weight_grad_sum, for the unit upstream gradient of
    mean and sum scaled by ``grad_loss``) divided by mean's denominator, less the denominator's own
    dependence on w. ``target``: all rows' targets (flat); ``loss``: the reduced loss."""
    if opts.reduction != "mean":
        return grad_sum.to(weight.dtype)
    _, scale = mean_denominator_and_scale(target, weight, opts, rows=rows, normalizer=normalizer)
    grad = grad_sum.to(torch.float64)
    if normalizer is None and opts.normalizer is None and not target.is_floating_point():
        valid = target != opts.ignore_index
        count = torch.zeros(weight.shape[0], dtype=torch.float64, device=grad.device)
        count.index_add_(0, torch.where(valid, target, 0), valid.to(torch.float64))
        # d(D)/d(w_c) = count_c; an all-ignored batch (loss 0 with zero_if_all_ignored) adds nothing
        correction = grad_loss.to(torch.float64) * loss.detach().to(torch.float64) * count
        grad = grad - torch.where(count > 0, correction, 0.0)
    return (grad * scale).to(weight.dtype)


def cross_entropy_weight_grad(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, class_axis: int, opts: LossOptions,
    normalizer: torch.Tensor | None, grad_loss: torch.Tensor, loss: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """d(loss)/d(weight) of crossent.torch.cross_entropy, shape (C,): one log_softmax of the input
    (classes last, in float32 or float64) is computed for it."""
    c = input.shape[class_axis]
    log_probs = _log_probs(torch.movedim(input, class_axis, -1), opts).reshape(-1, c)
    probability = target.is_floating_point()
    t = torch.movedim(target, class_axis, -1).reshape(-1, c) if probability else target.reshape(-1)
    rows = log_probs.shape[0]
    g = grad_loss.reshape(-1) if opts.reduction == "none" else grad_loss.expand(rows)
    grad_sum = weight_grad_sum(log_probs, t, g, opts, c)
    return finish_weight_grad(grad_sum, t, weight, opts, normalizer, grad_loss, loss, rows)


def linear_extra_grads(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, weight: torch.Tensor | None,
    normalizer: torch.Tensor | None, opts: LossOptions, grad_loss: torch.Tensor, loss: torch.Tensor, chunk: int,
    want_target: bool, want_weight: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(d(loss)/d(probability target), d(loss)/d(class weight)) of the linear loss, from one more
    sweep over chunks of ``chunk`` rows whose logits hold the whole vocabulary (x (rows, D), W (V, D),
    target (rows,) or (rows, V))."""
    n, v = x.shape[0], W.shape[0]
    acc = _acc(x.dtype)
    g_all = grad_loss.reshape(-1) if opts.reduction == "none" else grad_loss.expand(n)
    w = None if weight is None else weight.to(acc)
    grad_target = torch.zeros(target.shape, dtype=acc, device=x.device) if want_target else None
    grad_sum = torch.zeros(v, dtype=acc, device=x.device)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        logits = x[rows].to(acc) @ W.to(acc).t()  # (r, V)
        if b is not None:
            logits += b.to(acc)
        log_probs = _log_probs(logits, opts)
        g = g_all[rows].to(acc)
        if want_weight:
            grad_sum += weight_grad_sum(log_probs, target[rows], g, opts, v)
        if grad_target is not None:
            scaled = log_probs if w is None else log_probs * w
            grad_target[rows] = -(1 - opts.label_smoothing) * g[:, None] * scaled
    grad_weight = None
    if want_weight and weight is not None:
        grad_weight = finish_weight_grad(grad_sum, target, weight, opts, normalizer, grad_loss, loss, n)
    if grad_target is not None:
        if opts.reduction == "mean":
            _, scale = mean_denominator_and_scale(target, weight, opts, rows=n, normalizer=normalizer)
            grad_target = grad_target * scale.to(acc)
        grad_target = grad_target.to(target.dtype)
    return grad_target, grad_weight
