"""Per-token statistics with autograd: crossent.torch.token_stats on given logits, and
crossent.torch.linear_token_stats fused with the output layer (never the N x V logits).

Both return crossent.TokenStats (log_prob, entropy, logsumexp of the tempered logits; 0 at ignored
positions). The math and its gradient are in crossent._reference.token_stats; on the CPU the native
kernel computes the statistics in one sweep per row and, in backward, the gradient over the logits.
The backward recomputes the statistics (or, for the linear one, the chunk's logits) rather than
saving anything of size N x V.
"""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as xp_torch
import torch

from .. import _native, _validate
from .._reference.softmax import classes_back, classes_last
from .._reference.token_stats import token_stats as reference_stats
from .._reference.token_stats import token_stats_grad as reference_grad
from .._token_stats import TokenStats, check_temperature
from . import _backend
from ._linear import (
    _CHUNK_BUDGET_BYTES,
    _MIN_VOCAB_BLOCK,
    _buffer,
    _chunk_shape,
    _grad_buffers,
    _input_grad,
    _linear_into,
    _matmul_dtype,
    add_block_grads,
    prepare_arguments,
)
from ._ops import _numpy_view, _options, cpu_buffer, first_derivative_only
from ._vocab_slices import compute_dtype


def _native_rows(x: torch.Tensor) -> bool:
    """Whether the kernel computes these (rows, classes) logits; else torch operations do (the backend
    crossent.torch.use_backend chose: the statistics have no Triton kernel, so a Triton backend chosen
    by name raises, and "auto" runs torch operations off the CPU)."""
    backend = _backend.resolve(x)
    if backend == "triton" and _backend.explicit():
        raise RuntimeError("crossent.torch.use_backend('triton'): the token statistics have no Triton kernel")
    if backend != "native" or x.numel() == 0:
        return False
    view = _numpy_view(x)
    if view is not None and _native.supports(view):
        return True
    if _backend.explicit():
        raise _backend.native_unavailable(f"it does not take {x.dtype} tensors")
    return False


