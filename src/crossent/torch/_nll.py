"""The NLL custom op: ``crossent::nll_loss`` on the backend crossent.torch._backend chooses, with one
autograd formula for every backend.

NLL is a gather and a weighted reduction: the native kernel (CPU), crossent's Triton gather kernel
(CUDA/ROCm, or CPU tensors under Triton's interpreter) or crossent's reference as torch operations
compute the loss; its gradient in the input is -w_y times the upstream gradient at the target's class
and 0 elsewhere, a scatter into zeros (torch operations, so that a second derivative works too). A
backend chosen by name that cannot run the call raises; it never falls back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import array_api_compat.torch as xp_torch
import torch

from .. import _native, _reference, _validate
from .._validate import LossOptions, LossShape
from . import _backend
from ._ops import _as_tensor, _numpy_view, _options, _shape
from ._reduction import mean_denominator_and_scale


def compute_nll(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, shape: LossShape, opts: LossOptions
) -> torch.Tensor:
    """The reduced NLL loss, in the input's dtype, from the chosen backend."""
    backend = _backend.resolve(input)
    if backend == "native":
        x = _numpy_view(input.contiguous())
        if x is not None and _native.supports(x):
            run_opts = opts
            if opts.normalizer is not None:  # a CPU tensor: reading it costs no synchronisation
                run_opts = dataclasses.replace(opts, normalizer=_validate.normalizer_value(opts.normalizer))
            t = _numpy_view(target.contiguous())
            w = None if weight is None else _numpy_view(weight.contiguous())
            return _as_tensor(_native.KERNEL.nll_loss(x, t, w, shape, run_opts), input.dtype)
        if _backend.explicit():
            raise _backend.native_unavailable(f"it does not take {input.dtype} tensors (bfloat16 needs ml_dtypes)")
        backend = "torch"
    if backend == "triton":
        from . import _triton

        return _triton.nll_loss(input, target, weight, shape, opts)
    return _reference.nll_loss(xp_torch, input, target, weight, shape, opts)


@torch.library.custom_op("crossent::nll_loss", mutates_args=())
def nll_loss_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads these annotations at run time)
    normalizer: Optional[torch.Tensor],  # noqa: UP045
    class_axis: int,
    ignore_index: int,
    reduction: str,
    zero_if_all_ignored: bool,
) -> torch.Tensor:
    shape = _shape(input, target, class_axis)
    opts = _options(ignore_index, reduction, 0.0, 0.0, 0.0, normalizer, zero_if_all_ignored)
    if input.device.type == "cpu":
        # Reading target values is free on the CPU; on an accelerator it would synchronise the host.
        _validate.check_class_indices(xp_torch, target, shape.n_classes, ignore_index)
    loss = compute_nll(input, target, weight, shape, opts)
    return loss.clone() if loss._base is not None else loss


@nll_loss_op.register_fake
def _(input, target, weight, normalizer, class_axis, ignore_index, reduction, zero_if_all_ignored):
    batch = tuple(input.shape[:class_axis]) + tuple(input.shape[class_axis + 1 :])
    return input.new_empty(batch if reduction == "none" else ())


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    input, target, weight, normalizer, class_axis, ignore_index, reduction, zero_if_all_ignored = inputs
    ctx.class_axis, ctx.ignore_index, ctx.reduction, ctx.zero_if_all_ignored = (
        class_axis, ignore_index, reduction, zero_if_all_ignored,
    )  # fmt: skip
    ctx.save_for_backward(input, target, weight, normalizer)


def _input_grad(ctx: Any, grad_loss: torch.Tensor, input, target, weight, opts: LossOptions) -> torch.Tensor:
    """-w_y * upstream at [.., y, ..], 0 elsewhere; 0 on ignored rows; NaN on a row whose class is out
    of range (unchecked on an accelerator) and, for a mean whose denominator is 0, on the rows that
    count (0 with zero_if_all_ignored), as crossent's other losses."""
    axis, n_classes = ctx.class_axis, input.shape[ctx.class_axis]
    valid = target != ctx.ignore_index
    inside = (target >= 0) & (target < n_classes)
    safe = torch.where(valid & inside, target, 0).long()
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    w_y = torch.ones((), dtype=acc, device=input.device) if weight is None else weight.to(acc)[safe]
    # NaN only where a counted class is out of range: an ignored row's factor is 0, so that nothing
    # differentiating this gradient again (create_graph) meets a NaN that the mask below hides.
    factor = torch.where(valid, torch.where(inside, -w_y, torch.nan), 0.0)
    coef = factor * grad_loss.to(acc)
    if ctx.reduction == "mean":
        rows = math.prod(input.shape) // n_classes if n_classes else 0
        _denom, scale = mean_denominator_and_scale(target, weight, opts, rows=rows)
        coef = coef * scale.to(acc)
    coef = torch.where(valid, coef, 0.0).to(input.dtype)
    zeros = torch.zeros_like(input, memory_format=torch.contiguous_format)
    return zeros.scatter(axis, safe.unsqueeze(axis), coef.expand(safe.shape).unsqueeze(axis))


def _backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
    input, target, weight, normalizer = ctx.saved_tensors
    opts = _options(ctx.ignore_index, ctx.reduction, 0.0, 0.0, 0.0, normalizer, ctx.zero_if_all_ignored)
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = _input_grad(ctx, grad_loss, input, target, weight, opts)
    if ctx.needs_input_grad[2] and weight is not None:
        # Rare (a learned class weight): the reference as torch operations, differentiated by autograd.
        # Under backward(create_graph=True) through the saved tensors themselves, so that the result
        # is differentiable again (in the weight and the input).
        shape = _shape(input, target, ctx.class_axis)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            w = weight if create_graph else weight.detach().requires_grad_(True)
            x = input if create_graph else input.detach()
            loss = _reference.nll_loss(xp_torch, x, target, w, shape, opts)
            (grad_weight,) = torch.autograd.grad(loss, w, grad_loss, create_graph=create_graph)
    return grad_input, None, grad_weight, None, None, None, None, None


nll_loss_op.register_autograd(_backward, setup_context=_setup_context)
