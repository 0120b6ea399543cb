"""The cross-entropy of logits whose classes come in slices: each slice is reduced to a few numbers per
row, those are combined, and each slice's gradient is written from the combined numbers.

Two users: the vocabulary-parallel loss (crossent.torch.distributed), whose slices live on different
ranks and are combined by all-reduces, and the linear loss at huge vocabularies (crossent.torch._linear),
whose slices are chunks of the vocabulary computed one after another and combined locally.

Per row, a slice gives its log-sum-exp l_k and raw sums (the target's logit if the slice holds it, and
as the options need them sum_c w_c x_c, sum_c w_c t'_c x_c, sum_c w_c t'_c, with t' the smoothed
probability target; a term whose weight is exactly 0 adds 0, even at a -inf logit). A slice of -inf
logits (l_k = -inf) contributes exactly nothing: exp(l_k - m) = 0, and a zero gradient. The combination shifts by
m = max_k l_k: sum_c exp(x_c - m) = sum_k exp(l_k - m), which lies in [1, slices] and so never overflows,
and each raw sum is shifted by m times its weight total, so that only differences of nearby numbers
are taken.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from .. import _native
from .._validate import LossOptions
from . import _backend
from ._ops import _as_tensor, _numpy_view, cpu_buffer


@dataclasses.dataclass(frozen=True)
class VocabSlice:
    """Classes [start, end) of ``total``, and the global class weights (or None)."""

    start: int
    end: int
    total: int
    weight: torch.Tensor | None  # (total,)

    def local_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.weight is None else self.weight[self.start : self.end].to(dtype)


@dataclasses.dataclass
class SliceStats:
    """One slice's numbers per row (shape (rows,)), or several slices' stacked (shape (slices, rows))."""

    lse: torch.Tensor  # log sum_c exp(x_c) over the slice
    sums: list[torch.Tensor]  # raw sums, see the module's docstring
    weights: list[torch.Tensor]  # what each raw sum's shift by m is multiplied by

    @staticmethod
    def stack(parts: list[SliceStats]) -> SliceStats:
        return SliceStats(
            torch.stack([p.lse for p in parts]),
            [torch.stack(column) for column in zip(*(p.sums for p in parts), strict=True)],
            [torch.stack(column) for column in zip(*(p.weights for p in parts), strict=True)],
        )


@dataclasses.dataclass
class RowTerms:
    """What the gradient of a slice needs per row, from the combined statistics (see slice_gradient)."""

    lse: torch.Tensor  # log sum_c exp(x_c) over the whole vocabulary
    lse_local: torch.Tensor  # ... over the slice at hand
    A: torch.Tensor  # the softmax's coefficient
    B: torch.Tensor  # the uniform (label-smoothing) term's coefficient, times the class weight
    fix: torch.Tensor  # the one-hot's coefficient at the target class
    valid: torch.Tensor  # rows that count (not ignored)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_view(x: torch.Tensor) -> np.ndarray | None:
    """A NumPy view of (rows, V_slice) compute-dtype logits when the fused CPU kernel takes them."""
    if x.shape[1] == 0 or _backend.resolve(x) != "native":
        return None
    view = _numpy_view(x.contiguous())
    return view if view is not None and _native.supports(view) else None


def _capped(local: torch.Tensor, opts: LossOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits in the compute dtype after the soft cap, and tanh(x / cap) for the gradient."""
    x = local.to(compute_dtype(local.dtype))  # no copy for float32 and float64
    if opts.softcap is None:
        return x, None
    tanh_x = torch.tanh(x / opts.softcap)
    return opts.softcap * tanh_x, tanh_x


