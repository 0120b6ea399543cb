"""The linear loss as a ``torch.library`` custom op, for ``torch.compile``.

Eager calls run crossent.torch._linear's autograd.Function directly. Its forward reads the targets (the
class-index check, the rows that are not ignored) and loops over chunks whose number depends on them:
torch.compile cannot trace that without a data-dependent guard, a graph break. Under torch.compile the
whole loss is this opaque op instead, with a fake (meta) implementation for the tracer and an autograd
formula: ``crossent::linear_cross_entropy`` returns the loss and, for ``mean`` and ``sum``, the
gradients for a unit upstream gradient, computed in the same sweep; the backward scales them. For
``none`` the backward op recomputes the sweep with the per-row upstream gradients. Out-of-range
class indices raise IndexError inside the op on CPU tensors, as in eager mode.
"""

from __future__ import annotations

from typing import Any, Optional

import array_api_compat.torch as xp_torch
import torch

from .. import _validate
from .._validate import LossOptions

_INPUTS = 5  # x, W, b, target, weight: the differentiable inputs, in this order


def _options(
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float, normalizer: Any,
    zero_if_all_ignored: bool,
) -> LossOptions:  # fmt: skip
    return LossOptions(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap if softcap > 0 else None, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip


def _run(
    tensors: list[torch.Tensor | None], normalizer: torch.Tensor | None, opts: LossOptions, chunk: tuple[int, int],
    wanted: list[bool], grad_loss: torch.Tensor | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
    """The eager loss on detached copies of the inputs, and the wanted gradients (empty tensors for the
    others) for ``grad_loss`` (the unit upstream gradient when None)."""
    from ._linear import _LinearCrossEntropy

    x, W, _, target, _ = tensors
    assert x is not None and W is not None and target is not None
    if not target.is_floating_point() and x.device.type == "cpu":
        _validate.check_class_indices(xp_torch, target, W.shape[0], opts.ignore_index)
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(tensors, wanted, strict=True)]
        loss = _LinearCrossEntropy.apply(*leaves, normalizer, opts, chunk)
        grad_of = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(loss, grad_of, grad_loss) if grad_of and (
            grad_loss is not None or opts.reduction != "none") else ())  # fmt: skip
    out = []
    for t in leaves:
        out.append(next(grads) if t is not None and t.requires_grad else torch.empty(0, device=x.device))
    return loss.detach(), out


@torch.library.custom_op("crossent::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: torch.Tensor,
    W: torch.Tensor,
    b: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads these annotations at run time)
    target: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    normalizer: Optional[torch.Tensor],  # noqa: UP045
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    zero_if_all_ignored: bool,
    chunk_rows: int,
    chunk_classes: int,
    wanted: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, then d(loss)/d(x, W, b, target, weight) for a unit upstream gradient where ``wanted`` and
    the reduction is mean or sum; empty tensors otherwise)."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored)
    want = [w and reduction != "none" for w in wanted]
    loss, grads = _run([x, W, b, target, weight], normalizer, opts, (chunk_rows, chunk_classes), want, None)
    return (loss, *grads)  # type: ignore[return-value]


def _fake_grads(tensors: list[Any], wanted: list[bool]) -> list[torch.Tensor]:
    out = []
    for t, want in zip(tensors, wanted, strict=True):
        out.append(torch.empty_like(t) if t is not None and want else tensors[0].new_empty(0))
    return out


@linear_cross_entropy_op.register_fake
def _(x, W, b, target, weight, normalizer, ignore_index, reduction, label_smoothing, z_loss, softcap,
      zero_if_all_ignored, chunk_rows, chunk_classes, wanted):  # fmt: skip
    loss = x.new_empty((x.shape[0],) if reduction == "none" else ())
    want = [w and reduction != "none" for w in wanted]
    return (loss, *_fake_grads([x, W, b, target, weight], want))


@torch.library.custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    x: torch.Tensor,
    W: torch.Tensor,
    b: Optional[torch.Tensor],  # noqa: UP045
    target: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045
    normalizer: Optional[torch.Tensor],  # noqa: UP045
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    zero_if_all_ignored: bool,
    chunk_rows: int,
    chunk_classes: int,
    wanted: list[bool],
    grad_loss: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The wanted gradients for per-row upstream gradients (reduction none): the sweep once more."""
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored)
    _, grads = _run([x, W, b, target, weight], normalizer, opts, (chunk_rows, chunk_classes), wanted, grad_loss)
    return tuple(grads)  # type: ignore[return-value]


@linear_cross_entropy_backward_op.register_fake
def _(x, W, b, target, weight, normalizer, ignore_index, reduction, label_smoothing, z_loss, softcap,
      zero_if_all_ignored, chunk_rows, chunk_classes, wanted, grad_loss):  # fmt: skip
    return tuple(_fake_grads([x, W, b, target, weight], wanted))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    ctx.inputs_rest = inputs[6:]  # the options, the chunk shape, wanted
    ctx.reduction = inputs[7]
    ctx.has = [t is not None for t in inputs[:_INPUTS]]
    if ctx.reduction == "none":
        ctx.save_for_backward(*(t for t in inputs[:6] if t is not None))
        ctx.present = [t is not None for t in inputs[:6]]
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx: Any, grad_loss: torch.Tensor, *_grads_of_grads: Any) -> tuple[Any, ...]:
    needs = list(ctx.needs_input_grad[:_INPUTS])
    if ctx.reduction == "none":
        saved = iter(ctx.saved_tensors)
        tensors = [next(saved) if present else None for present in ctx.present]
        grads = linear_cross_entropy_backward_op(*tensors, *ctx.inputs_rest, grad_loss)
    else:
        grads = tuple(g * grad_loss.to(g.dtype) if g.numel() else g for g in ctx.saved_tensors)
    out = [g if need and has else None for g, need, has in zip(grads, needs, ctx.has, strict=True)]
    return (*out, *([None] * 10))


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def compiled_linear_cross_entropy(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor, weight: torch.Tensor | None,
    normalizer: torch.Tensor | None, opts: LossOptions, chunk: tuple[int, int],
) -> torch.Tensor:  # fmt: skip
    """The linear loss through the custom op (flat x (rows, D) and target, as _LinearCrossEntropy takes)."""
    grad = torch.is_grad_enabled()
    wanted = [grad and t is not None and t.requires_grad for t in (x, W, b, target, weight)]
    return linear_cross_entropy_op(
        x, W, b, target, weight, normalizer, opts.ignore_index, opts.reduction, opts.label_smoothing, opts.z_loss,
        opts.softcap or 0.0, opts.zero_if_all_ignored, chunk[0], chunk[1], wanted,
    )[0]  # fmt: skip
