"""Cross-entropy past one machine, over ``torch.distributed`` (gloo on CPUs, NCCL on GPUs).

Vocabulary parallel: every rank holds a contiguous slice of the classes of the same rows (the sharded
output layer of tensor parallelism). The forward exchanges per-row statistics only, in two
collectives: a MAX all-reduce of the slices' log-sum-exps, then one SUM all-reduce of a packed (rows, k) tensor
holding sum_c exp(x_c - m), the target's logit (from the rank that holds it) and, as the options need
them, the label-smoothing and probability-target sums. The backward needs no communication: each rank
writes the gradient of its own slice from the global statistics.

Data parallel and gradient accumulation: :func:`global_target_count` all-reduces the number (or the
weight total) of counted targets once; passing it as ``normalizer=`` to each rank's and each
micro-batch's loss makes their sum exactly the single-process mean, gradients included.

Bytes communicated per token (row), forward: 4 bytes for the max plus 4 * k bytes for the packed sums
(k = 2 plain, 3 with label smoothing or probability targets), each all-reduced — against
4 * V bytes per token to gather float32 logits. At V = 256k: 12 bytes against 1 MiB per token, for 8
ranks or 64 (a ring all-reduce moves about twice the payload per rank, whatever the rank count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import _validate
from ._linear import _LinearCrossEntropy, prepare_arguments
from ._ops import first_derivative_only, loss_options
from ._reduction import mean_denominator_and_scale, reduce_losses
from ._vocab_slices import VocabSlice, combine, slice_gradient, slice_statistics
from ._weight_grad import finish_weight_grad, weight_grad_sum

_bounds_cache: dict[tuple[Any, int, int], tuple[int, int, int]] = {}


def vocab_bounds(local_size: int, group: Any = None) -> tuple[int, int, int]:
    """(start, end, total) of this rank's slice of the vocabulary, from every rank's slice size.

    One all-gather the first time per (group, slice size); cached afterwards, so that the loss's
    forward issues only its two collectives.
    """
    key = (id(group), dist.get_rank(group), local_size)
    if key not in _bounds_cache:
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, torch.tensor([local_size], dtype=torch.int64), group=group)
        counts = [int(s.item()) for s in sizes]
        rank = dist.get_rank(group)
        start = sum(counts[:rank])
        _bounds_cache[key] = (start, start + local_size, sum(counts))
    return _bounds_cache[key]


def _slice_bounds(local_size: int, group: Any, vocab_start: int | None, vocab_size: int | None) -> tuple[int, int, int]:
    if vocab_start is None or vocab_size is None:
        return vocab_bounds(local_size, group)
    start, total = int(vocab_start), int(vocab_size)
    if not 0 <= start <= total - local_size:
        raise ValueError(f"vocab_start {start} with {local_size} local classes does not fit in {total} classes")
    return start, start + local_size, total


def global_target_count(
    targets: torch.Tensor | list[torch.Tensor],
    *,
    ignore_index: int = -100,
    weight: torch.Tensor | None = None,
    group: Any = None,
) -> torch.Tensor:
    """The number of counted targets (or their weight total) over every rank and micro-batch.

    Pass the targets of all of this rank's micro-batches; one SUM all-reduce follows. Use the result as
    ``normalizer=`` in every micro-batch's loss, then sum the losses (or accumulate the gradients): the
    total is the mean over the global batch, exactly. When every target of the global batch is ignored
    the count is 0, and the losses divide by it (NaN, with zero gradients); pass
    ``zero_if_all_ignored=True`` to the losses for 0 instead.
    """
    parts = [targets] if isinstance(targets, torch.Tensor) else list(targets)
    total = torch.zeros((), dtype=torch.float64)
    for t in parts:
        valid = t != ignore_index
        if weight is None:
            total = total + valid.sum(dtype=torch.float64).cpu()
        else:
            safe = torch.where(valid, t, 0)
            total = total + torch.where(valid, weight.to(torch.float64)[safe], 0.0).sum().cpu()
    device = parts[0].device if parts else torch.device("cpu")
    total = total.to(device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


@dataclasses.dataclass(frozen=True)
class _Shard:
    """This rank's slice of the vocabulary, and the process group its slices are combined over."""

    slice: VocabSlice
    group: Any

    def forward(self, local: torch.Tensor, target: torch.Tensor, opts: _validate.LossOptions):
        """Per-row losses over the whole vocabulary and the gradient's row terms: two collectives."""

        def all_reduce(op: Any) -> Callable[[torch.Tensor], torch.Tensor]:
            def reduce(t: torch.Tensor) -> torch.Tensor:
                dist.all_reduce(t, op=op, group=self.group)
                return t

            return reduce

        stats = slice_statistics(local, target, self.slice, opts)
        return combine(stats, target, self.slice, opts, all_reduce(dist.ReduceOp.MAX), all_reduce(dist.ReduceOp.SUM))

    def chunk_loss(self, opts: _validate.LossOptions) -> _ShardChunkLoss:
        return _ShardChunkLoss(self, opts)


