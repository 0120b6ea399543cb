"""The output layer fused with the loss: cross_entropy(input @ W.T + b, target) without the N x V logits.

Rows are processed in chunks: for each, the chunk's logits (rows x V) are computed into one buffer, the
loss comes from the fused kernel (native on CPU, Triton on GPUs) or the torch-ops path, which writes
d(loss)/d(logits) over the logits, and the chunk's share of the gradients is accumulated at once: dx = dlogits @ W,
dW += dlogits.T @ x (in float32), db += sum(dlogits). Only one chunk's logits are ever held. Ignored
rows are dropped before the matmul. Half-precision inputs on a CPU without half-precision matrix
instructions are multiplied in float32, a block of the weight at a time (see _matmul_dtype).
Half-precision weights take, by default, all the rows in one chunk and the vocabulary in blocks
(_half_chunk): each block of the weight gradient is then one product, written once in the weight's
dtype, instead of a float32 weight gradient accumulated over row chunks and held through the step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import torch

from .. import _native, _validate
from .._validate import LossOptions, LossShape
from . import _backend
from ._ops import (
    _as_tensor,
    _numpy_view,
    _torch_loss_and_grad,
    checked_class_indices,
    cpu_buffer,
    first_derivative_only,
    loss_options,
)
from ._reduction import mean_denominator_and_scale, reduce_losses
from ._vocab_slices import SliceStats, VocabSlice, combine, compute_dtype, slice_gradient, slice_statistics
from ._weight_grad import linear_extra_grads

# Memory budget of one chunk's logits: rows x V in the matmuls' dtype (_matmul_dtype), overwritten in
# place by their gradient, plus for half-precision logits the float32 copy of that gradient the float32
# weight gradient is accumulated from: rows * V * per_class bytes, per_class = itemsize (+ 4 for half
# types).
# 24 MiB keeps the memory beyond the outputs (dW alone is V x D float32 whatever we do) a few percent
# of the naive N x V logits at LLM sizes (V = 32768 float32: 192 rows; measured at D = 512, 192-row
# chunks took 2% more time than 256-row ones and 8 MiB less memory, 128-row ones 13% more time).
# Chunks of fewer than 128 rows would make each matmul re-read W (V x D) for too little work (measured
# at V = 32768, D = 512 float32: the logits matmul of 2048 rows in 128-row chunks took 0.72 s, in
# 256-row chunks 0.61 s, in 512-row chunks 0.53 s), so 128 rows is the floor even past the budget.
# Past 4 budgets for 128 rows (V > 196608 float32, V > 131072 half logits) the vocabulary is chunked too:
# the logits are then computed twice (once for the statistics, once for the gradient), a fourth matmul
# that buys memory bounded by the budget whatever V is.
_CHUNK_BUDGET_BYTES = 24 << 20
_MIN_CHUNK_ROWS = 128
_VOCAB_SPLIT_BUDGETS = 4
# ... unless the chunk of whole rows is at most this fraction of the rows (so its buffer is at most an
# eighth of the naive N x V logits, a few percent of the naive loss's memory, which also holds their
# gradient): the split's fourth matmul then buys little memory for its time (measured on the 2-core
# machine, N=1024 D=256 V=262144 float32, three steps each in turns in one process under heavy load
# from other jobs: best 68.2 s, median 84.6 s split; best 38.4 s, median 48.9 s unsplit in 128-row
# chunks).
_WHOLE_ROWS_FRACTION = 8


def _bytes_per_class(itemsize: int) -> int:
    """Bytes one row of a chunk takes per class (the budget above)."""
    return itemsize + (4 if itemsize < 4 else 0)


def _chunk_shape(
    n_classes: int, itemsize: int, chunk_size: int | None, vocab_chunk_size: int | None, n_rows: int | None = None
) -> tuple[int, int]:
    """(rows, classes) of one chunk; ``n_rows``, the rows of the whole input, where known."""
    per_class = _bytes_per_class(itemsize)
    if chunk_size is not None:
        return chunk_size, vocab_chunk_size or n_classes
    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BUDGET_BYTES // (n_classes * per_class))
    if vocab_chunk_size is not None:
        return rows, vocab_chunk_size
    if rows * n_classes * per_class <= _VOCAB_SPLIT_BUDGETS * _CHUNK_BUDGET_BYTES:
        return rows, n_classes
    if n_rows is not None and rows * _WHOLE_ROWS_FRACTION <= n_rows:
        return rows, n_classes
    return rows, max(1, _CHUNK_BUDGET_BYTES // (rows * per_class))


# Half-precision weights: one chunk of all the rows and blocks of the vocabulary (_sweep_vocab_chunks),
# so that each block of the weight gradient is computed once and written in the weight's dtype, where
# row chunks would need a float32 copy of the whole weight gradient to accumulate into (at V = 131072,
# D = 1024: 512 MiB held through the step, for a 256 MiB bfloat16 gradient). The price is the logits
# computed twice (a fourth matmul), on large products (all rows x a block). Blocks are at least this
# many classes, whatever the row count: the buffer is then at most 512 / V of the naive logits.
_MIN_VOCAB_BLOCK = 512


def _half_chunk(n_rows: int, n_classes: int, itemsize: int) -> tuple[int, int]:
    """(rows, classes) of the default chunks for half-precision weights: all the rows, a vocabulary
    block of one budget (at least _MIN_VOCAB_BLOCK classes)."""
    rows = max(1, n_rows)
    return rows, min(n_classes, max(_MIN_VOCAB_BLOCK, _CHUNK_BUDGET_BYTES // (rows * _bytes_per_class(itemsize))))


def _chunk_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, opts: LossOptions,
    upstream: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    """Per-row losses of a contiguous (rows, V) chunk of logits; with per-row ``upstream`` gradients,
    upstream * d(loss_row)/d(logits) is written over the logits (the kernel reads each row before it
    writes it)."""
    shape = LossShape(1, logits.shape[1], (logits.shape[0],), target.is_floating_point())
    backend = _backend.resolve(logits)
    if backend == "triton":  # the gradient written over the logits in the same launch
        from . import _triton

        scale = None if upstream is None else upstream.to(torch.float32)
        return _triton.rows_loss_and_grad(logits, target, weight, 1, opts, scale, None if scale is None else logits)
    if backend == "native":
        x, t = _numpy_view(logits), _numpy_view(target.contiguous())
        if x is not None and t is not None and _native.supports(x):
            w = None if weight is None else _numpy_view(weight)
            if upstream is None:
                return _as_tensor(_native.KERNEL.cross_entropy(x, t, w, shape, opts), logits.dtype)
            g = _numpy_view(upstream.to(compute_dtype(logits.dtype)).contiguous())
            loss, _ = _native.KERNEL.cross_entropy_and_grad(x, t, w, shape, opts, g, out=x)
            return _as_tensor(loss, logits.dtype)
    loss, grad = _torch_loss_and_grad(logits, target, weight, shape, opts, upstream is not None)
    if upstream is not None:
        assert grad is not None
        logits.copy_(grad.mul_(upstream.to(grad.dtype).unsqueeze(1)))
    return loss


class ChunkLoss(Protocol):
    """Per-row losses of a contiguous (rows, V) chunk of logits and, given per-row upstream gradients,
    upstream * d(loss_row)/d(logits) written over the logits; and what completes the input's gradient
    once every chunk has added its share."""

    def __call__(self, logits: torch.Tensor, target: torch.Tensor, upstream: torch.Tensor | None) -> torch.Tensor: ...

    def reduce_input_grad(self, dx: torch.Tensor) -> None: ...


@dataclasses.dataclass(frozen=True)
class _LocalChunkLoss:
    """The whole vocabulary in this process: the fused kernel or the torch-ops path."""

    weight: torch.Tensor | None
    opts: LossOptions

    def __call__(self, logits, target, upstream):
        return _chunk_loss(logits, target, self.weight, self.opts, upstream)

    def reduce_input_grad(self, dx: torch.Tensor) -> None:
        pass  # dx is complete


# torch's CPU matmul has fast bfloat16/float16 kernels only where the CPU has matrix instructions for
# them (AVX512-BF16 or AMX for bfloat16, AMX-FP16 for float16); elsewhere it is far slower than
# float32 (for bfloat16, perf shows a reference loop, cpublas_gemm_impl, on one core). Measured on the
# 2-core AVX2 machine, one thread, (128, 1024) @ (1024, 2048): float32 8.3 ms, bfloat16 57 ms, float16
# 48 ms; two threads, 32 rows: the input gradient's (rows, V) @ (V, D) at 0.15 GFLOP/s, float32's 40.
# There the chunks' matmuls run in float32 on blocks of the weight converted as they are used (2.8 ms
# per block, amortised over the chunk's rows), and the loss sees float32 logits, not logits rounded to
# the input's precision.
_HALF_MATMUL_PROBES = {
    torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
    torch.float16: ("_is_amx_fp16_supported",),
}


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the chunks' logits and matmuls are computed in."""
    probes = _HALF_MATMUL_PROBES.get(x.dtype)
    if probes is None or x.device.type != "cpu":
        return x.dtype
    if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes):
        return x.dtype
    return torch.float32