def _weighted_sum(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_c weights_c * x_c per row, with 0 for the terms whose weight is exactly 0 (where x_c may be
    -inf: IEEE's 0 * -inf is NaN)."""
    return torch.where(weights == 0, torch.zeros((), dtype=x.dtype, device=x.device), weights * x).sum(1)


def slice_statistics(local: torch.Tensor, target: torch.Tensor, sl: VocabSlice, opts: LossOptions) -> SliceStats:
    """One slice's numbers per row, from (rows, V_slice) logits; ``target`` holds global class ids, or
    the slice's class probabilities."""
    x, _ = _capped(local, opts)
    view = _kernel_view(x)
    lse = _as_tensor(_native.KERNEL.logsumexp(view, 1, False), x.dtype) if view is not None else torch.logsumexp(x, 1)
    w_local = sl.local_weight(x.dtype)
    sums, weights = [], []
    if target.is_floating_point():
        eps = opts.label_smoothing
        t = target.to(x.dtype) if eps == 0 else (1 - eps) * target.to(x.dtype) + eps / sl.total
        wt = t if w_local is None else t * w_local
        wt_sum = wt.sum(1)
        sums += [_weighted_sum(wt, x), wt_sum]
        weights += [wt_sum, torch.zeros_like(wt_sum)]
        return SliceStats(lse, sums, weights)  # the smoothing is in t' already
    else:
        local_y = target - sl.start
        mine = (target != opts.ignore_index) & (local_y >= 0) & (local_y < sl.end - sl.start)
        picked = torch.gather(x, 1, torch.where(mine, local_y, 0)[:, None])[:, 0]
        zero = torch.zeros_like(picked)
        sums.append(torch.where(mine, picked, zero))
        weights.append(torch.where(mine, torch.ones_like(picked), zero))
    if opts.label_smoothing > 0:
        if w_local is None:
            wx, w_sum = x.sum(1), torch.full((x.shape[0],), float(x.shape[1]), dtype=x.dtype, device=x.device)
        else:
            wx, w_sum = _weighted_sum(w_local.expand_as(x), x), w_local.sum().expand(x.shape[0])
        sums.append(wx)
        weights.append(w_sum)
    return SliceStats(lse, sums, weights)


Reduce = Callable[[torch.Tensor], torch.Tensor]


def combine(
    stats: SliceStats, target: torch.Tensor, sl: VocabSlice, opts: LossOptions, reduce_max: Reduce, reduce_sum: Reduce
) -> tuple[torch.Tensor, RowTerms]:
    """Per-row losses over the whole vocabulary and the gradient's row terms, from the slices' numbers.

    ``reduce_max`` and ``reduce_sum`` combine over the slices: all-reduces across ranks, or reductions
    over the first axis of stacked statistics. ``RowTerms.lse_local`` is this call's ``stats.lse``.
    """
    m = reduce_max(stats.lse.clone())
    # torch's rule: an all -inf row shifts by 0 (its loss is NaN: log 0 - -inf); a row holding +inf (or
    # NaN) shifts by it, so that its loss and gradient are NaN.
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    columns = [torch.exp(stats.lse - m)] + [s - w * m for s, w in zip(stats.sums, stats.weights, strict=True)]
    packed = reduce_sum(torch.stack(columns, -1))  # (rows, k)
    log_s = torch.log(packed[:, 0])
    lse = m + log_s
    eps = opts.label_smoothing
    w = None if sl.weight is None else sl.weight.to(log_s.dtype)
    w_total = float(sl.total) if w is None else w.sum()
    uniform = eps / sl.total
    if target.is_floating_point():
        wtx, wt_s = packed[:, 1], packed[:, 2]  # of the smoothed target t'
        loss = log_s * wt_s - wtx
        A, B, fix = wt_s, torch.ones_like(log_s), torch.zeros_like(log_s)
        valid = torch.ones(log_s.shape, dtype=torch.bool, device=log_s.device)
    else:
        valid = target != opts.ignore_index
        xy = packed[:, 1]
        wx = packed[:, 2] if eps > 0 else torch.zeros_like(log_s)
        # An unchecked class index outside [0, total) (compiled, on an accelerator) gets a NaN weight,
        # so that its row is NaN rather than a finite loss without its target's logit.
        outside = valid & ((target < 0) | (target >= sl.total))
        safe = torch.where(valid & ~outside, target, 0)
        w_y = torch.where(valid, torch.ones_like(log_s) if w is None else w[safe], torch.zeros_like(log_s))
        w_y = torch.where(outside, torch.full_like(w_y, torch.nan), w_y)
        # A target without weight (eps = 1, w_y = 0) adds 0 even at p_y = 0; 0 * log_s keeps a row
        # without a finite maximum NaN.
        y_scale = (1 - eps) * w_y
        loss = torch.where(y_scale == 0, 0 * log_s, y_scale * (log_s - xy)) + uniform * (log_s * w_total - wx)
        A = (1 - eps) * w_y + uniform * w_total
        B = torch.full_like(log_s, uniform)
        fix = (1 - eps) * w_y
    if opts.z_loss > 0:
        loss = loss + opts.z_loss * lse**2
        A = A + 2 * opts.z_loss * lse
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return loss, RowTerms(lse, stats.lse, A, B, fix, valid)


def _global_softmax_(
    x: torch.Tensor, terms: RowTerms, row_scale: torch.Tensor, out: torch.Tensor | None
) -> torch.Tensor:
    """row_scale * exp(x - lse) for the slice, written into ``out`` (or a new tensor).

    On CPU the kernel's fused slice softmax exp(x - l_k) is rescaled by exp(l_k - lse) per row: two
    passes over the slice instead of the subtraction, exponential and scaling of the torch ops.
    """
    if out is None or out.dtype != x.dtype:
        out = cpu_buffer(tuple(x.shape), x.dtype) if x.device.type == "cpu" else torch.empty_like(x)
    view = _kernel_view(x)
    out_view = None if view is None else _numpy_view(out)
    if view is not None and out_view is not None and out.is_contiguous():
        _native.KERNEL.softmax(view, 1, out=out_view)
        factor = torch.exp(terms.lse_local - terms.lse)  # 0 for a slice of -inf logits
        out.mul_((factor * row_scale)[:, None])
        # The softmax of a slice of -inf logits is NaN (0 / 0) where its share of the row's is 0: such a
        # slice contributes nothing when the row has a finite log-sum-exp (else the row is NaN, as torch's).
        empty = torch.isneginf(terms.lse_local) & torch.isfinite(terms.lse)
        return out.index_fill_(0, torch.nonzero(empty).squeeze(1), 0.0)
    torch.sub(x, terms.lse[:, None], out=out)
    return out.exp_().mul_(row_scale[:, None])


def slice_gradient(
    local: torch.Tensor,
    target: torch.Tensor,
    sl: VocabSlice,
    opts: LossOptions,
    terms: RowTerms,
    upstream: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """d(loss)/d(slice logits) for per-row upstream gradients, written in place into one buffer.

    grad = upstream * (A * softmax(x) - B * w - fix * onehot(y))  (hard targets), or
    grad = upstream * (A * softmax(x) - w * t')                   (probability targets, t' smoothed),
    times 1 - tanh(x / cap)^2 with a soft cap; rows that do not count get 0.
    """
    if _backend.resolve(local) == "triton":  # one launch: the kernel reads the slice once, writes it once
        from . import _triton

        w = None if sl.weight is None else sl.weight[sl.start : sl.end]
        grad = _triton.slice_gradient(local, target, sl.start, sl.total, w, opts, terms, upstream, out)
        return grad if out is not None else grad.to(local.dtype)
    x, tanh_x = _capped(local, opts)
    dtype = x.dtype
    g = torch.where(terms.valid, upstream.to(dtype), torch.zeros_like(terms.A))
    grad = _global_softmax_(x, terms, terms.A * g, out)
    w_local = sl.local_weight(dtype)
    if target.is_floating_point():
        t_prime = (1 - opts.label_smoothing) * target.to(dtype) + opts.label_smoothing / sl.total
        if w_local is not None:
            t_prime = t_prime * w_local
        grad.sub_(t_prime.mul_(g[:, None]))
    else:
        if opts.label_smoothing > 0:  # B is 0 without smoothing: skip a pass over the slice
            coefficient = (terms.B * g)[:, None]
            grad.sub_(coefficient if w_local is None else coefficient * w_local)
        local_y = target - sl.start
        mine = terms.valid & (local_y >= 0) & (local_y < sl.end - sl.start)
        rows = torch.nonzero(mine).squeeze(1)
        grad[rows, local_y[rows]] -= (terms.fix * g)[rows]
    # Ignored rows were scaled by 0 above, but a row of -inf logits gives NaN there: zero them (by
    # index, to touch only those rows).
    grad.index_fill_(0, torch.nonzero(~terms.valid).squeeze(1), 0.0)
    if tanh_x is not None:
        grad.mul_((1 - tanh_x) * (1 + tanh_x))
    if out is not None and grad is not out:
        return out.copy_(grad)
    return grad.to(local.dtype)