@dataclasses.dataclass(frozen=True)
class _ShardChunkLoss:
    """The linear loss's chunks (crossent.torch._linear.ChunkLoss) on a vocabulary slice: two
    collectives per chunk; the input's gradient, a sum over the slices, all-reduced once at the end."""

    shard: _Shard
    opts: _validate.LossOptions  # reduction "none": per-row losses, unit upstream gradients

    def __call__(self, logits, target, upstream):
        loss, terms = self.shard.forward(logits, target, self.opts)
        if upstream is not None:
            slice_gradient(logits, target, self.shard.slice, self.opts, terms, upstream, out=logits)
        return loss

    def reduce_input_grad(self, dx: torch.Tensor) -> None:
        dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=self.shard.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, target: torch.Tensor, normalizer: torch.Tensor | None,
                weight: torch.Tensor | None, shard: _Shard, opts: _validate.LossOptions) -> torch.Tensor:  # fmt: skip
        # ``weight`` is shard.slice.weight, passed again so that autograd sees it.
        loss, terms = shard.forward(local, target, opts)
        # The mean's denominator needs no communication: every rank holds every row's target.
        rows = local.shape[0]
        denom, scale = mean_denominator_and_scale(target, shard.slice.weight, opts, rows=rows, normalizer=normalizer)
        ctx.save_for_backward(local, target)
        ctx.terms, ctx.shard, ctx.opts, ctx.scale, ctx.normalizer = terms, shard, opts, scale, normalizer
        reduced = reduce_losses(loss, denom, opts).to(local.dtype)
        ctx.loss = reduced.detach()
        return reduced

    @staticmethod
    @first_derivative_only("distributed.vocab_parallel_cross_entropy")
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        local, target = ctx.saved_tensors
        opts, terms = ctx.opts, ctx.terms
        if opts.reduction == "none":
            upstream = grad_loss
        else:
            upstream = (grad_loss.to(torch.float64) * ctx.scale).expand(local.shape[0])
        grad = None
        if ctx.needs_input_grad[0]:
            grad = slice_gradient(local, target, ctx.shard.slice, opts, terms, upstream)
        grad_target = grad_weight = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            grad_target, grad_weight = _target_and_weight_grads(ctx, local, target, grad_loss)
        return grad, grad_target, None, grad_weight, None, None