# The logits matmul runs in blocks of this many classes: MKL is faster on (rows, 2048) products written
# into the chunk's buffer than on one (rows, V) product (measured on the 2-core machine, 2048 rows in
# 256-row chunks at D = 512, V = 32768 float32: 0.55 s against 0.71 s; at D = 1024 in 128-row chunks
# 0.54 s against 0.66 s; bitwise the same logits).
_MATMUL_CLASS_BLOCK = 2048


def _class_blocks(v: int) -> list[tuple[int, int]]:
    """[v0, v1) of each block of classes the matmuls run on."""
    return [(v0, min(v, v0 + _MATMUL_CLASS_BLOCK)) for v0 in range(0, v, _MATMUL_CLASS_BLOCK)]


def _linear_into(out: torch.Tensor, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + b into a preallocated buffer, in the buffer's dtype (x is in it already; W and b are
    converted a block at a time): no allocation (and no page faults) per chunk."""
    for v0, v1 in _class_blocks(W.shape[0]):
        W_block = _converted(W[v0:v1], out.dtype)
        if b is None:
            torch.mm(x, W_block.t(), out=out[:, v0:v1])
        else:
            torch.addmm(b[v0:v1].to(out.dtype), x, W_block.t(), out=out[:, v0:v1])
    return out


def _input_grad(dlogits: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """dlogits @ W in dlogits' dtype, W converted a block at a time when the dtypes differ."""
    if W.dtype == dlogits.dtype:
        return dlogits @ W
    out = _buffer((dlogits.shape[0], W.shape[1]), dlogits.dtype, dlogits.device, zero=True)
    for v0, v1 in _class_blocks(W.shape[0]):
        out.addmm_(dlogits[:, v0:v1], _converted(W[v0:v1], dlogits.dtype))
    return out