def _rows_stats(
    x: torch.Tensor, target: torch.Tensor, ignore_index: int, temperature: float,
    upstream: tuple[torch.Tensor | None, ...] | None = None, grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The kernel on contiguous (rows, classes) logits: the three statistics (rows,) in the compute
    dtype; with ``upstream``, the gradient written to ``grad`` (which may be ``x``)."""
    xv, tv = _numpy_view(x), _numpy_view(target.contiguous())
    assert xv is not None and tv is not None
    ups = None
    if upstream is not None:
        ups = tuple(
            None if g is None else _numpy_view(g.detach().to(compute_dtype(x.dtype)).contiguous()) for g in upstream
        )
    gv = None if grad is None else _numpy_view(grad)
    outs = _native.token_stats(xv, tv, ignore_index, temperature, upstream=ups, grad=gv)  # type: ignore[arg-type]
    return tuple(torch.from_numpy(v) for v in outs)


class _TokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, target: torch.Tensor, axis: int, temperature: float, ignore_index: int):
        ctx.set_materialize_grads(False)
        ctx.axis, ctx.temperature, ctx.ignore_index = axis, temperature, ignore_index
        ctx.save_for_backward(x, target)
        rows_x = classes_last(xp_torch, x, axis)
        if _native_rows(rows_x):
            batch = tuple(rows_x.shape[:-1])
            flat = rows_x.contiguous().reshape(-1, rows_x.shape[-1])
            stats = _rows_stats(flat, target.reshape(-1), ignore_index, temperature)
            return tuple(s.reshape(batch).to(x.dtype) for s in stats)
        return reference_stats(xp_torch, x.detach(), target, axis, ignore_index, temperature)

    @staticmethod
    @first_derivative_only("token_stats")
    def backward(ctx: Any, g_lp, g_ent, g_lse):
        x, target = ctx.saved_tensors
        if g_lp is None and g_ent is None and g_lse is None:
            return None, None, None, None, None
        axis, temperature, ignore_index = ctx.axis, ctx.temperature, ctx.ignore_index
        rows_x = classes_last(xp_torch, x, axis)
        if _native_rows(rows_x):
            flat = rows_x.contiguous().reshape(-1, rows_x.shape[-1])
            grad = cpu_buffer(tuple(flat.shape), x.dtype)
            ups = tuple(None if g is None else g.reshape(-1) for g in (g_lp, g_ent, g_lse))
            _rows_stats(flat, target.reshape(-1), ignore_index, temperature, ups, grad)
            dx = classes_back(xp_torch, grad.reshape(rows_x.shape), axis)
        else:
            dx = reference_grad(xp_torch, x, target, axis, ignore_index, temperature, (g_lp, g_ent, g_lse))
        return dx, None, None, None, None


def token_stats(
    input: torch.Tensor, target: torch.Tensor, *, axis: int | None = None, temperature: float = 1.0,
    ignore_index: int = -100,
) -> TokenStats:  # fmt: skip
    r"""Per-position log-probability of the target, entropy and logsumexp of ``input / temperature``,
    differentiable with respect to ``input``.

    The same statistics as :func:`crossent.token_stats` (see there for the math, shapes and dtypes),
    for tensors: CPU tensors run on the native kernel (forward and backward), others on torch
    operations. The backward recomputes the softmax instead of saving it: no memory of the logits'
    size is kept between forward and backward. Gradients:
    :math:`\partial \log p_y/\partial x_c = ([c = y] - p_c)/T`,
    :math:`\partial H/\partial x_c = -p_c(\log p_c + H)/T`,
    :math:`\partial\,\mathrm{lse}/\partial x_c = p_c/T`. No second derivative (backward with
    ``create_graph=True`` raises).

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> x = torch.randn(4, 10, requires_grad=True)
    >>> y = torch.tensor([1, 2, -100, 9])
    >>> s = ct.token_stats(x, y, temperature=0.7)
    >>> (s.log_prob.sum() + 0.01 * s.entropy.sum()).backward()
    >>> ref = torch.log_softmax(x.detach() / 0.7, 1)[[0, 1, 3], [1, 2, 9]]
    >>> bool(torch.allclose(s.log_prob[[0, 1, 3]], ref, atol=1e-6)), float(s.log_prob[2].detach())
    (True, 0.0)
    """
    for name, value in (("input", input), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    temperature = check_temperature(temperature)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    shape = _validate.loss_shape(xp_torch, input, target, axis, allow_probabilities=False)
    _validate.check_class_indices(xp_torch, target, shape.n_classes, ignore_index)
    stats = _TokenStats.apply(input, target, shape.class_axis, temperature, ignore_index)
    return TokenStats(*stats)


# Chunks of whole rows whose logits (and their gradient, over them) take at most this many bytes, even
# when linear_cross_entropy would split the vocabulary instead (it does past 4 budgets of 24 MiB):
# the statistics have no vocabulary-split forward, so very large vocabularies get fewer rows per chunk.
_MAX_CHUNK_BYTES = 4 * (24 << 20)


def _token_chunk(n_classes: int, mm_dtype: torch.dtype, chunk_size: int | None) -> int:
    rows, classes = _chunk_shape(n_classes, mm_dtype.itemsize, chunk_size, None)
    if chunk_size is None and classes < n_classes:
        rows = max(1, _MAX_CHUNK_BYTES // (n_classes * mm_dtype.itemsize))
    return rows


def _vocab_block(n_rows: int, n_classes: int, mm_dtype: torch.dtype) -> int:
    """Classes per block of the backward over vocabulary blocks: its logits (mm_dtype), their float32
    copy for half-precision ones, and the probabilities (float32) within one 24 MiB budget of
    linear_cross_entropy's, at least _MIN_VOCAB_BLOCK classes."""
    per_class = mm_dtype.itemsize + 4 + (4 if mm_dtype.itemsize < 4 else 0)
    return min(n_classes, max(_MIN_VOCAB_BLOCK, _CHUNK_BUDGET_BYTES // (max(1, n_rows) * per_class)))


class _LinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, W, b, target, temperature: float, ignore_index: int, chunk: int, by_vocab: bool):
        ctx.set_materialize_grads(False)
        rows = torch.nonzero(target != ignore_index).squeeze(1)  # ignored rows never reach the matmul
        n = x.shape[0]
        cdt = compute_dtype(x.dtype)
        out = [torch.zeros(n, dtype=cdt, device=x.device) for _ in range(3)]
        mm_dtype = _matmul_dtype(x)
        if by_vocab:
            stats = _forward_by_vocab(x, W, b, target, rows, temperature)
            for o, s in zip(out, stats, strict=True):
                o.index_copy_(0, rows, s)
        else:
            buffer = _buffer((min(chunk, max(1, rows.numel())), W.shape[0]), mm_dtype, x.device)
            for start in range(0, rows.numel(), chunk):
                idx = rows[start : start + chunk]
                logits = _linear_into(buffer[: idx.numel()], x.index_select(0, idx).to(mm_dtype), W, b)
                stats = _chunk_stats(logits, target.index_select(0, idx), ignore_index, temperature)
                for o, s in zip(out, stats, strict=True):
                    o.index_copy_(0, idx, s.to(cdt))
        # The backward over vocabulary blocks reads each row's entropy and logsumexp (2 x N numbers).
        ctx.save_for_backward(x, W, b, target, rows, *(out[1:] if by_vocab else ()))
        ctx.temperature, ctx.ignore_index, ctx.chunk, ctx.by_vocab = temperature, ignore_index, chunk, by_vocab
        return tuple(o.to(x.dtype) for o in out)

    @staticmethod
    @first_derivative_only("linear_token_stats")
    def backward(ctx: Any, g_lp, g_ent, g_lse):
        x, W, b, target, rows, *stats = ctx.saved_tensors
        if g_lp is None and g_ent is None and g_lse is None:
            return None, None, None, None, None, None, None, None
        ups = (g_lp, g_ent, g_lse)
        if ctx.by_vocab:
            dx, dW, db = _backward_by_vocab(x, W, b, target, rows, stats[0], stats[1], ups, ctx.temperature)
        else:
            dx, dW, db = _backward_by_rows(x, W, b, target, rows, ups, ctx.temperature, ctx.ignore_index, ctx.chunk)
        return dx, dW, db, None, None, None, None, None


def _forward_by_vocab(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    rows: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""(log_prob, entropy, logsumexp) of the counted rows, over blocks of the vocabulary with all the
    rows in each (large products; half-precision weights converted once a block). Each block k gives
    its own statistics (the kernel, with targets inside it): :math:`l_k` = logsumexp, :math:`H_k`, and
    the target's log-probability within the block; over the disjoint blocks, with
    :math:`w_k = e^{l_k - l}`, :math:`l = \log\sum_k e^{l_k}`, :math:`H = \sum_k w_k (H_k - \log w_k)`
    (the entropy of a mixture of distributions on disjoint supports) and
    :math:`\log p_y = \log p^{(k)}_y + l_k - l` for the block holding y."""
    n_rows, cdt, mm_dtype = rows.numel(), compute_dtype(x.dtype), _matmul_dtype(x)
    if n_rows == 0:
        empty = torch.zeros(0, dtype=cdt, device=x.device)
        return empty, empty, empty
    v = W.shape[0]
    block = _vocab_block(n_rows, v, mm_dtype)
    x_c, t_c = x.index_select(0, rows).to(mm_dtype), target.index_select(0, rows)
    buffer = _buffer((n_rows * block,), mm_dtype, x.device)
    lse_k, ent_k = [], []
    log_prob = torch.zeros(n_rows, dtype=cdt, device=x.device)
    for v0 in range(0, v, block):
        v1 = min(v, v0 + block)
        logits = _linear_into(
            buffer[: n_rows * (v1 - v0)].view(n_rows, v1 - v0), x_c, W[v0:v1], None if b is None else b[v0:v1]
        )
        mine = (t_c >= v0) & (t_c < v1)
        local = torch.where(mine, t_c - v0, 0)  # every row counted: each block's statistics are wanted
        lp, ent, lse = _chunk_stats(logits, local, -1, temperature)
        lse_k.append(lse.to(cdt))
        ent_k.append(ent.to(cdt))
        log_prob = torch.where(mine, lp.to(cdt) + lse.to(cdt), log_prob)  # z_y, for now
    ls, hs = torch.stack(lse_k), torch.stack(ent_k)  # (blocks, rows)
    lse = torch.logsumexp(ls, 0)
    log_w = ls - lse
    w = log_w.exp()
    # A block of -inf logits only (w = 0; its H is NaN) adds nothing.
    entropy = torch.where(w > 0, w * (hs - log_w), 0.0).sum(0)
    # torch's NaN log_softmax for a row holding +inf or NaN, or only -inf (lse not finite).
    finite = torch.isfinite(lse)
    return torch.where(finite, log_prob - lse, torch.nan), torch.where(finite, entropy, torch.nan), lse


def _backward_by_rows(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, rows: torch.Tensor,
    ups: tuple[Any, ...], temperature: float, ignore_index: int, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Chunks of whole rows: each chunk's logits once more, the kernel's gradient over them, and the
    weight gradient accumulated over the chunks in float32."""
    dx, dW, db = _grad_buffers(x, W, b)
    mm_dtype = _matmul_dtype(x)
    buffer = _buffer((min(chunk, max(1, rows.numel())), W.shape[0]), mm_dtype, x.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        x_c = x.index_select(0, idx).to(mm_dtype)
        logits = _linear_into(buffer[: idx.numel()], x_c, W, b)
        ups_c = tuple(None if g is None else g.index_select(0, idx) for g in ups)
        dlogits = _chunk_grad(logits, target.index_select(0, idx), ignore_index, temperature, ups_c)
        dx.index_copy_(0, idx, _input_grad(dlogits, W).to(dx.dtype))
        dW.addmm_(dlogits.t().to(dW.dtype), x_c.to(dW.dtype))  # float32 accumulation over chunks
        if db is not None:
            db += dlogits.sum(0, dtype=db.dtype)
    return dx, dW, db


def _backward_by_vocab(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, rows: torch.Tensor,
    entropy: torch.Tensor, lse: torch.Tensor, ups: tuple[Any, ...], temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    r"""All the counted rows at once, over blocks of the vocabulary: each block's logits once more, its
    gradient from the forward's logsumexp and entropy (crossent._reference.token_stats's formula,
    :math:`p_c(a - e \log p_c) + [c = y] g^{lp}/T` with :math:`a = (g^{lse} - g^{lp} - g^H H)/T`,
    :math:`e = g^H/T`), and add_block_grads: the block of the weight gradient is one product over all
    the rows, accumulated in float32 inside the matmul and written once in the weight's dtype (no
    float32 copy of the whole weight gradient), the input's gradient accumulated in float32 (N x D)."""
    n_rows, cdt, mm_dtype = rows.numel(), compute_dtype(x.dtype), _matmul_dtype(x)
    dx, dW, db = _grad_buffers(x, W, b, dW_dtype=W.dtype)
    if n_rows == 0:
        return dx, dW, db
    v = W.shape[0]
    block = _vocab_block(n_rows, v, mm_dtype)
    x_c, t_c = x.index_select(0, rows).to(mm_dtype), target.index_select(0, rows)
    g_lp, g_ent, g_lse = (None if g is None else g.index_select(0, rows).to(cdt) for g in ups)
    h, m = entropy.index_select(0, rows), lse.index_select(0, rows)
    inv_t = 1.0 / temperature
    zero = torch.zeros_like(m)
    a = (zero if g_lse is None else g_lse) - (zero if g_lp is None else g_lp)
    if g_ent is not None:
        a = a - g_ent * h
    # A row holding +inf or NaN (a logsumexp of +inf or NaN): NaN throughout, as torch and the kernel give.
    a = torch.where(torch.isfinite(m), a * inv_t, torch.nan)[:, None]
    e = None if g_ent is None else (g_ent * -inv_t)[:, None]
    buffer = _buffer((n_rows * block,), mm_dtype, x.device)
    p_buffer = None if e is None else _buffer((n_rows * block,), cdt, x.device)
    dx_c = torch.zeros(n_rows, x.shape[1], dtype=cdt, device=x.device)
    for v0 in range(0, v, block):
        v1 = min(v, v0 + block)
        shape = (n_rows, v1 - v0)
        logits = _linear_into(buffer[: n_rows * (v1 - v0)].view(shape), x_c, W[v0:v1], None if b is None else b[v0:v1])
        log_p = logits if logits.dtype == cdt else logits.to(cdt)
        if temperature != 1.0:
            log_p.mul_(inv_t)
        # log p = z - lse; below -1e4, p = exp(log p) is 0 in float32 and float64 alike, and the clamp
        # keeps e * log p finite where p = 0 (-inf logits: 0, not 0 * inf).
        log_p.sub_(m[:, None]).clamp_(min=-1e4)
        if e is None:
            grad = log_p.exp_().mul_(a)
        else:
            assert p_buffer is not None
            grad = torch.exp(log_p, out=p_buffer[: n_rows * (v1 - v0)].view(shape)).mul_(log_p.mul_(e).add_(a))
        if g_lp is not None:
            mine = torch.nonzero((t_c >= v0) & (t_c < v1)).squeeze(1)
            grad.index_put_((mine, t_c[mine] - v0), g_lp[mine] * inv_t, accumulate=True)
        add_block_grads(grad, x_c, W, v0, v1, dx_c, dW, db, once=True)
    dx.index_copy_(0, rows, dx_c.to(dx.dtype))
    return dx, dW, db


def _chunk_stats(logits: torch.Tensor, t: torch.Tensor, ignore_index: int, temperature: float) -> tuple[Any, ...]:
    if _native_rows(logits):
        return _rows_stats(logits, t, ignore_index, temperature)
    return reference_stats(xp_torch, logits, t, 1, ignore_index, temperature)


def _chunk_grad(
    logits: torch.Tensor, t: torch.Tensor, ignore_index: int, temperature: float, ups: tuple[Any, ...]
) -> torch.Tensor:
    """The gradient over a chunk's logits, written over them on the CPU."""
    if _native_rows(logits):
        _rows_stats(logits, t, ignore_index, temperature, ups, grad=logits)
        return logits
    return reference_grad(xp_torch, logits, t, 1, ignore_index, temperature, ups)


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> TokenStats:
    r""":func:`token_stats` of ``hidden @ weight.T + bias`` without materialising the logits.

    The output layer fused with the per-token statistics policy-gradient training needs (the sampled
    token's log-probability and the entropy at the sampling temperature, the logsumexp for z-loss
    monitoring). By default (float32, bfloat16, float16) both passes run over blocks of the vocabulary
    with all the counted rows in each (one block's logits and probabilities, 24 MiB, at least 512
    classes, are held at a time; ignored rows never reach the matmul): the forward combines the blocks'
    statistics, the backward recomputes each block's logits (a fourth matmul, since the statistics'
    upstream gradients are known only then) and writes that block of the weight gradient once, one
    product over all the rows accumulated in float32 and stored in the weight's dtype, so no float32
    copy of a half-precision weight gradient is held; the input's gradient is accumulated in float32.
    With ``chunk_size`` (and for float64) both passes run over chunks of whole rows instead (24 MiB of
    logits by default, at most 96 MiB for very large vocabularies), the weight gradient accumulated
    in float32 over them. bfloat16 and float16 inputs on a CPU without matrix instructions for them
    are multiplied in float32 (see :func:`linear_cross_entropy`).

    Parameters
    ----------
    hidden : Tensor, shape (..., D)
    weight : Tensor, shape (V, D), hidden's dtype
    target : Tensor of integers, shape (...)
    bias : Tensor, shape (V,), optional
    temperature : float
        :math:`T > 0`: statistics of ``logits / T``.
    ignore_index : int
        Target value of positions to skip: 0 in every statistic, no gradient.
    chunk_size : int, optional
        Rows per chunk, in chunks of whole rows (see above).

    Returns
    -------
    TokenStats
        ``(log_prob, entropy, logsumexp)``, each of the target's shape and hidden's dtype.

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> h = torch.randn(6, 8, requires_grad=True)
    >>> W = torch.randn(50, 8, requires_grad=True)
    >>> y = torch.tensor([3, 7, -100, 0, 49, 1])
    >>> s = ct.linear_token_stats(h, W, y, temperature=0.9)
    >>> ref = ct.token_stats(h @ W.T, y, temperature=0.9)
    >>> bool(torch.allclose(s.entropy, ref.entropy, atol=1e-5))
    True
    >>> (s.log_prob * torch.randn(6)).sum().backward()
    """
    for name, value in (("hidden", hidden), ("weight", weight), ("target", target), ("bias", bias)):
        if not (isinstance(value, torch.Tensor) or (name == "bias" and value is None)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    temperature = check_temperature(temperature)
    ignore_index = _validate.check_int(ignore_index, "ignore_index")
    if target.is_floating_point():
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    opts = _options(ignore_index, "none", 0.0, 0.0, 0.0, None, False)
    args = prepare_arguments(hidden, weight, target, bias, None, opts, chunk_size)
    chunk = args.chunk[0] if chunk_size is not None else _token_chunk(weight.shape[0], _matmul_dtype(hidden), None)
    # By default both passes run over vocabulary blocks of all the rows: a half-precision weight's
    # gradient is then written once a block in its dtype, with no float32 copy of it held, and the four
    # matmuls are large products. Measured on the 2-core AVX2 machine, N=1024 D=256 V=32768, one
    # forward+backward, 11 rounds in turns in one process: bfloat16 0.92x (best) / 0.75x (median) the
    # time of chunks of rows, float32 0.91x / 0.76x; bfloat16 overhead beyond the returned gradients
    # 49 MiB against 87. chunk_size asks for chunks of rows (and a float32 weight gradient accumulated
    # over them); float64 keeps them (the block budget counts float32 probabilities).
    by_vocab = chunk_size is None and weight.dtype != torch.float64
    stats = _LinearTokenStats.apply(args.x, weight, bias, args.target, temperature, ignore_index, chunk, by_vocab)
    return TokenStats(*(s.reshape(args.batch) for s in stats))


__all__ = ["linear_token_stats", "token_stats"]
