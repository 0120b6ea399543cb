r"""Per-token statistics of tempered logits, and their gradient, written once in the Array API.

With :math:`z = x / T` over the classes, :math:`\mathrm{lse} = \log\sum_c e^{z_c}`,
:math:`p = \mathrm{softmax}(z)` and target :math:`y` (a class index, or ``ignore_index``):

- ``log_prob`` :math:`= \log p_y = z_y - \mathrm{lse}`, the log-probability of the target under the
  tempered distribution (what PPO/GRPO ratios use when sampling at temperature :math:`T`);
- ``entropy`` :math:`H = -\sum_c p_c \log p_c = \mathrm{lse} - \sum_c p_c z_c` (a class with
  :math:`p_c = 0`, e.g. :math:`x_c = -\infty`, adds 0, not :math:`0 \cdot \infty`);
- ``logsumexp`` :math:`= \mathrm{lse}`, of the *tempered* logits: the normaliser of ``log_prob``
  (``log_prob = z_y - logsumexp``), and at :math:`T = 1` the z-loss's lse.

Ignored positions give 0 for all three, and no gradient. The gradient of
:math:`\sum_n g^{lp}_n \log p_{n,y_n} + g^{H}_n H_n + g^{lse}_n \mathrm{lse}_n` is, with
:math:`\partial H/\partial z_c = -p_c(z_c - \sum_j p_j z_j) = -p_c(\log p_c + H)`,

.. math::

    \frac{\partial}{\partial x_c} = \frac{1}{T}\Big(g^{lp}[c = y]
        + p_c\big(g^{lse} - g^{lp} - g^{H}(\log p_c + H)\big)\Big).
"""

from __future__ import annotations

from typing import Any

from .losses import _class_index_terms
from .softmax import classes_back, classes_last, compute_dtype, row_stats


def _stats(xp: Any, input: Any, target: Any, axis: int, ignore_index: int, temperature: float) -> tuple[Any, ...]:
    """(log_prob, entropy, lse, p, log p, valid, onehot) in the compute dtype, classes last."""
    z = xp.astype(classes_last(xp, input, axis), compute_dtype(xp, input.dtype)) / temperature
    stats = row_stats(xp, z)
    zero = xp.zeros((), dtype=z.dtype)
    p = stats.probs(xp)
    # log p with 0 where p = 0 (x = -inf): those classes add 0 to the entropy and to the gradient,
    # and 0 * -inf would be NaN.
    log_p = xp.where(p > 0, stats.log_probs(xp), zero)  # (..., C)
    entropy = -xp.sum(p * log_p, axis=-1)
    terms = _class_index_terms(xp, target, z.shape[-1], ignore_index, None, zero)
    log_prob = xp.sum(xp.where(terms.onehot, stats.log_probs(xp), zero), axis=-1)
    valid = terms.valid
    return (
        log_prob,
        xp.where(valid, entropy, zero),
        xp.where(valid, stats.lse, zero),
        p,
        log_p,
        valid,
        terms.onehot,
    )


def token_stats(xp: Any, input: Any, target: Any, axis: int, ignore_index: int, temperature: float) -> tuple[Any, ...]:
    """(log_prob, entropy, logsumexp), each of the target's shape, in the input's dtype."""
    log_prob, entropy, lse, *_ = _stats(xp, input, target, axis, ignore_index, temperature)
    return tuple(xp.astype(v, input.dtype) for v in (log_prob, entropy, lse))


def token_stats_grad(
    xp: Any, input: Any, target: Any, axis: int, ignore_index: int, temperature: float, upstream: tuple[Any, ...]
) -> Any:
    """d/d(input) of sum(g_lp * log_prob + g_ent * entropy + g_lse * logsumexp); any of the three
    upstream gradients (each of the target's shape) may be None for zero."""
    _, entropy, _, p, log_p, valid, onehot = _stats(xp, input, target, axis, ignore_index, temperature)
    zero = xp.zeros((), dtype=p.dtype)
    g_lp, g_ent, g_lse = (
        xp.zeros_like(entropy) if g is None else xp.where(valid, xp.astype(g, p.dtype), zero) for g in upstream
    )
    a = (g_lse - g_lp - g_ent * entropy)[..., None]
    dz = p * (a - g_ent[..., None] * log_p) + xp.where(onehot, g_lp[..., None], zero)
    return classes_back(xp, xp.astype(dz / temperature, input.dtype), axis)
