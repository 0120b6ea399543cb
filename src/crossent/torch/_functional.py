"""``crossent.torch.cross_entropy`` and ``nll_loss``: torch.nn.functional's signatures, crossent's op."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import array_api_compat.torch as xp_torch
import torch

from .. import _validate
from ._nll import nll_loss_op
from ._ops import InplaceBackward, cross_entropy_op, loss_options


def _legacy_reduction(size_average: Any, reduce: Any, reduction: str) -> str:
    # torch's deprecated size_average/reduce, mapped as torch maps them.
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce are deprecated, use reduction= instead", DeprecationWarning, stacklevel=3)
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        return "none"
    return "mean" if size_average else "sum"


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    axis: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    zero_if_all_ignored: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor:
    r"""``torch.nn.functional.cross_entropy``, computed by crossent, with autograd.

    The same signature and defaults as torch's, plus crossent's keyword-only extras (see
    :func:`crossent.cross_entropy`). CPU tensors run the fused native kernel without copies; CUDA and
    ROCm tensors crossent's fused Triton kernel (loss and gradient in one launch, no host
    synchronisation); other devices a torch implementation of the same semantics on row chunks
    (:func:`crossent.torch.use_backend` chooses another). float16 and bfloat16 are computed in float32.
    The op is registered with ``torch.library``, so ``torch.compile(fullgraph=True)`` traces it without
    a graph break.

    Class indices out of range raise ``IndexError`` for CPU tensors; on a GPU, where checking would
    synchronise the host, the Triton kernel gives NaN for that row's loss and gradient (and so for a
    reduced loss).

    ``inplace_backward=True`` saves the input-sized gradient: the forward overwrites the logits with
    d(loss)/d(logits), which the backward scales in place. Use it when nothing else needs the logits
    after the loss (the usual language-model head); autograd raises if another operation saved them,
    since their version counter is bumped. Eager mode only; not with probability targets that require
    a gradient (theirs needs the logits).

    Raises
    ------
    IndexError
        A class index outside [0, C) that is not ``ignore_index``, on CPU tensors, eager or under
        ``torch.compile``. On an accelerator the target is not read (that would synchronise the host):
        such a row's loss is NaN, and so are the mean and the gradients.
    ValueError
        ``ignore_index >= 0`` with a probability target (torch raises the same).

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> x = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    >>> loss = ct.cross_entropy(x, torch.tensor([0]))
    >>> loss.backward()
    >>> print(f"{loss.item():.4f}", x.grad.sum().abs().item() < 1e-6)
    0.1698 True
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    opts = loss_options(
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored,
    )  # fmt: skip
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"input and target must be torch tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    shape = _validate.loss_shape(xp_torch, input, target, axis, allow_probabilities=True)
    _validate.check_target_options(shape.probability_target, opts)
    if weight is not None:
        _validate.check_weight(xp_torch, weight, shape.n_classes)
    norm = opts.normalizer
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.tensor(float(norm), dtype=torch.float64, device=input.device)
    compute_grad = torch.is_grad_enabled() and input.requires_grad
    if inplace_backward and compute_grad:
        if torch.compiler.is_compiling():
            raise RuntimeError("inplace_backward=True runs in eager mode only; leave it False under torch.compile")
        if target.requires_grad or (weight is not None and weight.requires_grad):
            what = "probability target's" if target.requires_grad else "class weight's"
            raise ValueError(f"inplace_backward=True overwrites the logits that the {what} gradient needs")
        opts = dataclasses.replace(opts, normalizer=norm)
        return InplaceBackward.apply(input, target, weight, shape, opts)
    loss, _ = cross_entropy_op(
        input, target, weight, norm, shape.class_axis, opts.ignore_index, opts.reduction, opts.label_smoothing,
        opts.z_loss, opts.softcap or 0.0, opts.zero_if_all_ignored, compute_grad,
    )  # fmt: skip
    return loss


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    axis: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    zero_if_all_ignored: bool = False,
) -> torch.Tensor:
    """``torch.nn.functional.nll_loss`` with crossent's validation and extras (input: log-probabilities).

    NLL is a gather and a weighted sum. It follows :func:`crossent.torch.use_backend` as
    :func:`cross_entropy` does: the native kernel on CPU tensors, crossent's Triton gather kernel on
    CUDA/ROCm tensors (float32, bfloat16, float16), torch operations otherwise; float16 and bfloat16 are
    computed in float32. A backend chosen by name that cannot run the call raises. The op is
    registered with ``torch.library`` (``torch.compile(fullgraph=True)`` traces it). Gradients flow to
    ``input`` (-w_y times the upstream gradient at the target's class) and to a ``weight`` that
    requires one.

    Raises
    ------
    IndexError
        A target outside [0, C) that is not ``ignore_index``, on CPU tensors, eager or under
        ``torch.compile``. On an accelerator the target is not read (that would synchronise the host):
        such a row's loss is NaN, and so are the mean and the gradients.

    Examples
    --------
    >>> import torch, crossent.torch as ct
    >>> logp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0]]), 1).requires_grad_(True)
    >>> loss = ct.nll_loss(logp, torch.tensor([0]))
    >>> loss.backward()
    >>> print(f"{loss.item():.4f}", logp.grad.tolist())
    0.1698 [[-1.0, 0.0, 0.0]]
    """
    reduction = _legacy_reduction(size_average, reduce, reduction)
    opts = loss_options(
        reduction=reduction, ignore_index=ignore_index, normalizer=normalizer, zero_if_all_ignored=zero_if_all_ignored
    )
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(
            f"input and target must be torch tensors, got {type(input).__name__} and {type(target).__name__}"
        )
    shape = _validate.loss_shape(xp_torch, input, target, axis, allow_probabilities=False)
    if weight is not None:
        _validate.check_weight(xp_torch, weight, shape.n_classes)
    norm = opts.normalizer
    if norm is not None and not isinstance(norm, torch.Tensor):
        norm = torch.tensor(float(norm), dtype=torch.float64, device=input.device)
    return nll_loss_op(input, target, weight, norm, shape.class_axis, opts.ignore_index, opts.reduction,
                       opts.zero_if_all_ignored)  # fmt: skip