def _target_and_weight_grads(
    ctx: Any, local: torch.Tensor, target: torch.Tensor, grad_loss: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """d(loss)/d(this rank's probability target slice) and d(loss)/d(class weight) (crossent.torch.
    _weight_grad's formulas with the global log-sum-exp). The class weight's gradient is summed over the
    ranks' slices by one SUM all-reduce of a (vocab_size,) vector, only when it is wanted."""
    sl, opts, terms = ctx.shard.slice, ctx.opts, ctx.terms
    x = local.to(terms.lse.dtype)
    if opts.softcap is not None:
        x = opts.softcap * torch.tanh(x / opts.softcap)
    log_probs = x - terms.lse[:, None]  # (rows, V_local): global log-probabilities of this slice
    rows = local.shape[0]
    g = grad_loss.reshape(-1) if opts.reduction == "none" else grad_loss.expand(rows)
    grad_target = grad_weight = None
    if ctx.needs_input_grad[1]:
        w_local = sl.local_weight(log_probs.dtype)
        scaled = log_probs if w_local is None else log_probs * w_local
        grad_target = -(1 - opts.label_smoothing) * g.to(log_probs.dtype)[:, None] * scaled
        if opts.reduction == "mean":
            grad_target = grad_target * ctx.scale.to(log_probs.dtype)
        grad_target = grad_target.to(target.dtype)
    if ctx.needs_input_grad[3] and sl.weight is not None:
        local_sum = weight_grad_sum(log_probs, target, g, opts, sl.total, sl.start)
        grad_sum = torch.zeros(sl.total, dtype=local_sum.dtype, device=local_sum.device)
        grad_sum[sl.start : sl.end] = local_sum
        dist.all_reduce(grad_sum, op=dist.ReduceOp.SUM, group=ctx.shard.group)
        grad_weight = finish_weight_grad(grad_sum, target, sl.weight, opts, ctx.normalizer, grad_loss, ctx.loss, rows)
    return grad_target, grad_weight


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    zero_if_all_ignored: bool = False,
) -> torch.Tensor:
    """The cross-entropy of logits whose classes are split across the ranks of ``group``.

    Parameters
    ----------
    local_logits : Tensor, shape (..., V_local)
        This rank's contiguous slice of the classes (last axis) for every row; slices may be uneven.
    target : Tensor
        Global class ids, shape (...), the same on every rank; or this rank's slice of class
        probabilities, shape (..., V_local).
    vocab_start, vocab_size : int, optional
        This rank's first class and the global number of classes; derived (one all-gather, cached)
        when not given.
    weight : Tensor, shape (vocab_size,), optional
        The global class weights, the same on every rank. One that requires a gradient gets the whole
        gradient on every rank (one SUM all-reduce of a (vocab_size,) vector in the backward pass).
    ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored
        As for :func:`crossent.cross_entropy`, over the whole vocabulary (label smoothing spreads eps over
        the global number of classes). ``ignore_index >= 0`` with probability targets raises ValueError.

    Returns
    -------
    Tensor
        The loss, the same on every rank: 0-d for mean and sum, the rows' shape for none.
    """
    opts = loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    local_size = local_logits.shape[-1]
    start, end, total = _slice_bounds(local_size, group, vocab_start, vocab_size)
    rows_shape = tuple(local_logits.shape[:-1])
    probability = target.is_floating_point()
    if probability and tuple(target.shape) != tuple(local_logits.shape):
        raise ValueError(f"probability targets must have the local logits' shape {tuple(local_logits.shape)}, "
                         f"got {tuple(target.shape)}")  # fmt: skip
    _validate.check_target_options(probability, opts)
    if not probability and tuple(target.shape) != rows_shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match the logits' rows {rows_shape}")
    if weight is not None and tuple(weight.shape) != (total,):
        raise ValueError(f"weight must be the global (vocab_size,) = ({total},) weights, got {tuple(weight.shape)}")
    if not probability:
        import array_api_compat.torch as xp_torch

        _validate.check_class_indices(xp_torch, target, total, opts.ignore_index)
    norm = opts.normalizer
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.tensor(float(norm), dtype=torch.float64, device=local_logits.device)
    x2 = local_logits.reshape(-1, local_size)
    t2 = target.reshape(-1, local_size) if probability else target.reshape(-1)
    shard = _Shard(VocabSlice(start, end, total, weight), group)
    loss = _VocabParallelCrossEntropy.apply(x2, t2, norm, weight, shard, opts)
    return loss.reshape(rows_shape) if opts.reduction == "none" else loss


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    local_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    group: Any = None,
    local_bias: torch.Tensor | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    zero_if_all_ignored: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``vocab_parallel_cross_entropy(hidden @ local_weight.T + local_bias, target)`` without the
    rank's (rows, V_local) logits: the sharded output layer fused with the loss.

    Rows are processed in chunks as in :func:`crossent.torch.linear_cross_entropy` (ignored rows
    skipped; they are the same rows on every rank); each chunk issues the two collectives of the
    vocabulary-parallel loss. ``hidden`` is the same on every rank, and its gradient, a sum over the
    slices, is all-reduced once per backward pass (for ``mean`` and ``sum`` the gradients are computed
    in the forward sweep, so that all-reduce happens there and the backward communicates nothing).

    Parameters
    ----------
    hidden : Tensor, shape (..., D)
        The rows, replicated on every rank of ``group``.
    local_weight : Tensor, shape (V_local, D)
        This rank's rows of the output layer: classes [vocab_start, vocab_start + V_local).
    target : Tensor
        Global class ids, shape (...); or this rank's slice of class probabilities, (..., V_local).
    local_bias : Tensor, shape (V_local,), optional
    vocab_start, vocab_size, weight, and the loss options
        As for :func:`vocab_parallel_cross_entropy`.
    chunk_size : int, optional
        Rows per chunk; by default from the same 24 MiB budget as the single-process linear loss.
    """
    opts = loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    if local_weight.ndim != 2:
        raise ValueError(f"local_weight must have shape (V_local, D), got {tuple(local_weight.shape)}")
    start, end, total = _slice_bounds(local_weight.shape[0], group, vocab_start, vocab_size)
    args = prepare_arguments(hidden, local_weight, target, local_bias, weight, opts, chunk_size, total_classes=total)
    shard = _Shard(VocabSlice(start, end, total, weight), group)
    loss = _LinearCrossEntropy.apply(args.x, local_weight, local_bias, args.target, weight, args.normalizer, opts,
                                     args.chunk, shard)  # fmt: skip
    return loss.reshape(args.batch) if opts.reduction == "none" else loss