def _sweep(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    rows: torch.Tensor,
    chunk: int,
    upstream: torch.Tensor | None,
    chunk_loss: ChunkLoss,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """One pass over the counted rows: per-row losses, and with ``upstream`` (per row) the gradients."""
    n = x.shape[0]
    per_row = torch.zeros(n, dtype=compute_dtype(x.dtype), device=x.device)
    # One chunk of half-precision rows: the weight gradient's one product is written in its dtype.
    one_pass = chunk >= rows.numel() and W.dtype != compute_dtype(W.dtype)
    grads = None if upstream is None else _grad_buffers(x, W, b, dW_dtype=W.dtype if one_pass else None)
    # One buffer holds a chunk's logits, then (overwritten in place) their gradient.
    mm_dtype = _matmul_dtype(x)
    buffer = _buffer((min(chunk, max(1, rows.numel())), W.shape[0]), mm_dtype, x.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        x_c = x.index_select(0, idx).to(mm_dtype)  # (r, D)
        logits = _linear_into(buffer[: idx.numel()], x_c, W, b)  # (r, V)
        g_c = None if upstream is None else upstream.index_select(0, idx)
        per_row.index_copy_(0, idx, chunk_loss(logits, target.index_select(0, idx), g_c).to(per_row.dtype))
        if grads is not None:
            dx, dW, db = grads
            dlogits = logits  # now the gradient
            dx.index_copy_(0, idx, _input_grad(dlogits, W).to(dx.dtype))
            if one_pass:
                _write_weight_grad(dW, dlogits, x_c)
            else:
                # float32 accumulation over chunks
                dW.addmm_(_converted(dlogits, dW.dtype).t(), _converted(x_c, dW.dtype))
            if db is not None:
                db += dlogits.sum(0, dtype=db.dtype)
    return per_row, grads


def add_block_grads(
    dlogits: torch.Tensor, x_c: torch.Tensor, W: torch.Tensor, v0: int, v1: int, dx_c: torch.Tensor,
    dW: torch.Tensor, db: torch.Tensor | None, *, once: bool,
) -> None:  # fmt: skip
    """A chunk of rows' gradient over the logits of classes [v0, v1), ``dlogits`` (rows, v1 - v0), into
    the gradients: dx_c += dlogits @ W[v0:v1] (dx_c in float32 or float64), db[v0:v1] += its column sums,
    and dW[v0:v1] = dlogits.T @ x_c written ``once`` in dW's dtype (all the rows are in the chunk), else
    added to the float32 dW accumulated over row chunks."""
    W_block = W[v0:v1]
    if db is not None:
        db[v0:v1] += dlogits.sum(0, dtype=db.dtype)
    if not once:
        # float32 accumulation over row chunks
        dW[v0:v1].addmm_(_converted(dlogits, dW.dtype).t(), _converted(x_c, dW.dtype))
    g = _converted(dlogits, x_c.dtype)  # the matmuls' dtype, once for both products
    if x_c.dtype == dx_c.dtype:  # float32 matmuls: added in place, W converted a block at a time
        for c0, c1 in _class_blocks(v1 - v0):
            dx_c.addmm_(g[:, c0:c1], _converted(W_block[c0:c1], dx_c.dtype))
    else:  # half-precision matrix instructions: each class block's product added into float32
        product = _buffer((g.shape[0], dx_c.shape[1]), g.dtype, g.device)
        for c0, c1 in _class_blocks(v1 - v0):
            dx_c += torch.mm(g[:, c0:c1], _converted(W_block[c0:c1], g.dtype), out=product)
    if once:
        _write_weight_grad(dW[v0:v1], g, x_c)


def _write_weight_grad(dW_block: torch.Tensor, dlogits: torch.Tensor, x_c: torch.Tensor) -> None:
    """dW_block = dlogits.T @ x_c, accumulated in float32 and written once in dW_block's (half) dtype;
    a float32 product goes through a temporary of at most _MATMUL_CLASS_BLOCK classes."""
    g = _converted(dlogits, x_c.dtype)
    if x_c.dtype == dW_block.dtype:  # half-precision matrix instructions accumulate in float32
        torch.mm(g.t(), x_c, out=dW_block)
        return
    product = _buffer((min(_MATMUL_CLASS_BLOCK, dW_block.shape[0]), x_c.shape[1]), x_c.dtype, x_c.device)
    for v0, v1 in _class_blocks(dW_block.shape[0]):
        dW_block[v0:v1].copy_(torch.mm(g[:, v0:v1].t(), x_c, out=product[: v1 - v0]))


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, *, zero: bool = False) -> torch.Tensor:
    if device.type == "cpu":
        return cpu_buffer(shape, dtype, zero=zero)  # huge pages: cheaper first touch
    return torch.zeros(shape, dtype=dtype, device=device) if zero else torch.empty(shape, dtype=dtype, device=device)


def _converted(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``: ``t`` itself if it is in it already, else a copy in a _buffer.

    The sweeps convert a block (a weight block into the matmuls' dtype, a block's gradient into the
    input's) several times per vocabulary block. A _buffer comes back to crossent._memory's cache when
    dropped and the next block's copy takes it; a fresh ``t.to(dtype)`` each time left glibc's heap
    fragmented by the small per-block statistics allocated in between, growing by about one
    temporary per block (measured on the 2-core AVX2 machine, N=4096 D=1024 V=131072 bfloat16: a
    step's overhead beyond its returned gradients 562 MiB, mostly that growth).
    """
    if t.dtype == dtype:
        return t
    return _buffer(tuple(t.shape), dtype, t.device).copy_(t)


def _vocab_part(
    buffer: torch.Tensor, x_c: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, t_c: torch.Tensor, v0: int,
    v1: int, weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, VocabSlice]:  # fmt: skip
    """The logits of classes [v0, v1) for a chunk of rows (at the start of the flat ``buffer``), the
    chunk's targets for them, the slice."""
    out = buffer[: x_c.shape[0] * (v1 - v0)].view(x_c.shape[0], v1 - v0)
    logits = _linear_into(out, x_c, W[v0:v1], None if b is None else b[v0:v1])
    probability = t_c.is_floating_point()
    return logits, (t_c[:, v0:v1] if probability else t_c), VocabSlice(v0, v1, W.shape[0], weight)


def _grad_buffers(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, *, dW_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Zeroed gradients of the input, the weight and the bias; the last two in float32 (float64 for a
    float64 weight), whatever the weight's dtype, since they accumulate over the chunks (the weight's
    in ``dW_dtype`` where each of its blocks is written once, see _sweep_vocab_chunks)."""
    acc = compute_dtype(W.dtype)
    dx = _buffer(tuple(x.shape), x.dtype, x.device, zero=True)
    dW = _buffer(tuple(W.shape), dW_dtype or acc, x.device, zero=True)
    return dx, dW, None if b is None else _buffer((W.shape[0],), acc, x.device, zero=True)


def _sweep_vocab_chunks(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    rows: torch.Tensor,
    chunk: int,
    vocab_chunk: int,
    upstream: torch.Tensor | None,
    weight: torch.Tensor | None,
    opts: LossOptions,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """_sweep for a vocabulary too large for one chunk of rows: each chunk's logits are computed a
    vocabulary chunk at a time, for the chunks' statistics (combined by crossent.torch._vocab_slices
    into the loss), then once more for the gradient.

    With all the rows in one chunk (the default for half-precision weights, _half_chunk), each block
    of the weight's gradient gets its one product, dlogits[:, block].T @ x, accumulated in float32
    inside the matmul, and is written once in the weight's dtype: no float32 copy of the whole
    weight gradient is held."""
    n, d = x.shape
    v = W.shape[0]
    compute = compute_dtype(x.dtype)
    per_row = torch.zeros(n, dtype=compute, device=x.device)
    bounds = [(start, min(v, start + vocab_chunk)) for start in range(0, v, vocab_chunk)]
    one_pass = chunk >= rows.numel() and W.dtype != compute_dtype(W.dtype)
    grads = None if upstream is None else _grad_buffers(x, W, b, dW_dtype=W.dtype if one_pass else None)
    size = min(chunk, max(1, rows.numel())) * vocab_chunk
    mm_dtype = _matmul_dtype(x)
    buffer = _buffer((size,), mm_dtype, x.device)  # one vocabulary chunk's logits
    # Their gradient: over the logits, or in float32 for half-precision logits.
    grad_buffer = buffer if grads is None or compute == mm_dtype else _buffer((size,), compute, x.device)

    for start in range(0, rows.numel(), chunk):
        idx = rows[start : start + chunk]
        x_c, t_c = x.index_select(0, idx).to(mm_dtype), target.index_select(0, idx)
        r = idx.numel()
        stats = [slice_statistics(*_vocab_part(buffer, x_c, W, b, t_c, v0, v1, weight), opts) for v0, v1 in bounds]
        whole = VocabSlice(0, v, v, weight)
        loss_c, terms = combine(SliceStats.stack(stats), t_c, whole, opts, lambda t: t.amax(0), lambda t: t.sum(0))
        per_row.index_copy_(0, idx, loss_c)
        if upstream is None or grads is None:
            continue
        dx, dW, db = grads
        g_c = upstream.index_select(0, idx)
        dx_c = torch.zeros(r, d, dtype=compute, device=x.device)
        for k, (v0, v1) in enumerate(bounds):
            logits, t_k, sl = _vocab_part(buffer, x_c, W, b, t_c, v0, v1, weight)
            out = grad_buffer[: r * (v1 - v0)].view(r, v1 - v0)
            terms_k = dataclasses.replace(terms, lse_local=stats[k].lse)
            dlogits = slice_gradient(logits, t_k, sl, opts, terms_k, g_c, out=out)
            add_block_grads(dlogits, x_c, W, v0, v1, dx_c, dW, db, once=one_pass)
        dx.index_copy_(0, idx, dx_c.to(dx.dtype))
    return per_row, grads


def _run_sweep(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    target: torch.Tensor,
    rows: torch.Tensor,
    chunk: tuple[int, int],
    upstream: torch.Tensor | None,
    chunk_loss: ChunkLoss,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
    """_sweep, or _sweep_vocab_chunks when one chunk of rows holds only part of the vocabulary (in one
    process; a vocabulary-parallel rank works on its whole slice)."""
    row_chunk, vocab_chunk = chunk
    if isinstance(chunk_loss, _LocalChunkLoss) and vocab_chunk < W.shape[0]:
        return _sweep_vocab_chunks(
            x, W, b, target, rows, row_chunk, vocab_chunk, upstream, chunk_loss.weight, chunk_loss.opts
        )
    return _sweep(x, W, b, target, rows, row_chunk, upstream, chunk_loss)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, W, b, target, weight, normalizer, opts: LossOptions, chunk: tuple[int, int], sharded=None):
        probability = target.is_floating_point()
        if probability:
            rows = torch.arange(x.shape[0], device=x.device)
        else:
            rows = torch.nonzero(target != opts.ignore_index).squeeze(1)  # ignored rows never reach the matmul
        # Ignored targets count for nothing in the denominator, so the full target can be used here.
        denom, scale = mean_denominator_and_scale(target, weight, opts, rows=x.shape[0], normalizer=normalizer)
        needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        upstream = None
        if needs and opts.reduction != "none":
            # A scalar upstream gradient: the gradients are computed now and scaled in backward.
            upstream = scale.to(compute_dtype(x.dtype)).expand(x.shape[0])
        row_opts = dataclasses.replace(opts, reduction="none", normalizer=None, zero_if_all_ignored=False)
        # The source of each chunk's loss: this process's kernel, or a vocabulary-parallel shard
        # (crossent.torch.distributed), which also all-reduces the input's gradient over the ranks.
        chunk_loss = _LocalChunkLoss(weight, row_opts) if sharded is None else sharded.chunk_loss(row_opts)
        per_row, grads = _run_sweep(x, W, b, target, rows, chunk, upstream, chunk_loss)
        if grads is not None:
            chunk_loss.reduce_input_grad(grads[0])
            if opts.zero_if_all_ignored and opts.reduction == "mean":
                # A scale of 0 (a denominator of 0) promises gradients of exactly 0, also where a counted
                # row has no finite logit and the chunks formed 0 * NaN (no host synchronisation).
                for g in grads:
                    if g is not None:
                        g.masked_fill_(scale == 0, 0.0)
        ctx.chunk_loss, ctx.chunk = chunk_loss, chunk
        ctx.has_bias = b is not None
        loss = reduce_losses(per_row, denom, opts).to(x.dtype)
        # The probability target's and the class weight's gradients take a sweep of their own (see
        # crossent.torch._weight_grad); what it reads is kept only when one of them is wanted.
        ctx.extra = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            if sharded is not None:
                raise NotImplementedError(
                    "vocab_parallel_linear_cross_entropy gives no gradient to a class weight or probability "
                    "target that requires one; detach them, or use vocab_parallel_cross_entropy"
                )
            detached = [None if t is None else t.detach() for t in (x, W, b, target, weight, normalizer, loss)]
            ctx.extra = (detached, opts)
        if grads is not None:
            ctx.save_for_backward(*[g for g in grads if g is not None])
            ctx.mode = "precomputed"
            ctx.used = False
        else:
            ctx.save_for_backward(x, W, *(t for t in (b,) if t is not None), target, rows)
            ctx.mode = "recompute"
        return loss

    @staticmethod
    @first_derivative_only("linear_cross_entropy")
    def backward(ctx: Any, grad_loss: torch.Tensor):
        grad_target = grad_weight = None
        if ctx.extra is not None:
            (x, W, b, target, weight, normalizer, loss), opts = ctx.extra
            grad_target, grad_weight = linear_extra_grads(
                x, W, b, target, weight, normalizer, opts, grad_loss, loss, ctx.chunk[0],
                want_target=ctx.needs_input_grad[3], want_weight=ctx.needs_input_grad[4],
            )  # fmt: skip
        return (*_LinearCrossEntropy._grads(ctx, grad_loss), grad_target, grad_weight, None, None, None, None)

    @staticmethod
    def _grads(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, Any, Any]:
        """The input's, the linear weight's and the bias's gradients."""
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return None, None, None
        if ctx.mode == "precomputed":
            if ctx.used:
                raise RuntimeError(
                    "crossent.torch.linear_cross_entropy: backward ran twice through the same forward; its "
                    "gradients were computed in the forward pass and are scaled in place, once"
                )
            ctx.used = True
            saved = list(ctx.saved_tensors)
            dx, dW = saved[0], saved[1]
            db = saved[2] if ctx.has_bias else None
            g = grad_loss.to(dW.dtype)  # float64 for float64 inputs: rounding it to float32 would cost digits
            # In place: a second V x D float32 weight gradient would double the memory this loss adds.
            dx.mul_(g.to(dx.dtype))
            dW.mul_(g)
            if db is not None:
                db.mul_(g)
            return dx, dW, db
        saved = list(ctx.saved_tensors)
        x, W = saved[0], saved[1]
        b = saved[2] if ctx.has_bias else None
        rest = saved[3:] if ctx.has_bias else saved[2:]
        target, rows = rest[0], rest[1]
        _, grads = _run_sweep(x, W, b, target, rows, ctx.chunk, grad_loss.to(compute_dtype(x.dtype)), ctx.chunk_loss)
        assert grads is not None
        dx, dW, db = grads
        ctx.chunk_loss.reduce_input_grad(dx)
        return dx, dW, db


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    options: Any = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    zero_if_all_ignored: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> torch.Tensor:
    r"""``cross_entropy(input @ linear_weight.T + linear_bias, target)`` without materialising the logits.

    Argument-compatible with ``torch.nn.functional.linear_cross_entropy`` (its ``options`` may carry a
    ``batch_chunk_size``), plus crossent's loss options. Gradients flow to ``input``, ``linear_weight``
    and ``linear_bias``; the weight gradient is accumulated in float32. A class ``weight`` or a
    probability ``target`` that requires a gradient gets it too, from one more sweep over the rows
    (its chunks hold the whole vocabulary). ``torch.compile(fullgraph=True)`` traces the loss as one
    custom op (``crossent::linear_cross_entropy``) without a graph break. For ``mean`` and ``sum`` the
    gradients are computed in the forward sweep (one pass over the data); for ``none`` the backward
    recomputes the chunks' logits with the per-row upstream gradient. bfloat16 and float16 inputs on a
    CPU without matrix instructions for them (AVX512-BF16, AMX) are multiplied in float32, where torch's
    half-precision matmul is several times slower: the logits are then float32, not rounded to the
    input's precision. For bfloat16 and float16 weights the default chunks are all the rows by a block
    of the vocabulary (24 MiB of logits, at least 512 classes): the logits are computed twice (for the
    loss, then for the gradient), and each block of the weight gradient is one product accumulated in
    float32 and written once in the weight's dtype, so no float32 copy of the weight gradient is held.

    Parameters
    ----------
    input : Tensor, shape (..., D)
    linear_weight : Tensor, shape (V, D), or ``(V, *out, D)``
        With K = len(out) >= 1 (torch 2.13's K-dimensional loss), the logits are ``(N, V, *out)``, one
        softmax over the V classes per position; ``input`` must then be (N, D), ``linear_bias``
        ``(V, *out)``, and ``target`` ``(N, *out)`` class indices or ``(N, V, *out)`` probabilities.
    target : Tensor, shape (...) of class indices, or (..., V) of class probabilities
    chunk_size : int, optional
        Rows per chunk; by default derived from a 24 MiB budget for one chunk's logits and gradient.
    vocab_chunk_size : int, optional
        Classes per chunk; by default all of them, unless 128 rows of the whole vocabulary would take
        more than four budgets (V > 196608 float32 logits, V > 131072 half-precision ones) and be more
        than an eighth of the input's rows (fewer than 1024 rows). The logits of a vocabulary chunk
        are computed twice, for the loss and for the gradient.
    normalizer : float or 0-d Tensor, optional
        What ``mean`` divides by, 0 included, as for :func:`crossent.cross_entropy`: negative, NaN or
        infinite values raise where they can be read without a host synchronisation (numbers, CPU
        tensors in eager mode), and make the loss and its gradients NaN elsewhere (CUDA tensors, traced
        ones).

    Raises
    ------
    IndexError
        A class index outside [0, V) that is not ``ignore_index`` (on CPU tensors also under
        ``torch.compile``; on an accelerator under ``torch.compile`` the row's loss is NaN instead).
    ValueError
        Shapes that do not fit, or ``ignore_index >= 0`` with a probability target.

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> x, W = torch.randn(6, 4), torch.randn(10, 4)
    >>> y = torch.tensor([1, 2, 3, -100, 0, 9])
    >>> fused = ct.linear_cross_entropy(x, W, y)
    >>> naive = torch.nn.functional.cross_entropy(x @ W.T, y)
    >>> bool(torch.allclose(fused, naive, atol=1e-6))
    True
    """
    opts = loss_options(
        reduction=reduction, ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, normalizer=normalizer,
        zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    # torch's linear_cross_entropy: ignore_index=None means cross_entropy's default; options may carry
    # the batch chunk size.
    if options is not None and chunk_size is None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if linear_weight.ndim > 2:
        return _k_dimensional(input, linear_weight, target, linear_bias, weight, opts, chunk_size, vocab_chunk_size)
    args = prepare_arguments(
        input, linear_weight, target, linear_bias, weight, opts, chunk_size, vocab_chunk_size=vocab_chunk_size
    )
    if torch.compiler.is_compiling():
        from ._linear_op import compiled_linear_cross_entropy

        loss = compiled_linear_cross_entropy(
            args.x, linear_weight, linear_bias, args.target, weight, args.normalizer, opts, args.chunk
        )
    else:
        loss = _LinearCrossEntropy.apply(args.x, linear_weight, linear_bias, args.target, weight, args.normalizer,
                                         opts, args.chunk)  # fmt: skip
    return loss.reshape(args.batch) if opts.reduction == "none" else loss


def _k_dimensional(
    input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None, opts: LossOptions, chunk_size: int | None, vocab_chunk_size: int | None,
) -> torch.Tensor:  # fmt: skip
    """torch 2.13's K-dimensional linear loss: ``linear_weight`` (C, *out, D) gives logits (N, C, *out),
    one softmax over the C classes per position of ``out``. Each position is the 2-D loss with its own
    (C, D) weight, summed (or kept, for none), and mean divides by the whole batch's denominator."""
    n_classes, out, in_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1]), linear_weight.shape[-1]
    if input.ndim != 2:
        raise ValueError(
            f"a K-dimensional linear_weight {tuple(linear_weight.shape)} needs a batched input (N, {in_features}), "
            f"got shape {tuple(input.shape)}"
        )
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes, *out):
        raise ValueError(f"linear_bias must have shape {(n_classes, *out)}, got {tuple(linear_bias.shape)}")
    n, positions = input.shape[0], math.prod(out)
    probability = target.is_floating_point()
    expected = (n, n_classes, *out) if probability else (n, *out)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match the logits (N, C, *out): expected {expected}"
        )
    W = linear_weight.reshape(n_classes, positions, in_features)
    b = None if linear_bias is None else linear_bias.reshape(n_classes, positions)
    t = target.reshape(n, n_classes, positions) if probability else target.reshape(n, positions)
    part = "none" if opts.reduction == "none" else "sum"
    losses = [
        linear_cross_entropy(
            input, W[:, k].contiguous(), t[..., k], linear_bias=None if b is None else b[:, k], weight=weight,
            reduction=part, ignore_index=opts.ignore_index, label_smoothing=opts.label_smoothing, z_loss=opts.z_loss,
            softcap=opts.softcap, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
        )
        for k in range(positions)
    ]  # fmt: skip
    if opts.reduction == "none":
        return torch.stack(losses, -1).reshape(n, *out)
    flat = t.movedim(1, -1).reshape(-1, n_classes) if probability else t.reshape(-1)
    denom, _ = mean_denominator_and_scale(flat, weight, opts, rows=n * positions)
    return reduce_losses(torch.stack(losses), denom, opts).to(input.dtype)


