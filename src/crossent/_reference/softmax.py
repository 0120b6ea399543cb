"""The stable softmax family, written once in the Array API.

The notebooks compute ``log(sum(exp(x)))`` directly; ``exp`` overflows float32 above x = 88.7 (and
float64 above 709.8), and underflows every term to 0 for very negative rows, so ``log`` returns inf or
-inf. Shifting by the row maximum ``m`` keeps every exponent in (-inf, 0] and at least one term equal
to 1, so the sum lies in [1, C] and neither overflows nor vanishes:

    logsumexp(x) = m + log(sum_j exp(x_j - m))

See Blanchard, Higham & Higham, "Accurately computing the log-sum-exp and softmax functions",
IMA J. Numer. Anal. 41 (2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from .._validate import is_half


def compute_dtype(xp: Any, dtype: Any) -> Any:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    if not is_half(dtype) and xp.finfo(dtype).bits == 64:
        return xp.float64
    return xp.float32


def batch_dtype(xp: Any) -> Any:
    """The dtype of sums over the batch (the loss total and the mean's denominator).

    float64 wherever the library has it: a float32 sum of 10^6 per-row losses loses up to ~log2(10^6)
    ulps even when pairwise, and these sums are only batch-sized, so widening them is cheap. JAX has no
    float64 unless x64 is enabled, and then they stay float32.
    """
    if array_api_compat.is_jax_namespace(xp):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return xp.float32
    return xp.float64


@dataclass(frozen=True)
class RowStats:
    """Per-row statistics over the last axis of ``x`` (shape ``(..., C)``)."""

    shifted: Any  # (..., C): x - m, with m the row maximum (0 for a row of all -inf)
    sum_exp: Any  # (..., 1): sum_j exp(x_j - m), in [1, C] for rows with a finite maximum
    lse: Any  # (...,): logsumexp(x) = m + log(sum_exp)

    def log_probs(self, xp: Any) -> Any:
        # (x - m) - log(sum_exp), not x - lse: the shifted value is exact, and subtracting the small
        # log(sum_exp) from it keeps the low bits that m + log(sum_exp) rounds away at |x| ~ 1e4.
        return self.shifted - xp.log(self.sum_exp)

    def probs(self, xp: Any) -> Any:
        # exp(x - m) / sum_exp: a single rounding per factor, unlike exp(log_probs), whose error
        # grows with |log_probs|.
        return xp.exp(self.shifted) / self.sum_exp


def row_stats(xp: Any, x: Any) -> RowStats:
    """Softmax statistics over the last axis of a float32/float64 array."""
    if x.shape[-1] == 0:  # no classes: the empty sum is 0 and its log -inf, as torch.logsumexp gives
        m = xp.zeros((*x.shape[:-1], 1), dtype=x.dtype, device=array_api_compat.device(x))
    else:
        m = xp.max(x, axis=-1, keepdims=True)  # (..., 1)
    # torch's rule for rows without a finite maximum (the max propagates NaN): a row of all -inf is
    # shifted by 0, so that its sum is 0, its log-sum-exp -inf and its (log-)probabilities NaN; a row
    # holding +inf is shifted by +inf, so that its sum and (log-)probabilities are NaN, while its
    # log-sum-exp is +inf (NaN if it also holds NaN, whose maximum is NaN).
    neg_inf = m == -math.inf
    shift = xp.where(neg_inf, xp.zeros_like(m), m)
    shifted = x - shift  # (..., C), every entry <= 0
    sum_exp = xp.sum(xp.exp(shifted), axis=-1, keepdims=True)  # (..., 1)
    lse = xp.where(m == math.inf, m, shift + xp.log(sum_exp))
    return RowStats(shifted=shifted, sum_exp=sum_exp, lse=lse[..., 0])


def classes_last(xp: Any, x: Any, axis: int) -> Any:
    return x if axis in (-1, x.ndim - 1) else xp.moveaxis(x, axis, -1)


def classes_back(xp: Any, x: Any, axis: int) -> Any:
    return x if axis in (-1, x.ndim - 1) else xp.moveaxis(x, -1, axis)


def logsumexp(xp: Any, x: Any, axis: int, keepdims: bool) -> Any:
    dtype = x.dtype
    stats = row_stats(xp, xp.astype(classes_last(xp, x, axis), compute_dtype(xp, dtype)))
    out = xp.astype(stats.lse, dtype)
    return xp.expand_dims(out, axis=axis) if keepdims else out


def log_softmax(xp: Any, x: Any, axis: int) -> Any:
    dtype = x.dtype
    stats = row_stats(xp, xp.astype(classes_last(xp, x, axis), compute_dtype(xp, dtype)))
    return classes_back(xp, xp.astype(stats.log_probs(xp), dtype), axis)


def softmax(xp: Any, x: Any, axis: int) -> Any:
    dtype = x.dtype
    stats = row_stats(xp, xp.astype(classes_last(xp, x, axis), compute_dtype(xp, dtype)))
    return classes_back(xp, xp.astype(stats.probs(xp), dtype), axis)
