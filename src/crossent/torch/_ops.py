"""The cross-entropy custom op: what runs, its fake (meta) implementation and its autograd formula.

``crossent::cross_entropy`` returns the loss and, when the input needs a gradient, d(loss)/d(input)
computed in the same sweep (the upstream gradient is applied in backward, as a scale). CPU tensors run
the native kernel on zero-copy NumPy views, CUDA/ROCm tensors crossent's Triton kernel; other devices,
or every device under ``use_backend("torch")``, run the Array-API reference on row chunks, so that no
temporary is larger than one chunk. crossent.torch._backend chooses (see ``use_backend``).
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Optional

import array_api_compat.torch as xp_torch
import numpy as np
import torch

from .. import _memory, _native, _reference, _validate
from .._validate import LossOptions, LossShape
from . import _backend
from ._reduction import checked_normalizer, mean_denominator_and_scale, reduce_losses
from ._weight_grad import cross_entropy_weight_grad

# Elements per chunk of the torch-ops path: its temporaries (float32 logits, probabilities, one-hot)
# are a few times this, 2^22 elements = 16 MiB of float32 each, small next to any input worth chunking.
_CHUNK_ELEMENTS = 1 << 22


def _numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """A zero-copy NumPy view of a CPU tensor, or None for a dtype NumPy cannot hold."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            return None
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _native_loss_and_grad(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, shape: LossShape, opts: LossOptions,
    compute_grad: bool, *, in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # fmt: skip
    """The native kernel on zero-copy views, or None where it does not apply. ``in_place``: the gradient
    overwrites the (contiguous, classes-last) input, and the input is returned as it. The caller has
    chosen the native backend (crossent.torch._backend)."""
    x = _numpy_view(input if in_place else input.contiguous())
    if x is None or not _native.supports(x):
        return None
    t = _numpy_view(target.contiguous())
    w = None if weight is None else _numpy_view(weight)
    go = None  # the unit upstream gradient: a scalar for mean and sum, per element for none
    if opts.reduction == "none":
        go = np.ones(shape.batch_shape, dtype=np.float64 if x.dtype == np.float64 else np.float32)
    if compute_grad:
        loss, grad = _native.KERNEL.cross_entropy_and_grad(x, t, w, shape, opts, go, out=x if in_place else None)
        return _as_tensor(loss, input.dtype), input if in_place else _as_tensor(grad, input.dtype)
    return _as_tensor(_native.KERNEL.cross_entropy(x, t, w, shape, opts), input.dtype), None


def cpu_buffer(shape: tuple[int, ...], dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
    """A CPU tensor in memory crossent._memory allocated, for the large outputs (gradients, buffers).

    Huge pages, which torch's CPU allocator does not ask for: with 4 KiB pages, first touching a fresh
    gradient costs more than computing it (measured on this project's 2-core machine: 512 MiB, 226 ms
    against about 60 ms; 256 MiB on one thread, 137 ms against 18 ms).
    """
    bits = {torch.float16: np.int16, torch.bfloat16: np.int16}.get(dtype)
    np_dtype = bits or torch.empty((), dtype=dtype).numpy().dtype
    t = torch.from_numpy(_memory.empty(shape, np_dtype, zero=zero))
    return t.view(dtype) if bits else t


def _as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor over a NumPy result; 16-bit floats travel as their bits (NumPy has no bfloat16)."""
    a = a if a.flags.c_contiguous else a.copy()  # not ascontiguousarray: it turns 0-d into 1-d
    if a.dtype.itemsize == 2:
        return torch.from_numpy(a.view(np.int16)).view(dtype)
    return torch.from_numpy(a)


def _torch_loss_and_grad(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, shape: LossShape, opts: LossOptions,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The reference, on chunks of the first batch axis; per-element losses are reduced here."""
    per_row = dataclasses.replace(opts, reduction="none", normalizer=None, zero_if_all_ignored=False)
    axis = shape.class_axis
    # The mean's denominator (and so the upstream gradient per element) comes first: it is a scalar
    # over the whole batch, while the chunks see only part of it. A tensor: no host synchronisation.
    denom, scale = mean_denominator_and_scale(target, weight, opts, rows=math.prod(shape.batch_shape))
    batched = input.ndim >= 2 and axis != 0
    chunks: list[Any] = [Ellipsis]  # the whole input (an unbatched target is 0-d: no slicing)
    if batched and input.numel() > _CHUNK_ELEMENTS:
        rows = max(1, _CHUNK_ELEMENTS * input.shape[0] // input.numel())
        chunks = [slice(i, i + rows) for i in range(0, input.shape[0], rows)]
    grad = torch.empty_like(input) if compute_grad else None
    losses = []
    for part in chunks:
        x_c, t_c = input[part], target[part]
        shape_c = shape._replace(batch_shape=tuple(x_c.shape[:axis]) + tuple(x_c.shape[axis + 1 :]))
        g_c = scale.to(torch.float32 if input.dtype != torch.float64 else torch.float64).expand(shape_c.batch_shape)
        if compute_grad:
            loss_c, grad_c = _reference.cross_entropy_and_grad(xp_torch, x_c, t_c, weight, shape_c, per_row, g_c)
            assert grad is not None
            grad[part] = grad_c
        else:
            loss_c = _reference.cross_entropy(xp_torch, x_c, t_c, weight, shape_c, per_row)
        losses.append(loss_c)
    per_element = torch.cat([loss.reshape(-1) for loss in losses]).reshape(shape.batch_shape)
    if opts.reduction == "none":
        return per_element, grad
    if grad is not None and opts.zero_if_all_ignored and opts.reduction == "mean":
        # A scale of 0 (a denominator of 0) promises a gradient of exactly 0, also where a counted row
        # has no finite logit and the chunks formed 0 * NaN (no host synchronisation).
        grad.masked_fill_(scale == 0, 0.0)
    return reduce_losses(per_element, denom, opts).to(input.dtype), grad


def compute_loss_and_grad(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, shape: LossShape, opts: LossOptions,
    compute_grad: bool, *, in_place: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(loss, gradient for a unit upstream gradient per element) from the backend crossent.torch._backend
    chooses. ``in_place``: write the gradient over the (contiguous) input where the backend can, and
    return the input as the gradient then; the caller copies it over otherwise."""
    backend = _backend.resolve(input)
    if backend == "native":
        run_opts = opts
        if opts.normalizer is not None:
            # Reading a CPU tensor costs no synchronisation; checked again here, since under
            # torch.compile the checks before the op could not read it.
            run_opts = dataclasses.replace(opts, normalizer=_validate.normalizer_value(opts.normalizer))
        native_in_place = in_place and shape.class_axis == input.ndim - 1
        result = _native_loss_and_grad(input, target, weight, shape, run_opts, compute_grad, in_place=native_in_place)
        if result is not None:
            return result
        if _backend.explicit():
            raise _backend.native_unavailable(f"it does not take {input.dtype} tensors (bfloat16 needs ml_dtypes)")
        backend = "torch"
    if backend == "triton":
        from . import _triton

        return _triton.loss_and_grad(input, target, weight, shape, opts, compute_grad, in_place=in_place)
    return _torch_loss_and_grad(input, target, weight, shape, opts, compute_grad)


def loss_options(**options: Any) -> LossOptions:
    """crossent._validate.loss_options for the torch layer: its cache is skipped while torch.compile
    traces (the options are constants of the graph then, checked once per compilation)."""
    return _validate.loss_options(**options, cache=not torch.compiler.is_compiling())


@torch.library.custom_op("crossent::checked_class_indices", mutates_args=())
def _checked_class_indices_op(target: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    """A copy of ``target`` once its class indices are checked (CPU). The copy is what the loss reads
    next, so that no compiler can drop the check as dead code."""
    if target.device.type == "cpu":
        _validate.check_class_indices(xp_torch, target, n_classes, ignore_index)
    return target.clone()


@_checked_class_indices_op.register_fake
def _(target, n_classes, ignore_index):
    return torch.empty_like(target)


def checked_class_indices(target: torch.Tensor, n_classes: int, ignore_index: int) -> torch.Tensor:
    """``target``, after an IndexError for a class index outside [0, n_classes) that is not
    ``ignore_index``, on CPU tensors, eager or under torch.compile (where reading values in Python would
    be a data-dependent guard: the check runs inside a custom op). On an accelerator it is not checked
    (that would synchronise the host): the losses give NaN for such a row instead."""
    if torch.compiler.is_compiling():
        return _checked_class_indices_op(target, n_classes, ignore_index)
    if target.device.type == "cpu":
        _validate.check_class_indices(xp_torch, target, n_classes, ignore_index)
    return target


def _options(
    ignore_index: int, reduction: str, label_smoothing: float, z_loss: float, softcap: float,
    normalizer: torch.Tensor | None, zero_if_all_ignored: bool,
) -> LossOptions:  # fmt: skip
    return LossOptions(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap if softcap > 0 else None, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip


def _shape(input: torch.Tensor, target: torch.Tensor, class_axis: int) -> LossShape:
    shape = tuple(input.shape)
    return LossShape(
        class_axis=class_axis,
        n_classes=shape[class_axis],
        batch_shape=shape[:class_axis] + shape[class_axis + 1 :],
        probability_target=target.is_floating_point(),
    )


@torch.library.custom_op("crossent::cross_entropy", mutates_args=())
def cross_entropy_op(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],  # noqa: UP045 (torch.library reads these annotations at run time)
    normalizer: Optional[torch.Tensor],  # noqa: UP045
    class_axis: int,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    zero_if_all_ignored: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d(loss)/d(input) for a unit upstream gradient per element; empty without compute_grad)."""
    shape = _shape(input, target, class_axis)
    opts = _options(ignore_index, reduction, label_smoothing, z_loss, softcap, normalizer, zero_if_all_ignored)
    if not shape.probability_target and input.device.type == "cpu":
        # Reading target values is free on the CPU; on an accelerator it would synchronise the host.
        _validate.check_class_indices(xp_torch, target, shape.n_classes, ignore_index)
    loss, grad = compute_loss_and_grad(input, target, weight, shape, opts, compute_grad)
    return loss.clone() if loss._base is not None else loss, grad if grad is not None else input.new_empty(0)


@cross_entropy_op.register_fake
def _(input, target, weight, normalizer, class_axis, ignore_index, reduction, label_smoothing, z_loss, softcap,
      zero_if_all_ignored, compute_grad):  # fmt: skip
    batch = tuple(input.shape[:class_axis]) + tuple(input.shape[class_axis + 1 :])
    loss = input.new_empty(batch if reduction == "none" else ())
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty(0)
    return loss, grad


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    input, target, weight, normalizer, class_axis, _ignore_index, reduction, label_smoothing, *_ = inputs
    ctx.class_axis = class_axis
    ctx.reduction = reduction
    ctx.label_smoothing = label_smoothing
    ctx.z_loss, ctx.softcap = inputs[8], inputs[9]
    ctx.ignore_index, ctx.zero_if_all_ignored = inputs[5], inputs[10]
    # The second output (the gradient buffer) never receives a gradient: do not let autograd fill an
    # input-sized tensor of zeros for it.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], input, target, weight, normalizer, output[0])


def _backward(ctx: Any, grad_loss: torch.Tensor | None, _grad_of_grad: torch.Tensor | None) -> tuple[Any, ...]:
    grad, input, target, weight, normalizer, loss = ctx.saved_tensors
    grad_input = None
    if grad_loss is None:  # the loss itself was not used
        return (None,) * 12
    if torch.is_grad_enabled():  # backward(create_graph=True): the gradient must be differentiable
        return _differentiable_backward(ctx, grad_loss, input, target, weight, normalizer)
    if ctx.needs_input_grad[0]:
        if grad.numel() != input.numel():
            raise RuntimeError("crossent: the forward pass did not compute the gradient (input did not require it)")
        upstream = grad_loss.unsqueeze(ctx.class_axis) if ctx.reduction == "none" else grad_loss
        upstream = upstream.to(grad.dtype)
        if grad.device.type == "cpu" and grad.numel() >= 1 << 20 and not torch.compiler.is_compiling():
            grad_input = torch.mul(grad, upstream, out=cpu_buffer(tuple(grad.shape), grad.dtype))
        else:
            grad_input = grad * upstream
    grad_target = None
    if ctx.needs_input_grad[1] and target.is_floating_point():
        grad_target = _probability_target_grad(ctx, grad_loss, input, target, weight, normalizer)
    grad_weight = None
    if ctx.needs_input_grad[2] and weight is not None:
        opts = _options(
            ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss, ctx.softcap, normalizer,
            ctx.zero_if_all_ignored,
        )  # fmt: skip
        grad_weight = cross_entropy_weight_grad(
            input, target, weight, ctx.class_axis, opts, normalizer, grad_loss, loss
        )
    return grad_input, grad_target, grad_weight, None, None, None, None, None, None, None, None, None


def _differentiable_backward(ctx: Any, grad_loss, input, target, weight, normalizer) -> tuple[Any, ...]:
    """The gradients as torch operations that autograd can differentiate again (Hessian-vector
    products, MAML, gradient penalties): the saved gradient is a constant to autograd, so the loss is
    recomputed with the torch-ops implementation and differentiated with create_graph=True."""
    shape = _shape(input, target, ctx.class_axis)
    opts = _options(
        ctx.ignore_index, ctx.reduction, ctx.label_smoothing, ctx.z_loss, ctx.softcap, normalizer,
        ctx.zero_if_all_ignored,
    )  # fmt: skip
    wanted = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1] and target.is_floating_point(),
        ctx.needs_input_grad[2] and weight is not None,
    ]
    inputs = [tensor for tensor, want in zip((input, target, weight), wanted, strict=True) if want]
    if not inputs:
        return (None,) * 12
    loss, _ = _torch_loss_and_grad(input, target, weight, shape, opts, compute_grad=False)
    grads = iter(torch.autograd.grad(loss, inputs, grad_loss, create_graph=True, allow_unused=True))
    grad_input, grad_target, grad_weight = (next(grads) if want else None for want in wanted)
    return grad_input, grad_target, grad_weight, None, None, None, None, None, None, None, None, None


def _probability_target_grad(ctx: Any, grad_loss, input, target, weight, normalizer) -> torch.Tensor:
    """d(loss)/d(target) = -(1 - eps) * w_c * log_softmax(x')_c * upstream, as torch's autograd gives it."""
    axis = ctx.class_axis
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    if ctx.softcap > 0:
        x = ctx.softcap * torch.tanh(x / ctx.softcap)
    log_probs = torch.log_softmax(x, dim=axis)
    if weight is not None:
        view = [1] * input.ndim
        view[axis] = -1
        log_probs = log_probs * weight.to(log_probs.dtype).view(view)
    upstream = grad_loss.unsqueeze(axis) if ctx.reduction == "none" else grad_loss
    if ctx.reduction == "mean":
        rows = math.prod(input.shape) // input.shape[axis]
        denom = checked_normalizer(normalizer) if normalizer is not None else rows
        upstream = upstream / denom
    return (-(1 - ctx.label_smoothing) * log_probs * upstream).to(target.dtype)


cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def first_derivative_only(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For the backward of an autograd.Function computed outside autograd (by the kernel, in place, or
    from the forward's saved gradients): autograd would take its result for a constant, so a second
    derivative through it (backward with create_graph=True) would silently miss this loss's term.
    Raise instead."""

    def decorate(backward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(backward)
        def checked(ctx: Any, *grads: Any) -> Any:
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"crossent.torch.{name} has no second derivative (backward ran with create_graph=True); "
                    "use crossent.torch.cross_entropy, whose gradient is differentiable"
                )
            return backward(ctx, *grads)

        return checked

    return decorate


class InplaceBackward(torch.autograd.Function):
    """cross_entropy with ``inplace_backward=True``: the forward writes d(loss)/d(input) (for a unit
    upstream gradient) over the input, and the backward scales it there. No input-sized gradient is
    allocated: the native kernel (CPU, classes on the last axis) writes each row's gradient over the row
    it has just read (from a per-thread copy), the Triton kernel writes it over the logits it read (any
    layout); elsewhere the gradient is computed and then copied over.

    The input's version counter is bumped, so that autograd raises if another operation saved the
    logits for its own backward. Eager mode only; the backward may run once.
    """

    @staticmethod
    def forward(ctx: Any, input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None,
                shape: LossShape, opts: LossOptions) -> torch.Tensor:  # fmt: skip
        if not shape.probability_target and input.device.type == "cpu":
            _validate.check_class_indices(xp_torch, target, shape.n_classes, opts.ignore_index)
        result = compute_loss_and_grad(input, target, weight, shape, opts, True, in_place=input.is_contiguous())
        assert result[1] is not None
        if result[1] is not input:
            input.detach().copy_(result[1])
        torch.autograd.graph.increment_version(input)
        ctx.buffer = input.detach()  # the gradient now lives in the input's memory
        ctx.class_axis, ctx.reduction, ctx.used = shape.class_axis, opts.reduction, False
        loss = result[0]
        return loss.clone() if loss._base is not None else loss

    @staticmethod
    @first_derivative_only("cross_entropy with inplace_backward=True")
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        if ctx.used:
            raise RuntimeError(
                "crossent.torch.cross_entropy(inplace_backward=True): backward ran twice through the same "
                "forward; the gradient lives in the logits' memory and is scaled there, once"
            )
        ctx.used = True
        upstream = grad_loss.unsqueeze(ctx.class_axis) if ctx.reduction == "none" else grad_loss
        return ctx.buffer.mul_(upstream.to(ctx.buffer.dtype)), None, None, None, None