@dataclasses.dataclass(frozen=True)
class LinearArguments:
    x: torch.Tensor  # (rows, D)
    target: torch.Tensor  # (rows,) class ids or (rows, V) probabilities
    normalizer: torch.Tensor | None
    chunk: tuple[int, int]  # rows, classes
    batch: tuple[int, ...]


def prepare_arguments(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: torch.Tensor | None,
    opts: LossOptions,
    chunk_size: int | None,
    *,
    vocab_chunk_size: int | None = None,
    total_classes: int | None = None,
) -> LinearArguments:
    """Check the linear loss's arguments and flatten them to rows. ``total_classes``: the class count
    that targets and class weights index, when ``linear_weight`` holds only a slice of the classes."""
    if linear_weight.ndim != 2:
        raise ValueError(f"linear_weight must have shape (V, D), got {tuple(linear_weight.shape)}")
    n_classes, in_features = linear_weight.shape
    classes = n_classes if total_classes is None else total_classes
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension {input.shape[-1]} does not match linear_weight's in_features {in_features}"
        )
    for name, tensor in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if tensor is not None and tensor.dtype != input.dtype:
            raise ValueError(f"{name} has dtype {tensor.dtype}, expected input's dtype {input.dtype}")
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes,):
        raise ValueError(f"linear_bias must have shape ({n_classes},), got {tuple(linear_bias.shape)}")
    for name, size in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if size is not None and _validate.check_int(size, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {size}")
    batch = tuple(input.shape[:-1])
    x2 = input.reshape(-1, in_features)
    probability = target.is_floating_point()
    expected_target = (*batch, n_classes) if probability else batch
    if tuple(target.shape) != expected_target:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input: expected {expected_target}")
    t2 = target.reshape(-1, n_classes) if probability else target.reshape(-1)
    import array_api_compat.torch as xp_torch

    _validate.check_target_options(probability, opts)
    if weight is not None:
        _validate.check_weight(xp_torch, weight, classes)
    if not probability and torch.compiler.is_compiling():
        t2 = checked_class_indices(t2, classes, opts.ignore_index)  # reading values would break the graph
    elif not probability:
        _validate.check_class_indices(xp_torch, t2, classes, opts.ignore_index)
    norm = opts.normalizer
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.tensor(float(norm), dtype=torch.float64, device=input.device)
    itemsize = _matmul_dtype(input).itemsize
    if linear_weight.dtype in (torch.float16, torch.bfloat16) and chunk_size is None and total_classes is None:
        chunk = _half_chunk(x2.shape[0], n_classes, itemsize) if vocab_chunk_size is None else (
            x2.shape[0], vocab_chunk_size)  # fmt: skip
    else:
        # A vocabulary-parallel rank (total_classes) splits nothing: its whole slice is one chunk.
        n_rows = x2.shape[0] if total_classes is None else None
        chunk = _chunk_shape(n_classes, itemsize, chunk_size, vocab_chunk_size, n_rows)
    return LinearArguments(x2, t2, norm, chunk, batch)
