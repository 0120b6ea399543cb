"""crossent's Triton kernel: one program per row, the loss and (optionally) d(loss)/d(logits) in one launch.

Layout. The logits are a contiguous tensor of shape (outer, C, inner): (N, C) has inner = 1, the
image-like (N, C, d1, ...) has outer = N and inner = d1 * ...; classes-last inputs of any rank are
(rows, C) with inner = 1. Row r (r = o * inner + i) holds its classes at
base + c * inner with base = o * C * inner + i, in int64 (inputs past 2^31 elements). A probability
target has the input's shape and offsets; a class-index target is the (rows,) batch, contiguous.

The row is read in blocks of BLOCK classes. Pass 1 keeps an online log-sum-exp (the running maximum m
and sum_c exp(x_c - m), rescaled by exp(m_old - m_new) when m grows: Milakov & Gimelshein, "Online
normalizer calculation for softmax", 2018) and, for probability targets, sum_c w_c t'_c. Pass 2, when
it is needed (the gradient, label smoothing, probability targets), computes log p and p from the final
statistics and writes the gradient where it read the logits. A row of at most BLOCK classes (ONE_BLOCK)
is loaded once and kept in registers for both passes, so that forward and backward read it once and
write the gradient once; a longer row is read twice (the second read of a row just read mostly hits
the L2 cache on a GPU). Which rows are kept, and why, is in crossent.torch._triton (_block).

Non-finite logits follow torch's log_softmax: it subtracts the row maximum whatever it is, so a row
holding +inf or NaN, or all -inf, gives NaN (inf - inf); a -inf logit among finite ones has p = 0 and
log p = -inf. Masked lanes and -inf logits contribute exp(...) = 0 explicitly (exp(-inf - m) with
m = -inf would be NaN).

Only float32 arithmetic: bfloat16 and float16 logits are widened on load and the gradient is rounded
to the input's dtype on store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # libdevice.tanh is not available under the interpreter; this is accurate to a few float32 ulps.
    # |u| < 0.3: the odd Taylor series to u^11 (the next term is below 2e-8 * |u| there); beyond,
    # (1 - e) / (1 + e) with e = exp(-2|u|), whose cancellation (1 - e ~ 2|u|) costs at most a factor 2
    # in relative error at |u| = 0.3.
    a = tl.abs(u)
    a2 = a * a
    series = a * (
        1.0
        + a2
        * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0 + a2 * (-1382.0 / 155925.0)))))
    )
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    t = tl.where(a < 0.3, series, big)
    return tl.where(u < 0, -t, t)


@triton.jit
def _cap(raw, mask, softcap, SOFTCAP: tl.constexpr):
    """(logits widened to float32 and capped, -inf in masked lanes; tanh(x / cap) for the chain rule)."""
    raw = raw.to(tl.float32)
    if SOFTCAP:
        th = _tanh(raw / softcap)
        x = tl.where(mask, softcap * th, float("-inf"))
    else:
        th = raw  # unused
        x = raw
    return x, th


@triton.jit
def _load_logits(x_ptr, offsets, mask, softcap, SOFTCAP: tl.constexpr):
    raw = tl.load(x_ptr + offsets, mask=mask, other=float("-inf"))
    return _cap(raw, mask, softcap, SOFTCAP)


@triton.jit
def _class_terms(weight_ptr, cols, mask, t, eps, C, HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr):
    """(w_c, the coefficient of log p_c in the row's loss sum): w_c t'_c for probability targets ``t``
    (t' = (1 - eps) t + eps / C under smoothing), w_c for class indices (smoothing's uniform term);
    0 in masked lanes."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(mask, 1.0, 0.0)
    if PROB:
        t = t.to(tl.float32)
        if SMOOTH:
            t = (1.0 - eps) * t + eps / C
        wt = tl.where(mask, w * t, 0.0)
    else:
        wt = w
    return w, wt


@triton.jit
def cross_entropy_kernel(
    x_ptr,  # (outer, C, inner) logits, float32/bfloat16/float16
    target_ptr,  # (rows,) int class indices, or (outer, C, inner) probabilities
    weight_ptr,  # (C,) class weights (HAS_WEIGHT)
    weight_sum_ptr,  # (1,) float32 sum_c w_c (HAS_WEIGHT and SMOOTH, class indices)
    upstream_ptr,  # d(loss)/d(row loss): upstream_ptr[row * upstream_stride], float32
    upstream_stride,  # 0 for one scalar shared by every row, 1 for one per row
    loss_ptr,  # (rows,) float32 per-row losses (out)
    grad_ptr,  # like x: the gradient (out; may be x itself: each element is read before it is written)
    n_classes,
    inner,
    ignore_index,
    eps,  # label smoothing
    z_loss,
    softcap,
    PROB: tl.constexpr,  # probability targets
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,  # eps > 0
    ZLOSS: tl.constexpr,  # z_loss > 0
    SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # n_classes <= BLOCK: the row is read once and kept in registers
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // inner
    base = outer * n_classes * inner + (row - outer * inner)  # int64 offsets
    cols0 = tl.arange(0, BLOCK)
    C = n_classes * 1.0  # float32 (not .to(): Triton passes an integer argument equal to 1 as a constant)

    # Pass 1: online max and sum of exponentials over the row (and sum_c w_c t'_c for probabilities).
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    wt_sum = tl.zeros((), tl.float32)
    # A row in one block is kept as loaded (and its probability target): pass 2 widens and caps it
    # again rather than keeping float32 copies alive, and reloads the class weights (C values shared by
    # every row: cache hits).
    raw_keep = tl.full((BLOCK,), float("-inf"), x_ptr.dtype.element_ty)
    t_keep = tl.zeros((BLOCK,), target_ptr.dtype.element_ty)  # (probability targets)
    for start in range(0, n_classes, BLOCK):
        cols = start + cols0
        mask = cols < n_classes
        offsets = base + cols.to(tl.int64) * inner
        raw = tl.load(x_ptr + offsets, mask=mask, other=float("-inf"))
        x, _th = _cap(raw, mask, softcap, SOFTCAP)
        m_new = tl.maximum(m, tl.max(x, 0))
        # m == m_new also covers both -inf (nothing seen yet), where exp(m - m_new) would be NaN.
        alpha = tl.where(m == m_new, 1.0, tl.exp(m - m_new))
        e = tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
        s = s * alpha + tl.sum(e, 0)
        m = m_new
        if PROB:
            t_block = tl.load(target_ptr + offsets, mask=mask, other=0.0)
            _w, wt = _class_terms(weight_ptr, cols, mask, t_block, eps, C, HAS_WEIGHT, PROB, SMOOTH)
            wt_sum += tl.sum(wt, 0)
            if ONE_BLOCK:
                t_keep = t_block
        if ONE_BLOCK:
            raw_keep = raw

    log_s = tl.log(s)
    # log p_c = (x_c - m) - log(s): the shifted value is exact, log(s) in [0, log C] is small (as the
    # reference's RowStats.log_probs; m + log(s) - x_c would lose low bits at |x| ~ 1e4).
    lse = m + log_s

    if PROB:
        valid = True
        loss = tl.zeros((), tl.float32)
        coef = wt_sum  # gradient: p_c * sum(w t') - w_c t'_c
        y = 0
    else:
        y = tl.load(target_ptr + row).to(tl.int64)
        valid = y != ignore_index
        in_range = (y >= 0) & (y < n_classes)
        y_safe = tl.where(valid & in_range, y, 0)
        x_y, _th_y = _load_logits(x_ptr, base + y_safe * inner, True, softcap, SOFTCAP)
        if HAS_WEIGHT:
            w_y = tl.load(weight_ptr + y_safe).to(tl.float32)
        else:
            w_y = 1.0
        nll = (m - x_y) + log_s  # -log p_y
        # gradient: coef * (p_c - [c = y]) + smoothing term. An out-of-range class (unchecked on a GPU:
        # that would synchronise the host) makes coef, and so the row's loss and gradient, NaN.
        coef = tl.where(in_range, (1.0 - eps) * w_y, float("nan"))
        loss = coef * nll
        if SMOOTH:
            if HAS_WEIGHT:
                w_total = tl.load(weight_sum_ptr).to(tl.float32)
            else:
                w_total = C
        else:
            w_total = 0.0

    if ZLOSS:
        coef_z = 2.0 * z_loss * lse
        loss += z_loss * lse * lse
    else:
        coef_z = 0.0

    # Pass 2: log p and p from the final statistics; the smoothing or probability sums; the gradient.
    if WRITE_GRAD or SMOOTH or PROB:
        g = tl.load(upstream_ptr + row * upstream_stride).to(tl.float32)
        acc = tl.zeros((), tl.float32)  # sum_c w_c t'_c log p_c, or sum_c w_c log p_c
        for start in range(0, n_classes, BLOCK):
            cols = start + cols0
            mask = cols < n_classes
            offsets = base + cols.to(tl.int64) * inner
            if ONE_BLOCK:
                raw = raw_keep
                t = t_keep
            else:
                raw = tl.load(x_ptr + offsets, mask=mask, other=float("-inf"))
                if PROB:
                    t = tl.load(target_ptr + offsets, mask=mask, other=0.0)
                else:
                    t = t_keep  # unused
            x, th = _cap(raw, mask, softcap, SOFTCAP)
            w, wt = _class_terms(weight_ptr, cols, mask, t, eps, C, HAS_WEIGHT, PROB, SMOOTH)
            shifted = x - m
            log_p = shifted - log_s
            # exp(x - m) / s: one rounding per factor (not exp(log_p)); 0 for -inf and masked lanes.
            p = tl.where(x == float("-inf"), 0.0, tl.exp(shifted)) / s
            if PROB or SMOOTH:
                acc += tl.sum(wt * tl.where(mask, log_p, 0.0), 0)  # padding lanes: 0 * -inf
            if PROB:
                d = p * coef - wt
            else:
                # (p - onehot) * coef: the 1 of the one-hot is subtracted at the target column only.
                d = p * coef - tl.where(cols == y, coef, 0.0)
                if SMOOTH:
                    d += (eps / C) * (p * w_total - w)
            if WRITE_GRAD:
                if ZLOSS:
                    d += coef_z * p
                d = g * d
                if SOFTCAP:
                    d = d * ((1.0 - th) * (1.0 + th))  # d(cap tanh(x/cap))/dx = 1 - tanh^2
                # where, not a multiply by the mask: an ignored row may hold NaN and must get exactly 0.
                d = tl.where(valid, d, 0.0)
                tl.store(grad_ptr + offsets, d.to(grad_ptr.dtype.element_ty), mask=mask)
        if PROB:
            loss += -acc
        elif SMOOTH:
            loss += (eps / C) * -acc

    loss = tl.where(valid, loss, 0.0)
    tl.store(loss_ptr + row, loss)


@triton.jit
def slice_gradient_kernel(
    x_ptr,  # (rows, V_slice) logits of one vocabulary slice, contiguous, float32/bfloat16/float16
    target_ptr,  # (rows,) global class indices, or (rows, V_slice) the slice's probabilities
    weight_ptr,  # (V_slice,) the slice's class weights (HAS_WEIGHT)
    lse_ptr,  # (rows,) float32 log-sum-exp over the whole vocabulary
    a_ptr,  # (rows,) float32 coefficient of the softmax
    b_ptr,  # (rows,) float32 coefficient of the uniform term (times w_c)
    fix_ptr,  # (rows,) float32 coefficient of the one-hot
    scale_ptr,  # (rows,) float32 upstream gradient
    valid_ptr,  # (rows,) bool: the rows that count
    grad_ptr,  # (rows, V_slice) the gradient (out; may be x_ptr)
    n_classes,  # V_slice
    start,  # the slice's first global class
    eps,
    total,  # the whole vocabulary's size (for the smoothed probabilities)
    softcap,
    PROB: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One slice's share of the gradient from the combined statistics (crossent.torch._vocab_slices):
    scale * (A p_c - B w_c - fix [c = y]) for class indices, scale * (A p_c - w_c t'_c) for
    probabilities, p_c = exp(x_c - lse) with the whole vocabulary's lse; times 1 - tanh^2 under a cap."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n_classes
    lse = tl.load(lse_ptr + row)
    valid = tl.load(valid_ptr + row) != 0
    g = tl.where(valid, tl.load(scale_ptr + row), 0.0)
    A = tl.load(a_ptr + row) * g
    if PROB:
        y_local = -1
        B = 0.0
        fix = 0.0
    else:
        y_local = tl.load(target_ptr + row).to(tl.int64) - start
        B = tl.load(b_ptr + row) * g
        fix = tl.load(fix_ptr + row) * g
    for block_start in range(0, n_classes, BLOCK):
        cols = block_start + tl.arange(0, BLOCK)
        mask = cols < n_classes
        offsets = base + cols
        x, th = _load_logits(x_ptr, offsets, mask, softcap, SOFTCAP)
        p = tl.exp(x - lse)  # NaN where lse is -inf (no finite logit in the vocabulary), as the reference
        if PROB:
            t = tl.load(target_ptr + offsets, mask=mask, other=0.0)
        else:
            t = 0.0
        w, wt = _class_terms(weight_ptr, cols, mask, t, eps, total * 1.0, HAS_WEIGHT, PROB, SMOOTH)
        d = A * p
        if PROB:
            d -= g * wt
        else:
            if SMOOTH:
                d -= B * w
            d -= tl.where(cols == y_local, fix, 0.0)
        if SOFTCAP:
            d = d * ((1.0 - th) * (1.0 + th))
        # where, not the 0 in g: a row that does not count may hold NaN and must still get exactly 0.
        d = tl.where(valid, d, 0.0)
        tl.store(grad_ptr + offsets, d.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def nll_kernel(
    x_ptr,  # (outer, C, inner) log-probabilities, float32/bfloat16/float16
    target_ptr,  # (rows,) int class indices
    weight_ptr,  # (C,) class weights (HAS_WEIGHT)
    loss_ptr,  # (rows,) float32 per-row losses (out)
    n_rows,
    n_classes,
    inner,
    ignore_index,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,  # rows per program
):
    """-w_y x_y per row (0 where ignored): a gather, BLOCK rows a program. An out-of-range class
    (unchecked on a GPU) gives NaN, as in cross_entropy_kernel."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = row < n_rows
    outer = row // inner
    base = outer * n_classes * inner + (row - outer * inner)  # int64 offsets
    y = tl.load(target_ptr + row, mask=live, other=0).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < n_classes)
    y_safe = tl.where(valid & in_range, y, 0)
    x_y = tl.load(x_ptr + base + y_safe * inner, mask=live, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y_safe, mask=live, other=0.0).to(tl.float32)
    else:
        w_y = tl.full((BLOCK,), 1.0, tl.float32)
    coef = tl.where(in_range, w_y, float("nan"))
    loss = tl.where(valid, -(coef * x_y), 0.0)
    tl.store(loss_ptr + row, loss, mask=live)
